"""Ravan through `fedsim run` on the session's local Ray: its aggregate exact in every round, its heads' blocks what
travels, and the bytes it measured what `fedsim comm`'s replay of the method's own code predicts."""

import json

import pyarrow.parquet as pq
import torch

from analysis.comm import predict_run
from fedsim.cli import main
from test_end_to_end import final_state

SETTINGS = ["workload.train_limit=60", "workload.eval_limit=16", "clients.count=3", "clients.per_round=2", "clients.partition=iid",
            "clients.ranks=[4,2]", "method.rank=4", "method.ravan_heads=2", "train.rounds=3", "train.local_steps=2",
            "train.batch_size=4", "runtime.workers=1"]


def test_ravan_run_is_exact_and_its_bytes_are_predicted(ray_local, tiny_model_dir, tmp_path, capsys):
    """2 heads of rank 2, clients of rank 4 and 2 (a client of rank 2 trains the first head): ``agg_error`` ≤ 1e-6 in
    every round (float32 storage of R; measured 1.5e-8 to 3e-8), R block-diagonal at the end, each trained client's upload its
    heads' blocks (r²/h numbers a layer, 2 layers here), and measured bytes = predicted bytes, up and down, exactly."""
    out = tmp_path / "runs"
    assert main(["run", f"output_dir={out}", f"model.name={tiny_model_dir}", *SETTINGS, "--methods", "ravan", "--quiet"]) == 0
    run_dir = out / "ravan"
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pylist()
    assert len(rounds) == 3 and max(r["agg_error"] for r in rounds) <= 1e-6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["max_agg_error"] <= 1e-6
    assert summary["trainable_adapter_parameters"] == 2 * 2 * 4**2 // 2  # 2 layers × (query, value) × r²/h
    state = final_state(run_dir)
    Rs = [value for key, value in state.items() if key.endswith("lora_R")]
    assert Rs and all(not R[:2, 2:].any() and not R[2:, :2].any() and R[:2, :2].any() for R in Rs)
    prediction = predict_run(run_dir, tolerance=0.0)
    assert not any(entry["flag"] for entry in prediction.rounds), prediction.rounds
    totals = prediction.totals()
    assert totals["bytes_up"] == totals["pred_bytes_up"] > 0 and totals["bytes_down"] == totals["pred_bytes_down"] > 0
    assert main(["comm", "--model", tiny_model_dir, "--method", "ravan", "--rank", "4", "method.ravan_heads=2"]) == 0
    assert any(line.startswith("ravan ") for line in capsys.readouterr().out.splitlines())
    assert torch.isfinite(torch.tensor([r["eval_metric"] for r in rounds])).all()
