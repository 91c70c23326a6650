"""server.optimizer through `fedsim run` on the session's local Ray: avg at lr 1 is the run without it, bit for bit; adam
is another run; an adam run stopped and resumed is the uninterrupted one, moments included; a method whose aggregate is no
mean refuses in one line, exit 2, before anything is written."""

from pathlib import Path

import pyarrow.parquet as pq
import torch

from fedsim.cli import main
from fedsim.config import load_config
from fedsim.runtime import run
from test_end_to_end import assert_same_run, final_state, make_config

SMALL = {"workload.train_limit": 120, "workload.eval_limit": 40, "clients.count": 6, "clients.per_round": 4, "clients.partition": "iid",
         "train.rounds": 3, "runtime.workers": 1}


def test_avg_at_lr_1_is_the_default_bit_for_bit_and_adam_is_not(ray_local, tiny_model_dir, tmp_path):
    out = tmp_path / "server"
    settings = [f"output_dir={out}", f"model.name={tiny_model_dir}", *(f"{k}={v}" for k, v in SMALL.items()), "method.rank=4",
                "train.local_steps=2", "train.batch_size=4", "train.lr=0.01", "adapters.init_samples=16", "adapters.init_batch_size=8"]
    members = ["fed-sb", "fed-sb:server.optimizer=avg:server.lr=1", "fed-sb:server.optimizer=adam:server.lr=0.01",
               "fedsa-lora", "fedsa-lora:server.optimizer=avg:server.lr=1"]
    assert main(["run", *settings, "--methods", ",".join(members), "--quiet"]) == 0
    default, identity, adam = out / "fed-sb", out / "fed-sb-optimizeravg-lr1", out / "fed-sb-optimizeradam-lr0.01"
    assert "optimizer: adam" in (adam / "config.yaml").read_text() and "lr: 1.0" in (identity / "config.yaml").read_text()
    assert_same_run(default, identity)  # the final tensors (torch.equal) and every row but the timings
    assert_same_run(out / "fedsa-lora", out / "fedsa-lora-optimizeravg-lr1")  # personalised: A averaged, B kept
    plain, stepped = final_state(default), final_state(adam)
    assert plain.keys() == {k for k in stepped if not k.startswith("server:")}
    changed = {k for k in plain if not torch.equal(plain[k], stepped[k])}
    assert changed and all(k.endswith(".lora_R") or k.startswith("head:") for k in changed)  # B and A stay the frozen ones
    assert {k.split(":", 2)[2] for k in stepped if k.startswith("server:optimizer.v:")} == changed
    accuracy = {run_dir.name: pq.read_table(run_dir / "rounds.parquet").column("eval_metric").to_pylist()[-1]
                for run_dir in (default, adam)}
    print(f"final accuracy, fed-sb avg vs adam (lr 0.01): {accuracy}")
    bytes_down = [pq.read_table(d / "clients.parquet").column("bytes_down").to_pylist() for d in (default, adam)]
    assert bytes_down[0] == bytes_down[1]  # the stepped R goes down in the same bytes


def test_an_adam_run_stopped_and_resumed_is_the_uninterrupted_run(ray_local, tiny_model_dir, tmp_path):
    overrides = {**SMALL, "method.name": "fedit", "server.optimizer": "adam", "server.lr": 0.005}
    run(make_config(tmp_path, tiny_model_dir, "adam-whole", **overrides), progress=False)
    run(make_config(tmp_path, tiny_model_dir, "adam-stopped", **{**overrides, "train.rounds": 1}), progress=False)
    resumed = load_config(str(tmp_path / "adam-stopped" / "config.yaml"), ["train.rounds=3"])
    run(resumed, resume=str(tmp_path / "adam-stopped"), progress=False)
    assert_same_run(tmp_path / "adam-whole", tmp_path / "adam-stopped")  # every tensor of the checkpoint: state, m and v
    saved = final_state(tmp_path / "adam-whole")
    assert any(k.startswith("server:optimizer.m:") for k in saved) and any(k.startswith("server:optimizer.v:") for k in saved)


def test_a_method_whose_aggregate_is_no_mean_refuses_in_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "refused"
    args = ["run", f"output_dir={out}", f"model.name={tiny_model_dir}", "method.name=fedsvd", "server.optimizer=yogi"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fedsim: error: server.optimizer: yogi steps on the change of the averaged tensors, but fedsvd does "
                            "not aggregate by a weighted mean") and "\n" not in error
    assert not Path(out).exists()
