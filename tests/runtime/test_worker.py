"""The ClientWorker as a plain object (no Ray): own clients only, one model load, stragglers, corrupt clients."""

import pyarrow as pa
import pytest

from fedsim.config import load_config
from fedsim.methods import nbytes
from fedsim.partition import write_partitioned
from fedsim.runtime.aggregator import Aggregator
from fedsim.runtime.worker import ClientWorker


@pytest.fixture()
def data_dir(tmp_path):
    texts = [f"sample text number {i} about {'sport' if i % 2 else 'business'}" for i in range(40)]
    table = pa.table({"text": texts, "text_pair": pa.nulls(40, pa.string()), "label": [i % 2 for i in range(40)]})
    write_partitioned(table, [i % 8 for i in range(40)], str(tmp_path / "train.parquet"))
    write_partitioned(table.slice(0, 10), [0] * 10, str(tmp_path / "eval.parquet"))
    return tmp_path


def make_worker(data_dir, model_dir, **overrides):
    config = load_config(None, [f"model.name={model_dir}", "method.name=fed-sb", "train.local_steps=1",
                                "train.batch_size=2", "workload.max_length=16", "clients.count=8", "clients.per_round=2",
                                *[f"{k}={v}" for k, v in overrides.items()]])
    from fedsim.config import config_to_dict

    return ClientWorker(config_to_dict(config), 0, 1, str(data_dir), [1, 3, 5], num_labels=2), config


def test_worker_owns_only_its_clients_and_loads_the_model_once(data_dir, tiny_model_dir):
    worker, config = make_worker(data_dir, tiny_model_dir)
    assert sorted(worker.client_rows) == [1, 3, 5] and all(len(rows) == 5 for rows in worker.client_rows.values())
    state = worker.initial_state([1, 3, 5], 4, 2)
    uploads, rows = worker.run_cohort(0, state, [5, 1])
    assert [r["client_id"] for r in rows] == [1, 5] and all(r["status"] == "ok" for r in rows)
    assert [u["client_id"] for u in uploads] == [1, 5]
    assert rows[0]["bytes_up"] == nbytes(uploads[0]["tensors"])
    assert worker.model_loads == 1
    result = worker.evaluate(state)
    assert result["count"] == 10 and 0 <= result["correct"] <= 10


def test_deadline_turns_late_clients_into_stragglers(data_dir, tiny_model_dir):
    worker, _ = make_worker(data_dir, tiny_model_dir, **{"runtime.deadline_s": 1e-9})
    state = worker.initial_state([1], 4, 2)
    uploads, rows = worker.run_cohort(0, state, [1, 3, 5])
    assert [r["status"] for r in rows] == ["straggler"] * 3 and uploads == []
    worker.config.runtime.deadline_s = 3600.0
    uploads, rows = worker.run_cohort(0, state, [1, 3, 5])
    assert [r["status"] for r in rows] == ["ok"] * 3 and len(uploads) == 3


def test_corrupt_clients_are_flagged_nonfinite_and_not_uploaded(data_dir, tiny_model_dir):
    worker, config = make_worker(data_dir, tiny_model_dir, **{"clients.corrupt": "[3]"})
    state = worker.initial_state([1], 4, 2)
    uploads, rows = worker.run_cohort(0, state, [1, 3])
    assert [r["status"] for r in rows] == ["ok", "nonfinite"]
    aggregator = Aggregator(__import__("fedsim.config", fromlist=["config_to_dict"]).config_to_dict(config))
    aggregator.set_state(state)
    assert aggregator.aggregate(0, uploads)["clients_aggregated"] == 1


def test_first_contact_gets_the_whole_state_then_the_broadcast(data_dir, tiny_model_dir):
    worker, config = make_worker(data_dir, tiny_model_dir, **{"method.train_head": "false"})
    from fedsim.config import config_to_dict

    aggregator = Aggregator(config_to_dict(config))
    state = worker.initial_state([1], 4, 2)
    aggregator.set_state(state)
    first = aggregator.downlink_bytes([1, 3])
    assert first == {1: nbytes(state), 3: nbytes(state)}
    uploads, _ = worker.run_cohort(0, state, [1, 3])
    aggregator.aggregate(0, uploads)
    second = aggregator.downlink_bytes([1, 5])
    r_bytes = sum(v.numel() * 4 + len(k) for k, v in state.items() if k.endswith("lora_R"))
    assert second == {1: r_bytes, 5: nbytes(state)}


def test_the_init_reads_any_clients_rows_and_sends_only_the_factors(data_dir, tiny_model_dir):
    """The pooled calibration sample is gathered by one worker, whichever clients it owns: the same state from a
    worker that owns none of them as from one that owns them all; what comes back is B, R, A (and the head)."""
    import torch

    config = load_config(None, [f"model.name={tiny_model_dir}", "method.name=fed-sb", "method.rank=4", "workload.max_length=16",
                                "clients.count=8", "clients.per_round=2"])
    from fedsim.config import config_to_dict

    owner = ClientWorker(config_to_dict(config), 0, 2, str(data_dir), [0, 2], num_labels=2)
    stranger = ClientWorker(config_to_dict(config), 1, 2, str(data_dir), [5], num_labels=2)
    state, again = owner.initial_state([0, 2], 3, 2), stranger.initial_state([0, 2], 3, 2)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    kinds = {key.rsplit(".", 1)[1] for key in state if not key.startswith("head:")}
    assert kinds == {"lora_A", "lora_B", "lora_R"}
    assert all(v.device.type == "cpu" for v in state.values())
    assert all(v.shape[0] == 4 for k, v in state.items() if k.endswith(("lora_A", "lora_R")))
    other = owner.initial_state([0, 3], 3, 2)  # another sample, another init
    assert not all(torch.equal(state[k], other[k]) for k in state if k.endswith("lora_R"))
