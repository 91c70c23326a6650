"""The classification head's two schedules beside "trained and averaged every round", through `fedsim run`:
``method.head_rounds`` (trained and averaged in a warm-up, then frozen) and ``method.local_head`` (each client trains
and keeps its own head, which is never uploaded). Both are checked in the checkpoints, in the clients' store, in the
bytes on the wire, and against `fedsim comm`'s replay at tolerance 0."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from analysis.comm import predict_run
from fedsim.cli import main
from fedsim.config import load_config
from fedsim.errors import UsageError

SETTINGS = ["workload.train_limit=60", "workload.eval_limit=16", "clients.count=3", "clients.per_round=3",
            "clients.partition=iid", "method.rank=4", "train.rounds=3", "train.local_steps=2", "train.batch_size=4",
            "train.lr=0.05", "runtime.workers=1"]


def heads(state: dict) -> dict:
    return {key: value for key, value in state.items() if key.startswith("head:")}


def initial_head(run_dir: Path) -> dict:
    """The head every run starts from: the model's seeded init (``fedsim.modeling.load_model``)."""
    from fedsim.adapters.state import HEAD_PREFIX, head_parameters
    from fedsim.modeling import load_model

    config = load_config(run_dir / "config.yaml")
    num_labels = json.loads((run_dir / "data" / "meta.json").read_text())["num_labels"]
    return {HEAD_PREFIX + name: p.detach().clone() for name, p in head_parameters(load_model(config, num_labels)).items()}


def test_a_head_warmed_up_then_frozen_is_sent_only_in_the_warm_up(ray_local, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", f"output_dir={out}", f"model.name={tiny_model_dir}", *SETTINGS, "method.head_rounds=1",
                 "--methods", "fed-sb,fedit", "--quiet"]) == 0
    for method in ("fed-sb", "fedit"):
        run_dir = out / method
        checkpoints = sorted(Path(run_dir, "checkpoints").glob("round_*.safetensors"))
        assert [c.stem for c in checkpoints][-2:] == ["round_0001", "round_0002"]
        after_1, after_2 = heads(load_file(checkpoints[-2])), heads(load_file(checkpoints[-1]))
        start = initial_head(run_dir)
        assert sorted(after_2) == sorted(start) == ["head:classifier.bias", "head:classifier.weight"]
        assert all(torch.equal(after_1[key], after_2[key]) for key in after_2), method  # frozen after round 0
        assert any(not torch.equal(after_2[key], start[key]) for key in after_2), method  # trained in round 0
        clients = pq.read_table(run_dir / "clients.parquet").to_pylist()
        up = [{row["bytes_up"] for row in clients if row["round"] == r} for r in range(3)]
        assert all(len(sizes) == 1 for sizes in up), up
        head_bytes = sum(t.numel() * t.element_size() for t in start.values())  # its tensors; the message adds their names
        assert min(up[0]) - head_bytes >= min(up[1]) == min(up[2]), (method, up)  # the head goes up in round 0 only
        prediction = predict_run(run_dir, tolerance=0.0)
        assert not any(entry["flag"] for entry in prediction.rounds), (method, prediction.rounds)


def test_a_local_head_stays_with_its_client_and_scores_the_rounds(ray_local, tiny_model_dir, tmp_path):
    from fedsim.client_state import ClientStore

    out = tmp_path / "runs"
    assert main(["run", f"output_dir={out}", f"model.name={tiny_model_dir}", *SETTINGS, "method.local_head=true",
                 "eval.per_client=0.2", "--methods", "fed-sb,fedit", "--quiet"]) == 0
    for method in ("fed-sb", "fedit"):
        run_dir = out / method
        start = initial_head(run_dir)
        final = load_file(sorted(Path(run_dir, "checkpoints").glob("round_*.safetensors"))[-1])
        assert all(torch.equal(final[key], start[key]) for key in start), method  # the global head is never averaged into
        store = ClientStore(run_dir / "client_state")
        own = [heads(store.read(client_id, 2)) for client_id in range(3)]
        assert all(sorted(mine) == sorted(start) for mine in own), method
        assert all(not torch.equal(mine["head:classifier.weight"], start["head:classifier.weight"]) for mine in own)
        assert not torch.equal(own[0]["head:classifier.weight"], own[1]["head:classifier.weight"])  # one head a client
        rounds = pq.read_table(run_dir / "rounds.parquet").to_pylist()
        clients = pq.read_table(run_dir / "clients.parquet").to_pylist()
        sizes = json.loads((run_dir / "data" / "meta.json").read_text())["client_eval_sizes"]
        for row in rounds:  # no global head: the round's score is the clients' own, pooled over their held-out rows
            mine = [c for c in clients if c["round"] == row["round"]]
            pooled = sum(c["eval_metric"] * sizes[c["client_id"]] for c in mine) / sum(sizes[c["client_id"]] for c in mine)
            assert row["eval_metric"] == pytest.approx(pooled, abs=1e-9)
        prediction = predict_run(run_dir, tolerance=0.0)  # the head never travels up
        assert not any(entry["flag"] for entry in prediction.rounds), (method, prediction.rounds)


@pytest.mark.parametrize("overrides, field", [
    (["method.train_head=false", "method.head_rounds=2"], "method.train_head"),
    (["method.train_head=false", "method.local_head=true", "eval.per_client=0.1"], "method.train_head"),
    (["method.local_head=true"], "eval.per_client"),
    (["method.local_head=true", "eval.per_client=0.1", "method.head_rounds=2"], "method.head_rounds"),
    (["method.head_rounds=0"], "method.head_rounds"),
])
def test_head_schedules_that_cannot_work_are_refused_in_one_line(overrides, field):
    with pytest.raises(UsageError) as error:
        load_config(None, overrides)
    assert str(error.value).startswith(f"{field}:") and "\n" not in str(error.value)
