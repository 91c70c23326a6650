"""``workload.validation`` through `fedsim run`: the run scores N rows carved out of the training file, not the
evaluation file, and trains on none of them."""

import json

import pyarrow.parquet as pq

from fedsim.cli import main


def test_a_run_scores_its_validation_rows_and_trains_on_the_rest(ray_local, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    settings = ["workload.train_limit=40", "workload.eval_limit=null", "workload.validation=10", "clients.count=2",
                "clients.per_round=2", "train.rounds=1", "train.local_steps=1", "train.batch_size=4", "method.name=fedit",
                "runtime.workers=1"]
    assert main(["run", f"output_dir={out}", f"model.name={tiny_model_dir}", *settings, "--quiet"]) == 0
    scored = pq.read_table(out / "data" / "eval.parquet").column("text").to_pylist()
    trained = pq.read_table(out / "data" / "train.parquet").column("text").to_pylist()
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert len(scored) == meta["eval_rows"] == 10 and len(trained) == meta["train_rows"] == 40
    assert not set(scored) & set(trained)
    accuracy = pq.read_table(out / "rounds.parquet").column("eval_metric").to_pylist()[-1]
    assert abs(accuracy * 10 - round(accuracy * 10)) < 1e-9  # a share of the 10 validation rows
