"""FedProx (``train.prox_mu``) and SCAFFOLD (``train.control_variates``) through `fedsim run`, on the session's local Ray:
the engine's local rules reach a run, change what it trains, and SCAFFOLD's control variates travel and are counted."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from analysis.comm import predict_run
from fedsim.cli import main
from test_end_to_end import final_state

SETTINGS = ["workload.train_limit=60", "workload.eval_limit=16", "clients.count=3", "clients.per_round=2", "clients.partition=iid",
            "method.rank=4", "train.rounds=3", "train.local_steps=2", "train.batch_size=4", "runtime.workers=1"]


def runs_by_setting(out: Path) -> dict[tuple, Path]:
    """Each run folder under ``out`` by (method, prox_mu, control_variates), read from its config.yaml."""
    found = {}
    for config_file in out.glob("*/config.yaml"):
        config = yaml.safe_load(config_file.read_text())
        found[(config["method"]["name"], config["train"]["prox_mu"], config["train"]["control_variates"])] = config_file.parent
    return found


def test_prox_mu_and_control_variates_reach_a_run(ray_local, tiny_model_dir, tmp_path):
    """μ = 0 is bit-identical to no key; μ = 0.1 differs; SCAFFOLD runs for Fed-SB and FedIT, its final state differs from
    the plain run, every client keeps its c_i, and the bytes it measured are what `fedsim comm`'s replay predicts."""
    out = tmp_path / "rules"
    members = ["fed-sb", "fed-sb:train.prox_mu=0", "fed-sb:train.prox_mu=0.1", "fed-sb:train.control_variates=true",
               "fedit", "fedit:train.control_variates=true"]
    assert main(["run", f"output_dir={out}", f"model.name={tiny_model_dir}", *SETTINGS, "--methods", ",".join(members), "--quiet"]) == 0
    runs = runs_by_setting(out)
    assert len(runs) == 5  # fed-sb with no key and with μ = 0 share a setting: two folders, one key
    a, b = final_state(out / "fed-sb"), final_state(out / "fed-sb-prox_mu0")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    proximal = final_state(runs[("fed-sb", 0.1, False)])
    assert any(not torch.equal(a[key], proximal[key]) for key in a)
    for name in ("fed-sb", "fedit"):
        scaffold_dir = runs[(name, 0.0, True)]
        scaffold, without = final_state(scaffold_dir), final_state(runs[(name, 0.0, False)])
        controls = {key for key in scaffold if key.startswith("server:control.")}  # c, checkpointed beside the state
        assert controls and {key for key in scaffold if not key.startswith("server:control.")} == without.keys()
        assert any(not torch.equal(scaffold[key], without[key]) for key in without)
        kept = list(Path(scaffold_dir, "client_state").rglob("*.safetensors"))
        assert kept  # each client's c_i, in the client store
        prediction = predict_run(scaffold_dir, tolerance=0.0)
        assert not any(entry["flag"] for entry in prediction.rounds), prediction.rounds
        rounds = pq.read_table(scaffold_dir / "rounds.parquet").to_pylist()
        plain_rounds = pq.read_table(runs[(name, 0.0, False)] / "rounds.parquet").to_pylist()
        assert all(r["bytes_up"] > p["bytes_up"] for r, p in zip(rounds, plain_rounds))  # Δc goes up every round
        assert rounds[-1]["bytes_down"] > plain_rounds[-1]["bytes_down"]  # and c comes down once it is not zero


def test_control_variates_refuse_presum(tiny_model_dir, tmp_path, capsys):
    code = main(["run", f"output_dir={tmp_path}", f"model.name={tiny_model_dir}", "train.control_variates=true", "runtime.presum=true"])
    assert code == 2
    assert "train.control_variates" in capsys.readouterr().err
