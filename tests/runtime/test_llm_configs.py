"""Every GPU config of configs/ run end to end at toy size, on CPU, through `fedsim run`'s path on a real local Ray.

Each config is loaded as a user would load it; only what a CPU and a toy model need is overridden: the model
(the same architecture built from a config — Mistral, Gemma-2, Llama, BERT — 2 layers, hidden 64, random
weights, saved with a tokenizer), the data (small files in the real formats, written here or read from
shared/data), the sizes (clients, steps, rank, lengths) and the resources (no GPU). What the configs set as
the papers ran — bf16, the target modules, the LoRA-SB init, micro-batches, the schedules, generation-based
evaluation — runs as it is: init, a round, evaluation, the PEFT export.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from fedsim.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DATA = ROOT.parent / "shared" / "data"
GSM8K, COMMONSENSE, SNLI = DATA / "gsm8k", DATA / "commonsense", DATA / "snli"
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TOY = {  # what every run overrides: sizes and resources
    "workload.max_length": 64, "workload.train_limit": 48, "workload.eval_limit": 6,
    "clients.count": 4, "clients.per_round": 4, "train.local_steps": 2, "train.batch_size": 4,
    "method.rank": 4, "adapters.init_samples": 8, "runtime.workers": 1, "runtime.cpus_per_worker": 1,
    "runtime.gpus_per_worker": 0, "eval.batch_size": 6, "eval.max_new_tokens": 8,
}


def needs(*folders: Path):
    for folder in folders:
        if not folder.is_dir():
            pytest.skip(f"{folder} is absent: the real data sets are not shipped with the project (see shared/data/README.md)")


def gsm8k_records(count: int) -> list[dict]:
    return [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()[:count]]


def write_metamathqa(path: Path) -> Path:
    """MetaMathQA's format (a JSON list of query, response ending 'The answer is: ...', type), from real GSM8K problems."""
    records = []
    for record in gsm8k_records(60):
        reasoning, answer = record["answer"].split("####")
        records.append({"query": record["question"], "type": "GSM_Rephrased", "original_question": record["question"],
                        "response": f"{reasoning.strip()}\nThe answer is: {answer.strip()}"})
    path.write_text(json.dumps(records))
    return path


def write_math_test(folder: Path) -> Path:
    """MATH's test split in Hendrycks' layout: test/<subject>/<n>.json of problem, level, type, solution (\\boxed{...})."""
    problems = {"algebra": [("What is $2x$ if $x = 3$?", "$2x = 2 \\cdot 3 = \\boxed{6}$."),
                            ("Solve $x + 4 = 9$.", "Subtracting 4, $x = \\boxed{5}$.")],
                "prealgebra": [("Compute $\\frac{1}{2} + \\frac{1}{4}$.", "$\\frac{1}{2} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."),
                               ("What is $7 \\times 8$?", "$7 \\times 8 = \\boxed{56}$.")]}
    for subject, items in problems.items():
        (folder / "test" / subject).mkdir(parents=True)
        for number, (problem, solution) in enumerate(items):
            record = {"problem": problem, "level": "Level 1", "type": subject.title(), "solution": solution}
            (folder / "test" / subject / f"{number}.json").write_text(json.dumps(record))
    return folder / "test"


def write_commonsense(folder: Path) -> Path:
    """An LLM-Adapters folder: commonsense_170k.json (real BoolQ, ARC and OpenBookQA training records) and each set's
    test.json (the real ones from shared/data; HellaSwag, not shipped there, written here in its format)."""
    train = []
    for name in ("boolq", "ARC-Easy", "openbookqa"):
        train += json.loads((COMMONSENSE / name / "train.json").read_text())[:20]
    folder.mkdir()
    (folder / "commonsense_170k.json").write_text(json.dumps(train))
    for test in COMMONSENSE.glob("*/test.json"):
        (folder / test.parent.name).mkdir()
        (folder / test.parent.name / "test.json").symlink_to(test)
    (folder / "hellaswag").mkdir()
    (folder / "hellaswag" / "test.json").write_text(json.dumps([
        {"instruction": "Please choose the correct ending to complete the given sentence: A man is sitting on a roof. he\n\n"
                        "Ending1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. "
                        "Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\n"
                        "Answer format: ending1/ending2/ending3/ending4",
         "input": "", "output": "the correct answer is ending4", "answer": "ending4"}] * 3))
    return folder


def tiny_llm(tmp_path_factory, architecture: str) -> str:
    from tiny_models import tiny_causal_lm_with_tokenizer
    from workloads.instruction import ALPACA_INPUT, ALPACA_NO_INPUT

    texts = [ALPACA_NO_INPUT, ALPACA_INPUT, "The answer is: \\boxed{} the correct answer is"]
    texts += [r["question"] + "\n" + r["answer"] for r in gsm8k_records(400)]
    texts += [r["instruction"] + "\n" + r["output"] for r in json.loads((COMMONSENSE / "boolq" / "train.json").read_text())[:200]]
    path = tmp_path_factory.mktemp(f"tiny-{architecture}")
    tiny_causal_lm_with_tokenizer(path, architecture, texts)
    return str(path)


def run_config(name: str, tmp_path: Path, overrides: dict) -> tuple[Path, object]:
    from fedsim.runtime import run

    config = load_config(CONFIGS / name, [f"{k}={v}" for k, v in {**TOY, "output_dir": str(tmp_path / "run"), **overrides}.items()])
    run(config, progress=False)
    return tmp_path / "run", config


def check_run(out: Path, config, eval_sets: list[str], at_least: int | None = None) -> list[dict]:
    """One round, every client trained its steps, an exact aggregate, a finite evaluation with a metric for each of
    ``eval_sets`` that the sampled evaluation rows hold (at least ``at_least`` of them; all by default), the adapter."""
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    assert len(rounds) == config.train.rounds == 1
    last = rounds[-1]
    assert last["clients_ok"] == config.clients.per_round
    # fed-sb is exact; the global state is kept in the model's dtype, so a bf16 run reports R's bf16 rounding (2^-9)
    assert last["agg_error"] < (1e-2 if config.model.dtype == "bfloat16" else 1e-5)
    assert last["train_loss"] == last["train_loss"] and last["eval_loss"] == last["eval_loss"]
    assert 0.0 <= last["eval_metric"] <= 1.0
    scored = json.loads((out / "data" / "meta.json").read_text())["eval_sets"]
    assert set(scored) <= set(eval_sets) and len(scored) >= (len(eval_sets) if at_least is None else at_least)
    for name in scored:
        assert 0.0 <= last[f"eval_metric_{name}"] <= 1.0
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert all(row["steps"] == config.train.local_steps for row in clients)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["trainable_adapter_parameters"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    return rounds


def check_peft_export(out: Path, model_dir: str, causal: bool) -> None:
    """Stock PEFT loads the exported adapter over the base checkpoint, and it changes the model's output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {t.split(".")[-1] for t in adapter["target_modules"]} == TARGETS
    if causal:
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter")).eval()
        ids = torch.tensor([[1, 5, 9, 14, 20]])
        with torch.no_grad():
            assert not torch.allclose(base(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-6)


def test_mistral_7b_metamathqa_gsm8k_config(ray_local, tmp_path_factory, tmp_path):
    needs(GSM8K, COMMONSENSE)
    model_dir = tiny_llm(tmp_path_factory, "mistral")
    out, config = run_config("mistral-7b-metamathqa-gsm8k-gpu.yaml", tmp_path, {
        "model.name": model_dir, "workload.path": write_metamathqa(tmp_path / "MetaMathQA-395K.json"),
        "workload.options.eval_path": GSM8K / "test.jsonl",
        "model.gradient_checkpointing": "true",  # not what the paper ran; exercised here
    })
    assert config.model.dtype == "bfloat16" and config.train.micro_batch_size == 1 and config.train.schedule == "cosine"
    check_run(out, config, ["gsm8k"])
    check_peft_export(out, model_dir, causal=True)


def test_gemma_2_9b_metamathqa_math_config(ray_local, tmp_path_factory, tmp_path):
    needs(GSM8K, COMMONSENSE)
    model_dir = tiny_llm(tmp_path_factory, "gemma2")
    out, config = run_config("gemma-2-9b-metamathqa-math-gpu.yaml", tmp_path, {
        "model.name": model_dir, "workload.path": write_metamathqa(tmp_path / "MetaMathQA-395K.json"),
        "workload.options.eval_path": write_math_test(tmp_path / "MATH"), "workload.eval_limit": 4,
    })
    assert config.model.dtype == "bfloat16" and config.train.micro_batch_size == 1
    check_run(out, config, ["math"])
    check_peft_export(out, model_dir, causal=True)


def test_llama_3_2_3b_commonsense_config(ray_local, tmp_path_factory, tmp_path):
    needs(GSM8K, COMMONSENSE)
    model_dir = tiny_llm(tmp_path_factory, "llama")
    out, config = run_config("llama-3.2-3b-commonsense-gpu.yaml", tmp_path, {
        "model.name": model_dir, "workload.path": write_commonsense(tmp_path / "commonsense"),
        "train.micro_batch_size": 2, "workload.eval_limit": 16,  # the config's 8 of 192, at the toy batch of 4
    })
    assert config.model.dtype == "bfloat16" and config.train.schedule == "linear"
    check_run(out, config, list(config.workload.options["eval_sets"]), at_least=4)  # 16 rows drawn from 8 sets
    check_peft_export(out, model_dir, causal=True)


def test_bert_base_snli_config(ray_local, tiny_model_dir, tmp_path):
    """The private SNLI config. Its privacy section is refused at start as it stands (a pooled LoRA-SB init reads the
    clients' data, and the config gives no privacy.init_noise_multiplier: fixed on another branch), so this run
    sets one: the init is then private too and counted."""
    needs(SNLI)
    out, config = run_config("bert-base-snli-gpu.yaml", tmp_path, {
        "model.name": tiny_model_dir, "workload.path": SNLI, "workload.options.train_split": "test",
        "clients.count": 3, "clients.per_round": 3, "privacy.init_noise_multiplier": 5.0,
    })
    assert config.privacy.enabled and config.privacy.epsilon == 3.0 and config.model.target_modules == ["query", "value"]
    check_run(out, config, [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["enabled"] and 0 < summary["privacy"]["epsilon_max"] <= 3.0
