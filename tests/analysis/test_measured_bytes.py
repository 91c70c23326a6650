"""Measured bytes of a real run of every method (a real local Ray) against the analytic model's prediction, to the byte.

One run per method is ~12 s of Ray start-up on 2 cores; by default the methods whose messages differ in kind run (the
six newer ones, Fed-SB's R, FedEx-LoRA's residual and FLoRA's stacked downlinks); FEDSIM_TEST_EVERY_METHOD=1 runs all.
experiments/comm-scaling (committed results) compares every method at 10, 100 and 1000 clients the same way.
"""

import os

import pyarrow.parquet as pq
import pytest

from analysis.comm import model_shapes, predict_run
from fedsim.methods import METHODS
from fedsim.config import load_config
from fedsim.runtime import run_comparison

BASE = {
    "model.name": None, "workload.name": "bbc-news", "workload.train_limit": 120, "workload.eval_limit": 16,
    "workload.max_length": 32, "clients.count": 6, "clients.per_round": 4, "clients.partition": "iid",
    "clients.dropout": 0.2, "train.rounds": 2, "train.local_steps": 1, "train.batch_size": 4, "train.lr": 0.01,
    "runtime.workers": 1, "adapters.init_samples": 8, "adapters.init_batch_size": 8, "method.rank": 4,
    "method.switch_round": 1, "eval.batch_size": 16,
}


TESTED = list(METHODS) if os.environ.get("FEDSIM_TEST_EVERY_METHOD") == "1" else [
    "fed-sb", "fedex-lora", "flora", "fedsa-lora", "rolora", "fedsvd", "flexlora", "hetlora", "lora-fair"]


@pytest.fixture(scope="module")
def all_methods(ray_local, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("measured")
    configs = []
    for method in TESTED:
        items = {**BASE, "model.name": tiny_model_dir, "method.name": method, "output_dir": str(root / method)}
        configs.append(load_config(None, [f"{k}={v}" for k, v in items.items()]))
    built = {**BASE, "model.name": tiny_model_dir, "method.name": "fed-sb", "output_dir": str(root / "fed-sb-built-at-client"),
             "adapters.init_data": "public", "adapters.init_at": "client"}  # B and A built by each client
    configs.append(load_config(None, [f"{k}={v}" for k, v in built.items()]))
    run_comparison(configs, str(root), progress=False)
    return root


def test_measured_bytes_match_the_prediction_when_clients_build_b_and_a(all_methods):
    """adapters.init_at=client: round 0 sends nothing down, a later first contact what changed since (R, the head)."""
    prediction = predict_run(all_methods / "fed-sb-built-at-client")
    for row in prediction.rounds:
        assert row["bytes_up"] == row["pred_bytes_up"] and row["bytes_down"] == row["pred_bytes_down"], row
    assert prediction.rounds[0]["bytes_down"] == 0 < prediction.rounds[1]["bytes_down"]
    assert prediction.totals()["bytes_down"] < predict_run(all_methods / "fed-sb").totals()["bytes_down"]


@pytest.mark.parametrize("method", TESTED)
def test_measured_bytes_match_the_prediction(all_methods, method):
    prediction = predict_run(all_methods / method)
    assert len(prediction.rounds) == 2
    for row in prediction.rounds:
        assert row["bytes_up"] == row["pred_bytes_up"] and row["bytes_down"] == row["pred_bytes_down"], row
    assert not prediction.flagged
    assert prediction.rounds[0]["bytes_down"] > 0  # round 0: the whole state to every sampled client
    totals = prediction.totals()
    assert totals["bytes_up"] == totals["pred_bytes_up"]  # exact, keys included
    assert totals["bytes_down"] == totals["pred_bytes_down"]


def test_schedule_exercises_first_contact_returning_and_dropped_clients(all_methods):
    clients = pq.read_table(all_methods / "fed-sb" / "clients.parquet").to_pylist()
    statuses = {row["status"] for row in clients}
    assert "dropped" in statuses and "ok" in statuses
    first = {row["client_id"] for row in clients if row["round"] == 0}
    assert any(row["client_id"] in first for row in clients if row["round"] == 1)  # a returning client
    assert any(row["client_id"] not in first for row in clients if row["round"] == 1)  # a new one


def test_a_wrong_prediction_is_flagged(all_methods, tmp_path):
    """The check can fail: the same run, with its config claiming another rank, is flagged."""
    import shutil

    copy = tmp_path / "fed-sb"
    shutil.copytree(all_methods / "fed-sb", copy, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("rank: 4", "rank: 5", 1))
    prediction = predict_run(copy)
    assert prediction.flagged
    assert prediction.max_rel_err() > 0.05


def test_formula_shapes_agree_with_the_model_built_on_the_meta_device(tiny_model_dir):
    for targets in (["query", "value"], ["query", "key", "value", "dense"]):
        formula = model_shapes(tiny_model_dir, targets, num_labels=5, head=True)
        meta = model_shapes(tiny_model_dir, targets, num_labels=5, head=True, exact=True)
        assert formula.layers == meta.layers and formula.head == meta.head
