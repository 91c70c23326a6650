"""runtime.cohort_size through the worker (a plain object, no Ray) and a whole run on a real local Ray.

The cohort engine's exactness is tested in tests/training/test_engine.py (float64, every method); here the same numbers
must come out of the worker's hook and of ``fedsim run``: uploads, rows and the final global state. In float32 a
client's result also depends on rounding (its batch padded longer moves it by 5e-6 on this small BERT; see
tests/training/test_engine.py), so LoRA's A and B are compared to 1e-4 and Fed-SB's R, which starts far from Adam's ε,
to 1e-5.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import load_config
from fedsim.partition import write_partitioned
from fedsim.prepare import DataPlan
from fedsim.runtime import run
from fedsim.runtime.plan import RunPlan
from fedsim.runtime.worker import ClientWorker
from training.test_engine import real_sentences

SIZES = [5, 9, 3, 12, 7, 4, 10, 6]


@pytest.fixture()
def data_dir(tmp_path):
    texts, labels = real_sentences(sum(SIZES) + 10)
    owners = [client for client, n in enumerate(SIZES) for _ in range(n)]
    table = pa.table({"text": texts[: len(owners)], "text_pair": pa.nulls(len(owners), pa.string()), "label": labels[: len(owners)]})
    write_partitioned(table, owners, str(tmp_path / "train.parquet"))
    tail = pa.table({"text": texts[-10:], "text_pair": pa.nulls(10, pa.string()), "label": labels[-10:]})
    write_partitioned(tail, [0] * 10, str(tmp_path / "eval.parquet"))
    return tmp_path


def make_worker(data_dir, model_dir, **overrides):
    config = load_config(None, [f"model.name={model_dir}", "model.dropout=0", "train.local_steps=3", "train.batch_size=4",
                                "workload.max_length=24", "clients.count=8", "clients.per_round=8", "clients.ranks=[1,2,3,4]",
                                "adapters.init_samples=8", "adapters.init_batch_size=4", *[f"{k}={v}" for k, v in overrides.items()]])
    data = DataPlan(data_dir=str(data_dir), workload="test", num_labels=2, label_names=["a", "b"], train_rows=sum(SIZES),
                    eval_rows=10, client_sizes=SIZES, client_eval_sizes=[0] * 8, client_chars=[100] * 8, eval_chunks=1)
    return ClientWorker(RunPlan.resolve(config, data, str(data_dir)), 0)


def without_timing(rows: list[dict]) -> list[dict]:
    """Rows without train_s and train_loss, NaN read as None (so that equal rows compare equal)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items() if k not in ("train_s", "train_loss")} for r in rows]


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("method_name, tolerance", [("fed-sb", 1e-5), ("fedit", 1e-4)])
def test_the_worker_trains_cohorts_to_the_same_uploads_and_rows(data_dir, tiny_model_dir, method_name, tolerance):
    one = make_worker(data_dir, tiny_model_dir, **{"method.name": method_name})
    three = make_worker(data_dir, tiny_model_dir, **{"method.name": method_name, "runtime.cohort_size": 3})
    state = one.initial_state()
    uploads_one, rows_one = one.train(0, state, [7, 0, 3, 5, 1, 6, 2, 4])
    uploads_three, rows_three = three.train(0, state, [7, 0, 3, 5, 1, 6, 2, 4])
    assert [u["client_id"] for u in uploads_three] == [u["client_id"] for u in uploads_one] == list(range(8))
    for a, b in zip(uploads_three, uploads_one):
        assert a["num_samples"] == b["num_samples"] and a["tensors"].keys() == b["tensors"].keys()
        for key in b["tensors"]:
            assert relative_error(a["tensors"][key], b["tensors"][key]) <= tolerance, (a["client_id"], key)
    assert without_timing(rows_three) == without_timing(rows_one)
    assert [r["train_loss"] for r in rows_three] == pytest.approx([r["train_loss"] for r in rows_one], rel=1e-5)
    assert len({r["rank"] for r in rows_one}) > 1 and all(r["train_s"] > 0 for r in rows_three)


def test_fedsim_run_with_cohorts_gives_the_same_global_state(ray_local, tiny_model_dir, tmp_path):
    """Two rounds of Fed-SB (rank-heterogeneous clients, the head trained) on 2 workers, cohorts of 4 against one at a time."""
    def config(name, cohort_size):
        overrides = {
            "output_dir": str(tmp_path / name), "model.name": tiny_model_dir, "model.dropout": 0, "workload.name": "bbc-news",
            "workload.train_limit": 200, "workload.eval_limit": 20, "workload.max_length": 32, "clients.count": 12,
            "clients.per_round": 10, "clients.ranks": "[2,3,4]", "train.rounds": 2, "train.local_steps": 2, "train.batch_size": 4,
            "runtime.workers": 2, "adapters.init_samples": 16, "adapters.init_batch_size": 8, "method.rank": 4,
            "runtime.cohort_size": cohort_size,
        }
        return load_config(None, [f"{k}={v}" for k, v in overrides.items()])

    run(config("one", 1), progress=False)
    run(config("four", 4), progress=False)
    one, four = (load_file(sorted(Path(tmp_path, n, "checkpoints").glob("round_*.safetensors"))[-1]) for n in ("one", "four"))
    assert one.keys() == four.keys() and any(key.endswith("lora_R") for key in one)
    for key in one:
        assert relative_error(four[key], one[key]) <= 1e-5, key
    # which worker trains a client follows the measured train_s of the round before (the driver balances): not compared
    clients = {n: [{k: v for k, v in row.items() if k != "worker_id"} for row in without_timing(pq.read_table(tmp_path / n / "clients.parquet").to_pylist())]
               for n in ("one", "four")}
    assert clients["four"] == clients["one"] and len(clients["one"]) == 20
    assert all(r["status"] == "ok" for r in clients["four"])
    assert torch.isfinite(torch.tensor([r["eval_loss"] for r in pq.read_table(tmp_path / "four" / "rounds.parquet").to_pylist()])).all()
