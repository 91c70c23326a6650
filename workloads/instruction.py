"""Loaders for the instruction (causal-LM) workloads of the Fed-SB paper: GSM8K, MetaMathQA, MATH, Commonsense.

Each reads the data sets' own files and returns a `Workload` with task "causal-lm" whose tables have
the columns of `workloads.base.INSTRUCTION_SCHEMA` (`prompt`, `response`, `answer`, `subset`, `scorer`,
`label`). The prompt template is applied here, once; the worker tokenises `prompt` and `response`
and computes the loss on the response (or on everything: `workload.loss_on`).

- `gsm8k`: a folder with `train.jsonl` and `test.jsonl` (OpenAI grade-school-math: `question`,
  `answer`; the final answer follows `#### `).
- `metamathqa`: MetaMathQA (`MetaMathQA-395K.json`, a JSON list of `query`, `response`, `type`, ...;
  responses end with `The answer is: ...`) for training, evaluated on GSM8K's test file
  (`eval_format: gsm8k`) or MATH's test split (`eval_format: math`) given by `eval_path`.
- `math`: MATH (Hendrycks et al.): a folder with `train/` and `test/` sub-folders of per-problem JSON
  files (`problem`, `solution`, `level`, `type`), or with `train.jsonl`/`test.jsonl` (or `.json` lists)
  of the same records; the final answer is the solution's last `\\boxed{...}`.
- `commonsense`: the LLM-Adapters format (a JSON list of `instruction`, `input`, `output`, `answer`)
  of Commonsense-170k and its eight test sets: a folder with the training file(s) (`train_files`,
  default `commonsense_170k.json`) and `<set>/test.json` for each set of `eval_sets` (default: boolq,
  piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, hellaswag, winogrande).

Templates (`template` option): `alpaca`, the prompt of LLM-Adapters and MetaMath
("Below is an instruction that describes a task. ... ### Instruction:\\n...\\n\\n### Response:\\n"), or
`plain` (the instruction, then the input, then a newline). `eval_prompt_suffix` is appended to
evaluation prompts only (MetaMath evaluates GSM8K and MATH with "Let's think step by step.").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedsim.errors import UsageError
from workloads.base import Workload, instruction_table
from workloads.classification import option_field
from workloads.extract import COMMONSENSE_ANSWERS, COMMONSENSE_SETS, gsm8k_gold, last_boxed

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "plain")
MATH_EVAL_FORMATS = ("gsm8k", "math")


def format_prompt(instruction: str, input_text: str | None = None, template: str = "alpaca") -> str:
    """The model's input for an instruction (and optional input), in the named template."""
    if template == "alpaca":
        return ALPACA_INPUT.format(instruction=instruction, input=input_text) if input_text else ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "plain":
        return f"{instruction}\n\n{input_text}\n" if input_text else f"{instruction}\n"
    raise UsageError(f"{option_field('template')}: unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


# --------------------------------------------------------------------------------------- file reading


def _folder(path: str | None, what: str) -> Path:
    if path is None:
        raise UsageError(f"workload.path: not set ({what})")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"workload.path: {folder} is not a folder ({what})")
    return folder


def read_json_records(file: Path, field: str = "path", what: str = "") -> list[dict]:
    """The records of a JSON list or a JSON-lines file (chosen by the first character, not the suffix)."""
    where = f" ({what})" if what else ""
    if not file.is_file():
        raise UsageError(f"{option_field(field)}: {file} does not exist{where}")
    text = file.read_text(encoding="utf-8-sig")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UsageError(f"{option_field(field)}: {file} is not a JSON list or JSON lines ({e.msg}, line {e.lineno})") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise UsageError(f"{option_field(field)}: {file} must hold one or more JSON objects{where}")
    return records


def _fields(record: dict, keys: tuple[str, ...], file: Path, number: int, field: str = "path") -> list[str]:
    values = []
    for key in keys:
        value = record.get(key)
        if not isinstance(value, str):
            raise UsageError(f"{option_field(field)}: record {number} of {file} has no string field {key!r} (expected fields: {', '.join(keys)})")
        values.append(value)
    return values


def _check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise UsageError(f"{option_field('template')}: unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    return template


def _check_suffix(suffix) -> str:
    if not isinstance(suffix, str):
        raise UsageError(f"{option_field('eval_prompt_suffix')}: must be a string, got {suffix!r}")
    return suffix


def _rows(records: list[tuple[str, str, str]], subset: str, scorer: str, suffix: str = "") -> tuple:
    """(prompts, responses, answers, subsets, scorers) columns from (prompt, response, answer) triples."""
    prompts = [p + suffix for p, _, _ in records]
    return prompts, [r for _, r, _ in records], [a for _, _, a in records], [subset] * len(records), [scorer] * len(records)


def _table(parts: list[tuple], label_names: list[str]):
    columns = [sum((list(part[i]) for part in parts), []) for i in range(5)]
    return instruction_table(*columns, label_names=label_names)


# --------------------------------------------------------------------------------------------- gsm8k


def read_gsm8k(file: Path, template: str, field: str = "path") -> list[tuple[str, str, str]]:
    """(prompt, response, gold answer) of each GSM8K record; the response is the whole worked answer."""
    rows = []
    for number, record in enumerate(read_json_records(file, field, "GSM8K JSONL: question, answer"), start=1):
        question, answer = _fields(record, ("question", "answer"), file, number, field)
        try:
            gold = gsm8k_gold(answer)
        except ValueError:
            raise UsageError(f"{option_field(field)}: record {number} of {file} has no '#### <answer>' in its answer") from None
        rows.append((format_prompt(question, None, template), answer, gold))
    return rows


def load_gsm8k(path: str | None, train_file: str = "train.jsonl", eval_file: str = "test.jsonl",
               template: str = "alpaca", eval_prompt_suffix: str = "") -> Workload:
    """GSM8K: `path` is a folder with `train.jsonl` and `test.jsonl` (names: `train_file`, `eval_file`)."""
    folder = _folder(path, "gsm8k expects a folder with train.jsonl and test.jsonl (question, answer)")
    template, suffix = _check_template(template), _check_suffix(eval_prompt_suffix)
    labels = ["gsm8k"]
    train = _table([_rows(read_gsm8k(folder / train_file, template), "gsm8k", "gsm8k")], labels)
    eval_ = _table([_rows(read_gsm8k(folder / eval_file, template), "gsm8k", "gsm8k", suffix)], labels)
    return Workload("gsm8k", "causal-lm", labels, train, eval_,
                    info={"path": str(folder), "train_file": train_file, "eval_file": eval_file, "template": template})


# ---------------------------------------------------------------------------------------------- math


def _math_files(split_dir: Path) -> list[Path]:
    """Hendrycks' layout: `<split>/<subject>/<n>.json`, in subject then problem-number order."""
    def key(file: Path):
        return (file.parent.name, int(file.stem) if file.stem.isdigit() else 0, file.stem)
    return sorted(split_dir.rglob("*.json"), key=key)


def read_math(source: Path, template: str, field: str = "path") -> list[tuple[str, str, str]]:
    """(prompt, solution, boxed answer) of each MATH problem in a split folder or a JSON(L) file."""
    if source.is_dir():
        files = _math_files(source)
        if not files:
            raise UsageError(f"{option_field(field)}: {source} holds no .json problem files (MATH layout: <split>/<subject>/<n>.json)")
        records = []
        for file in files:
            try:
                records.append((json.loads(file.read_text(encoding="utf-8")), file))
            except json.JSONDecodeError as e:
                raise UsageError(f"{option_field(field)}: {file} is not valid JSON ({e.msg})") from None
    else:
        records = [(r, source) for r in read_json_records(source, field, "MATH records: problem, solution")]
    rows = []
    for number, (record, file) in enumerate(records, start=1):
        problem, solution = _fields(record, ("problem", "solution"), file, number, field)
        answer = last_boxed(solution)
        if answer is None:
            raise UsageError(f"{option_field(field)}: record {number} of {file} has no \\boxed{{...}} answer in its solution")
        rows.append((format_prompt(problem, None, template), solution, answer))
    return rows


def _math_split(folder: Path, split: str) -> Path:
    for candidate in (folder / split, folder / f"{split}.jsonl", folder / f"{split}.json"):
        if candidate.exists():
            return candidate
    raise UsageError(f"workload.path: {folder} has no {split}/ folder, {split}.jsonl or {split}.json (MATH: problem, solution)")


def load_math(path: str | None, train_split: str = "train", eval_split: str = "test",
              template: str = "alpaca", eval_prompt_suffix: str = "") -> Workload:
    """MATH: `path` is a folder with `train/` and `test/` (Hendrycks' per-problem JSON files) or `<split>.jsonl`."""
    folder = _folder(path, "math expects a folder with train/ and test/ (MATH's per-problem JSON files) or train.jsonl and test.jsonl")
    template, suffix = _check_template(template), _check_suffix(eval_prompt_suffix)
    labels = ["math"]
    train = _table([_rows(read_math(_math_split(folder, train_split), template), "math", "math")], labels)
    eval_ = _table([_rows(read_math(_math_split(folder, eval_split), template), "math", "math", suffix)], labels)
    return Workload("math", "causal-lm", labels, train, eval_,
                    info={"path": str(folder), "train_split": train_split, "eval_split": eval_split, "template": template})


# ---------------------------------------------------------------------------------------- metamathqa

_THE_ANSWER_IS = re.compile(r"The answer is:?\s*(.*)$", re.DOTALL)


def load_metamathqa(path: str | None, eval_path: str | None = None, eval_format: str = "gsm8k",
                    template: str = "alpaca", eval_prompt_suffix: str = "") -> Workload:
    """MetaMathQA for training (`path`: the JSON list `MetaMathQA-395K.json`, or JSON lines, of `query`, `response`).

    Evaluated on `eval_path`: GSM8K's `test.jsonl` (`eval_format: gsm8k`) or MATH's test split, a
    folder of per-problem files or a JSON(L) file (`eval_format: math`). The paper trains on the first
    20,000 records (`workload.train_limit` takes a random subset instead).
    """
    what = "metamathqa expects MetaMathQA's JSON file (query, response) as workload.path"
    if path is None:
        raise UsageError(f"workload.path: not set ({what})")
    if eval_format not in MATH_EVAL_FORMATS:
        raise UsageError(f"{option_field('eval_format')}: unknown format {eval_format!r}; valid: {', '.join(MATH_EVAL_FORMATS)}")
    if eval_path is None:
        raise UsageError(f"{option_field('eval_path')}: not set (MetaMathQA has no test split: give GSM8K's test.jsonl or MATH's test split)")
    template, suffix = _check_template(template), _check_suffix(eval_prompt_suffix)
    file = Path(path).expanduser()
    train_rows = []
    for number, record in enumerate(read_json_records(file, "path", what), start=1):
        query, response = _fields(record, ("query", "response"), file, number)
        match = _THE_ANSWER_IS.search(response)
        train_rows.append((format_prompt(query, None, template), response, match.group(1).strip() if match else ""))
    eval_file = Path(eval_path).expanduser()
    if eval_format == "gsm8k":
        eval_rows = read_gsm8k(eval_file, template, "eval_path")
    else:
        if not eval_file.exists():
            raise UsageError(f"{option_field('eval_path')}: {eval_file} does not exist (MATH's test split: a folder or a JSON(L) file)")
        eval_rows = read_math(eval_file, template, "eval_path")
    labels = sorted([eval_format, "metamathqa"])
    train = _table([_rows(train_rows, "metamathqa", eval_format)], labels)
    eval_ = _table([_rows(eval_rows, eval_format, eval_format, suffix)], labels)
    return Workload("metamathqa", "causal-lm", labels, train, eval_,
                    info={"path": str(file), "eval_path": str(eval_file), "eval_format": eval_format, "template": template})


# --------------------------------------------------------------------------------------- commonsense


def read_llm_adapters(file: Path, template: str, field: str = "path") -> list[tuple[str, str, str]]:
    """(prompt, output, answer) of each record of an LLM-Adapters JSON file (instruction, input, output, answer)."""
    rows = []
    for number, record in enumerate(read_json_records(file, field, "LLM-Adapters JSON: instruction, input, output, answer"), start=1):
        instruction, output, answer = _fields(record, ("instruction", "output", "answer"), file, number, field)
        rows.append((format_prompt(instruction, record.get("input") or None, template), output, answer))
    return rows


def _names(value, field: str) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{option_field(field)}: must be a non-empty list of names, got {value!r}")
    return list(value)


def load_commonsense(path: str | None, train_files=("commonsense_170k.json",), eval_sets=COMMONSENSE_SETS,
                     template: str = "alpaca") -> Workload:
    """Commonsense reasoning in the LLM-Adapters format: train on `train_files`, score each of `eval_sets` apart.

    `path` is a folder; `train_files` are paths inside it (e.g. `commonsense_170k.json`, or
    `boolq/train.json`); eval set `<name>` is read from `<name>/test.json`. A training file's subset
    is its folder's name when that is a set name (`boolq/train.json` -> boolq), else its stem.
    """
    folder = _folder(path, "commonsense expects a folder with commonsense_170k.json and <set>/test.json files (LLM-Adapters format)")
    template = _check_template(template)
    train_files = _names(train_files, "train_files")
    eval_sets = _names(eval_sets, "eval_sets")
    for name in eval_sets:
        if name not in COMMONSENSE_SETS:
            raise UsageError(f"{option_field('eval_sets')}: unknown set {name!r}; valid: {', '.join(COMMONSENSE_SETS)}")
    train_parts, subsets = [], []
    for name in train_files:
        file = folder / name
        subset = file.parent.name if file.parent.name in COMMONSENSE_SETS else file.stem
        train_parts.append((read_llm_adapters(file, template, "train_files"), subset))
        subsets.append(subset)
    eval_parts = []
    for name in eval_sets:
        file = folder / name / "test.json"
        if not file.is_file():
            raise UsageError(f"{option_field('eval_sets')}: {file} does not exist (set {name!r}; drop it from eval_sets or add the file)")
        eval_parts.append((read_llm_adapters(file, template, "eval_sets"), name))
    labels = sorted(set(subsets) | set(eval_sets))
    for rows, name in eval_parts:
        bad = sorted({a for _, _, a in rows} - set(COMMONSENSE_ANSWERS[name]))
        if bad:
            raise UsageError(f"{option_field('eval_sets')}: {folder / name / 'test.json'} has answers {bad[:3]} outside {name}'s answer words")
    train = _table([_rows(rows, subset, "choice") for rows, subset in train_parts], labels)
    eval_ = _table([_rows(rows, name, "choice") for rows, name in eval_parts], labels)
    return Workload("commonsense", "causal-lm", labels, train, eval_,
                    info={"path": str(folder), "train_files": train_files, "eval_sets": eval_sets, "template": template})

