"""Instruction workloads (GSM8K, MetaMathQA, MATH, commonsense) and MNLI: loaders on the real sample files,
the formats of the full sets, and answer extraction on real gold answers."""

import json
from collections import Counter
from pathlib import Path

import pytest

from fedsim.errors import UsageError
from workloads import INSTRUCTION_SCHEMA, TASKS, WORKLOAD_NAMES, load_workload
from workloads.extract import (COMMONSENSE_ANSWERS, cut_at_stop, extract_choice, extract_math, extract_number,
                               gsm8k_gold, last_boxed, math_equal, normalize_math, numbers_equal, score)
from workloads.instruction import ALPACA_INPUT, ALPACA_NO_INPUT

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GSM8K, COMMONSENSE, SNLI = DATA / "gsm8k", DATA / "commonsense", DATA / "snli"
# Record counts of the sample files (shared/data/README.md; its "see wc" for commonsense is the JSON list length).
TEST_COUNTS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "ARC-Challenge": 1172, "ARC-Easy": 2376,
               "openbookqa": 500, "winogrande": 1267}
TRAIN_COUNTS = {"boolq": 9427, "ARC-Challenge": 1119, "ARC-Easy": 2251, "openbookqa": 4957}


def needs(folder: Path):
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: the real data sets are not shipped with the project (see shared/data/README.md)")


def col(table, name):
    return table.column(name).to_pylist()


def test_registry_names_and_tasks():
    assert WORKLOAD_NAMES == ("bbc-news", "commonsense", "gsm8k", "math", "metamathqa", "mnli", "snli", "sst2", "text-file")
    assert {n for n, t in TASKS.items() if t == "causal-lm"} == {"commonsense", "gsm8k", "math", "metamathqa"}


# ------------------------------------------------------------------------------------------ gsm8k


def test_gsm8k_real_files():
    needs(GSM8K)
    w = load_workload("gsm8k", path=str(GSM8K))
    assert (w.train.num_rows, w.eval.num_rows) == (7_473, 1_319)  # README (the files end with a newline: wc -l = records)
    assert w.task == "causal-lm" and w.label_names == ["gsm8k"] and w.train.schema == INSTRUCTION_SCHEMA
    first = json.loads((GSM8K / "test.jsonl").read_text().splitlines()[0])
    row = w.eval.slice(0, 1).to_pylist()[0]
    assert row["prompt"] == ALPACA_NO_INPUT.format(instruction=first["question"])
    assert row["response"] == first["answer"] and row["answer"] == "18" and row["scorer"] == "gsm8k"
    suffixed = load_workload("gsm8k", path=str(GSM8K), eval_limit=3, eval_prompt_suffix="Let's think step by step.")
    assert all(p.endswith("### Response:\nLet's think step by step.") for p in col(suffixed.eval, "prompt"))
    assert not any(p.endswith("step.") for p in col(suffixed.train, "prompt")[:50])


def test_gsm8k_extraction_on_every_real_gold_answer():
    needs(GSM8K)
    records = [json.loads(line) for split in ("train", "test") for line in (GSM8K / f"{split}.jsonl").read_text().splitlines()]
    for record in records:
        gold = gsm8k_gold(record["answer"])
        assert extract_number(record["answer"]) == gold  # the gold worked answer scores as right...
        assert score("gsm8k", "gsm8k", record["answer"], gold)
        assert score("gsm8k", "gsm8k", f"Let's see. The answer is: {gold}", gold)  # ...and so does MetaMath's format
    assert any("," in r["answer"].rsplit("####", 1)[1] for r in records)  # thousands separators occur and are handled
    assert extract_number("no marker 42") is None and not numbers_equal(None, "42")
    assert extract_number("#### 1,234.50") == "1234.50" and numbers_equal("1234.5", "1234.50")
    assert numbers_equal("-3", "-3") and not numbers_equal("3", "-3") and numbers_equal("1/2", "0.5")


# -------------------------------------------------------------------------------------- commonsense


def test_commonsense_real_files_counts_and_answers():
    needs(COMMONSENSE)
    sets = list(TEST_COUNTS)
    w = load_workload("commonsense", path=str(COMMONSENSE), train_files=[f"{s}/train.json" for s in TRAIN_COUNTS], eval_sets=sets)
    assert Counter(col(w.eval, "subset")) == TEST_COUNTS
    assert Counter(col(w.train, "subset")) == TRAIN_COUNTS
    assert w.label_names == sorted(TEST_COUNTS) and w.task == "causal-lm"
    for name in sets:
        records = json.loads((COMMONSENSE / name / "test.json").read_text())
        rows = [r for r in w.eval.to_pylist() if r["subset"] == name]
        assert [r["answer"] for r in rows] == [r["answer"] for r in records]
        assert rows[0]["prompt"] == ALPACA_NO_INPUT.format(instruction=records[0]["instruction"])
        for record in records:  # the real gold outputs ("the correct answer is option2") extract to the gold answer
            assert extract_choice(name, record["output"]) == record["answer"]
            assert record["answer"] in COMMONSENSE_ANSWERS[name]


def test_commonsense_answer_words():
    assert extract_choice("boolq", "The correct answer is TRUE.") == "true"
    assert extract_choice("hellaswag", "the correct answer is ending3") == "ending3"
    assert extract_choice("winogrande", "option2 or option1") == "option2"  # the first found, as LLM-Adapters
    assert extract_choice("piqa", "no idea") == ""
    assert cut_at_stop("answer1\n\n### Instruction:\nanswer2") == "answer1\n\n"


def test_commonsense_hellaswag_and_170k_formats(tmp_path):
    """HellaSwag and Commonsense-170k are not in shared/data; the same loader reads their format."""
    (tmp_path / "hellaswag").mkdir()
    hella = [{"instruction": "Please choose the correct ending to complete the given sentence: A man ...\n\nEnding1: a Ending2: b "
              "Ending3: c Ending4: d\n\nAnswer format: ending1/ending2/ending3/ending4", "input": "",
              "output": "the correct answer is ending4", "answer": "ending4"}]
    (tmp_path / "hellaswag" / "test.json").write_text(json.dumps(hella))
    train = [{"instruction": "Q?", "input": "some context", "output": "the correct answer is true", "answer": "true"}] * 3
    (tmp_path / "commonsense_170k.json").write_text(json.dumps(train))
    w = load_workload("commonsense", path=str(tmp_path), eval_sets="hellaswag")
    assert col(w.train, "subset") == ["commonsense_170k"] * 3 and col(w.eval, "answer") == ["ending4"]
    assert col(w.train, "prompt")[0] == ALPACA_INPUT.format(instruction="Q?", input="some context")
    assert extract_choice("hellaswag", col(w.eval, "response")[0]) == "ending4"
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_sets: unknown set 'hella'; valid: boolq, piqa"):
        load_workload("commonsense", path=str(tmp_path), eval_sets=["hella"])
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_sets: .*piqa/test\.json does not exist"):
        load_workload("commonsense", path=str(tmp_path), eval_sets=["piqa"])
    with pytest.raises(UsageError, match=r"^workload\.options\.train_files: .*nope\.json does not exist"):
        load_workload("commonsense", path=str(tmp_path), train_files=["nope.json"], eval_sets=["hellaswag"])
    with pytest.raises(UsageError, match=r"^workload\.options\.template: unknown template 'chat'; valid: alpaca, plain$"):
        load_workload("commonsense", path=str(tmp_path), eval_sets=["hellaswag"], template="chat")
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x", "answer": "true"}]))
    with pytest.raises(UsageError, match=r"^workload\.options\.train_files: record 1 of .*bad\.json has no string field 'output'"):
        load_workload("commonsense", path=str(tmp_path), train_files=["bad.json"], eval_sets=["hellaswag"])


# --------------------------------------------------------------------------------- math, metamathqa

MATH_RECORDS = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "We have $\\frac{1}{2}+\\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
    {"problem": "Find $x$ if $2x=10$.", "level": "Level 1", "type": "Algebra",
     "solution": "Dividing, $x = \\boxed{5}$."},
    {"problem": "Simplify $\\sqrt{8}$.", "level": "Level 2", "type": "Algebra",
     "solution": "$\\sqrt{8} = \\sqrt{4\\cdot 2} = \\boxed{2\\sqrt{2}}$."},
]


def test_math_both_layouts(tmp_path):
    hendrycks = tmp_path / "MATH"
    for split in ("train", "test"):
        for i, record in enumerate(MATH_RECORDS):
            folder = hendrycks / split / record["type"].lower()
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.json").write_text(json.dumps(record))
    w = load_workload("math", path=str(hendrycks))
    assert w.train.num_rows == w.eval.num_rows == 3 and w.task == "causal-lm"
    assert sorted(col(w.eval, "answer")) == sorted(["\\frac{3}{4}", "5", "2\\sqrt{2}"])
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for split in ("train", "test"):
        (jsonl / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_RECORDS))
    v = load_workload("math", path=str(jsonl))
    assert col(v.eval, "answer") == ["\\frac{3}{4}", "5", "2\\sqrt{2}"] and col(v.eval, "scorer") == ["math"] * 3
    for row in v.eval.to_pylist():  # the gold solutions score as right
        assert score("math", "math", row["response"], row["answer"])
    (jsonl / "test.jsonl").write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(UsageError, match=r"^workload\.path: record 1 of .*test\.jsonl has no \\boxed"):
        load_workload("math", path=str(jsonl))


def test_math_answer_matching():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("none") is None
    assert math_equal("\\dfrac{3}{4}", "\\frac34") and math_equal("0.5", "\\frac{1}{2}") and math_equal("1/2", "\\frac{1}{2}")
    assert math_equal("10^\\circ", "10") and math_equal("\\$5.00", "5") and math_equal("x = 3", "3")
    assert math_equal("\\left(1, 2\\right)", "(1,2)") and not math_equal("3", "4") and not math_equal(None, "4")
    assert extract_math("so it is \\boxed{2\\sqrt{2}}.") == "2\\sqrt{2}"
    assert extract_math("The answer is: 7\nmore") == "7" and extract_math("nothing") is None
    assert normalize_math("\\text{(A)}") == "(A)"


def test_metamathqa_format(tmp_path):
    needs(GSM8K)
    records = [{"query": "Q1", "response": "Add them. The answer is: 12", "type": "GSM_AnsAug"},
               {"query": "Q2", "response": "So $x=\\boxed{3}$. The answer is: 3", "type": "MATH_AnsAug"}]
    (tmp_path / "MetaMathQA-395K.json").write_text(json.dumps(records))
    w = load_workload("metamathqa", path=str(tmp_path / "MetaMathQA-395K.json"), eval_path=str(GSM8K / "test.jsonl"))
    assert w.train.num_rows == 2 and w.eval.num_rows == 1_319 and w.label_names == ["gsm8k", "metamathqa"]
    assert col(w.train, "answer") == ["12", "3"] and set(col(w.eval, "subset")) == {"gsm8k"}
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_path: not set"):
        load_workload("metamathqa", path=str(tmp_path / "MetaMathQA-395K.json"))
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_format: unknown format 'svamp'; valid: gsm8k, math$"):
        load_workload("metamathqa", path=str(tmp_path / "MetaMathQA-395K.json"), eval_path="x", eval_format="svamp")


# ------------------------------------------------------------------------------------------- mnli

GLUE_MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def write_glue_mnli(path: Path, rows, dev: bool):
    labels = ["label1", "label2", "label3", "label4", "label5", "gold_label"] if dev else ["label1", "gold_label"]
    lines = ["\t".join(GLUE_MNLI_HEADER + labels)]
    for i, (s1, s2, gold) in enumerate(rows):
        lines.append("\t".join([str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2]
                               + [gold] * (len(labels) - 1) + [gold]))
    path.write_text("\n".join(lines) + "\n")


def test_mnli_glue_tsv(tmp_path):
    train = [('He said "hi', "Someone spoke.", "entailment"), ("A cat.", "A dog.", "contradiction"), ("x", "y", "-")]
    write_glue_mnli(tmp_path / "train.tsv", train, dev=False)
    write_glue_mnli(tmp_path / "dev_matched.tsv", [("m", "n", "neutral")], dev=True)
    write_glue_mnli(tmp_path / "dev_mismatched.tsv", [("a", "b", "entailment"), ("c", "d", "neutral")], dev=True)
    w = load_workload("mnli", path=str(tmp_path))
    assert w.task == "classification" and w.label_names == ["entailment", "neutral", "contradiction"]
    assert col(w.train, "text") == ['He said "hi', "A cat."] and col(w.train, "label") == [0, 2]  # "-" dropped, quotes literal
    assert col(w.eval, "text_pair") == ["n"] and col(w.eval, "label") == [1]
    assert load_workload("mnli", path=str(tmp_path), eval_split="mismatched").eval.num_rows == 2
    with pytest.raises(UsageError, match=r"^workload\.options\.eval_split: unknown split 'dev'; valid: matched, mismatched$"):
        load_workload("mnli", path=str(tmp_path), eval_split="dev")
    (tmp_path / "dev_matched.tsv").unlink()
    with pytest.raises(UsageError, match=r"^workload\.path: .*dev_matched\.tsv does not exist"):
        load_workload("mnli", path=str(tmp_path))


# ------------------------------------------------------------------------------------------- snli


def test_snli_record_counts_versus_readme():
    """README's 1,288 / 1,276 are `wc -l`; the files lack a final newline, so they hold 1,289 / 1,277 records."""
    needs(SNLI)
    for split, lines, kept in (("dev", 1_288, 1_273), ("test", 1_276, 1_254)):
        text = (SNLI / f"snli_1.0_{split}.jsonl").read_text()
        assert text.count("\n") == lines and not text.endswith("\n")
        assert len([line for line in text.split("\n") if line.strip()]) == lines + 1
    w = load_workload("snli", path=str(SNLI), train_split="dev", eval_split="test")
    assert (w.train.num_rows, w.eval.num_rows) == (1_273, 1_254)  # after dropping the 16 / 23 "-" records
