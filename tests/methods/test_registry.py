"""A method is one class registered in one place: that makes it valid, runnable, counted and listed."""

import sys
from pathlib import Path

import cloudpickle
import pyarrow.parquet as pq
import pytest
import torch

from analysis.comm import comm_table, predict_run
from fedsim.config import load_config
from fedsim.methods import METHODS, Method, methods_table, register
from fedsim.adapters.state import HEAD_PREFIX
from fedsim.methods.base import weighted_mean

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_method_table_is_the_registry():
    """README.md shows `fedsim methods`: a method registered without updating README fails here."""
    assert methods_table() in README.read_text()


@pytest.fixture()
def toy_method():
    """A method that exists only in this test: clients train B; the server keeps the largest-weight client's B."""

    @register("toy-argmax", paper="https://example.org/toy", trains="B", rule="the heaviest client's B", exact="no (toy)")
    class ToyArgmax(Method):
        def trained_kinds(self, round_idx):
            return ("lora_B",)

        def aggregate(self, state, uploads, round_idx):
            uploads, weights = self.ordered(uploads)
            heaviest = uploads[max(range(len(uploads)), key=lambda i: (weights[i], -uploads[i].client_id))]
            new = {key: value for key, value in heaviest.tensors.items() if not key.startswith(HEAD_PREFIX)}
            new.update({key: weighted_mean([u.tensors[key] for u in uploads], weights)
                        for key in uploads[0].tensors if key.startswith(HEAD_PREFIX)})
            return self.finish(state, {**state, **new}, new, uploads, weights)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors have no copy of this test module
    yield ToyArgmax
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    del METHODS["toy-argmax"]


def test_a_method_registered_in_a_test_is_runnable_counted_and_listed(toy_method, ray_local, tiny_model_dir, tmp_path):
    from analysis.report import write_report
    from fedsim.runtime import run

    config = load_config(None, [f"{k}={v}" for k, v in {
        "output_dir": str(tmp_path / "toy"), "model.name": tiny_model_dir, "method.name": "toy-argmax", "method.rank": 4,
        "workload.train_limit": 80, "workload.eval_limit": 16, "workload.max_length": 24, "clients.count": 6,
        "clients.per_round": 3, "train.rounds": 2, "train.local_steps": 1, "train.batch_size": 4, "runtime.workers": 2,
    }.items()])
    run(config, progress=False)  # valid as method.name, and runnable on Ray
    rounds = pq.read_table(tmp_path / "toy" / "rounds.parquet").to_pylist()
    assert len(rounds) == 2 and all(r["agg_error"] > 0 for r in rounds)
    prediction = predict_run(tmp_path / "toy")  # countable: its own code, on meta tensors, predicts what it sent
    assert prediction.totals()["bytes_up"] == prediction.totals()["pred_bytes_up"]
    assert prediction.totals()["bytes_down"] == prediction.totals()["pred_bytes_down"]
    row = comm_table("bert-base", "toy-argmax", [8], [10], target_modules=["query", "value"])[0]
    assert row.up_params == 24 * 768 * 8  # B of 24 layers
    assert "| `toy-argmax` | B | the heaviest client's B | no (toy) |" in methods_table()
    report = (Path(write_report([str(tmp_path / "toy")], str(tmp_path / "report"))).read_text())
    assert "toy-argmax" in report
    assert torch.isfinite(torch.tensor([r["eval_metric"] for r in rounds])).all()
