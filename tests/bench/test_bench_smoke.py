"""Smoke test of bench/: the helpers' arithmetic, gpu.py's record where no GPU exists, and the cohort benches at toy
size on the CPU (no Ray, seconds each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs subprocesses

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_round_metrics_definitions():
    from common import round_metrics

    row = {"round": 1, "wall_s": 10.0, "train_s_sum": 17.0, "clients_trained": 100, "eval_s": 0.0, "downlink_s": 0.1,
           "wait_workers_s": 9.5, "aggregate_s": 0.2, "checkpoint_s": 0.05, "parquet_s": 0.05,
           "run_cohort_s_per_worker": [8.9, 9.4], "train_s_per_worker": [8.4, 8.6]}
    m = round_metrics(row, workers=2)
    assert m["efficiency"] == pytest.approx(0.85)
    assert m["overhead_ms_per_client"] == pytest.approx(30.0)  # (10 × 2 − 17) / 100 s
    assert m["breakdown_s"]["rest_of_run_round"] == pytest.approx(0.1)
    assert m["worker_side"]["outside_train_local_ms_per_client"] == pytest.approx(13.0)
    assert m["worker_side"]["imbalance_idle_s"] == pytest.approx(0.5)


def test_gpu_bench_says_it_did_not_run_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu.py would run the real bench")
    env = {**os.environ, "FEDSIM_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py")], cwd=BENCH, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["run"] is False and "no CUDA device" in result["reason"]
    assert {"cpu_count", "cpu_model", "ram_gib", "torch", "ray", "date"} <= result["machine"].keys()


def test_gpu_cohort_section_runs_on_the_cpu_at_quick_size(tmp_path):
    """What a GPU session runs first (bench/gpu.py --sections cohort), proven here at toy size: Fed-SB and FedIT, K = 1 and 4."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu.py --quick would run on it")
    env = {**os.environ, "FEDSIM_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--quick", "--sections", "cohort", "--sizes", "1,4"], cwd=BENCH, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cohort = json.loads((tmp_path / "gpu.json").read_text())["cohort"]
    assert cohort["device"] == "cpu" and cohort["quick"]
    rows = {(r["method"], r["cohort_size"]): r for r in cohort["results"]}
    assert set(rows) == {(m, k) for m in ("fed-sb", "fedit") for k in (1, 4)}
    assert all(r["status"] == "ok" and r["tokens"] == 4 * 2 * 2 * 32 and r["tokens_per_s"] > 0 for r in rows.values())


def test_cohort_bench_writes_examples_per_second(tmp_path):
    env = {**os.environ, "FEDSIM_BENCH_RESULTS": str(tmp_path), "FEDSIM_BENCH_SCRATCH": str(tmp_path / "scratch")}
    done = subprocess.run([sys.executable, str(BENCH / "cohort.py"), "--quick", "--methods", "fed-sb", "--sizes", "1,2"], cwd=BENCH,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "cohort.json").read_text())
    assert [(r["method"], r["cohort_size"]) for r in result["results"]] == [("fed-sb", 1), ("fed-sb", 2)]
    assert all(r["examples"] == 2 * 2 * 4 and r["examples_per_s"] > 0 for r in result["results"])
    assert result["results"][0]["speed_up_over_k1"] == 1.0


def test_llm_scale_quick_runs_and_before_and_after_agree(tmp_path):
    """bench/llm_scale.py --quick: Mistral-7B's shapes ÷ 32, every part in seconds; the after paths' errors equal the
    before paths' (fedsim's d×k arithmetic up to issue 18), and the GPU section records why it did not run here."""
    pytest.importorskip("torch")
    env = {**os.environ, "FEDSIM_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCH / "llm_scale.py"), "--quick"], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "llm_scale.json").read_text())
    init = result["init"]["rows"]
    assert [row["kind"] for row in init] == ["q/o", "k/v", "gate/up", "down"]
    for row in init:
        assert row["after_s"] > 0 and row["before_s"] > 0
        assert 0 <= row["error_over_optimum_minus_1"] < 0.02 and row["energy_captured"] > 0.9
    assert result["init"]["total_s"]["after_s"] > 0
    aggregation = result["aggregation"]["rows"]
    assert {row["method"] for row in aggregation} == {"fed-sb", "fedit", "fedex-lora", "flora", "fra-lora"}
    for row in aggregation:
        assert row["after_error"] == pytest.approx(row["before_error"], rel=1e-6, abs=1e-9), row
    assert "fedit 4" in result["aggregation"]["round_s"]["after_s"]
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert result["gpu"]["run"] is False and "no CUDA device" in result["gpu"]["reason"]
