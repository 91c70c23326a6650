"""``adapters.head_init: public`` with ``method.train_head: false`` through `fedsim run`: the fitted head is in the round-0
state, stays frozen over the rounds, is downloaded once and never uploaded, and the measured bytes are what `fedsim
comm`'s replay predicts."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from analysis.comm import predict_run
from fedsim.cli import main

SETTINGS = ["workload.train_limit=60", "workload.eval_limit=16", "clients.count=3", "clients.per_round=2", "clients.partition=iid",
            "method.rank=4", "method.train_head=false", "adapters.head_init=public", "adapters.init_data=public",
            "adapters.init_samples=12", "train.rounds=2", "train.local_steps=2", "train.batch_size=4", "runtime.workers=1"]


def test_public_head_is_frozen_and_travels_once(ray_local, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", f"output_dir={out}", f"model.name={tiny_model_dir}", *SETTINGS, "--methods", "fed-sb,fedit", "--quiet"]) == 0
    for method in ("fed-sb", "fedit"):
        run_dir = out / method
        checkpoints = sorted(Path(run_dir, "checkpoints").glob("round_*.safetensors"))
        first, last = load_file(checkpoints[0]), load_file(checkpoints[-1])
        heads = [key for key in last if key.startswith("head:")]
        assert sorted(heads) == ["head:classifier.bias", "head:classifier.weight"], method
        assert all(torch.equal(first[key], last[key]) for key in heads), method  # frozen: no client trains it
        assert any(not torch.equal(first[key], last[key]) for key in last if not key.startswith("head:"))  # the adapters did train
        prediction = predict_run(run_dir, tolerance=0.0)
        assert not any(entry["flag"] for entry in prediction.rounds), (method, prediction.rounds)
