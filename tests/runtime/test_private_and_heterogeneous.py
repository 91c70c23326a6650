"""Private federated runs and rank-heterogeneous clients, end to end on the session's local Ray."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedsim.cli import main
from fedsim.config import save_config
from fedsim.errors import UsageError
from fedsim.runtime import run
from test_end_to_end import final_state, make_config
from test_end_to_end import rows as comparable_rows

LAYERS, RANK = 4, 4  # the tiny BERT: 2 layers × (query, value)


def rows(run_dir, name):
    return pq.read_table(Path(run_dir) / name).to_pylist()


def opacus_epsilon(entries, delta):
    accountant = RDPAccountant()
    for sigma, q, steps in entries:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("method_name,init", [("fed-sb", "public"), ("fed-sb", "pooled"), ("fedit", "pooled")])
def test_private_run_accounts_epsilon_per_client_within_the_target(ray_local, tiny_model_dir, tmp_path, method_name, init):
    target, delta = 3.0, 1e-5
    config = make_config(tmp_path, tiny_model_dir, "private", **{
        "method.name": method_name, "privacy.enabled": "true", "privacy.epsilon": target, "privacy.delta": delta,
        "privacy.max_grad_norm": 0.5, "adapters.init_data": init, "privacy.init_noise_multiplier": 30.0,
        "train.rounds": 2, "method.train_head": "false"})
    run(config, progress=False)
    out = tmp_path / "private"
    clients = rows(out, "clients.parquet")
    for row in clients:
        # the private init Poisson-samples each client's records at q = share / n_i (share: 16 rows over 20 clients, 1)
        init_cost = [(30.0, 1 / row["samples"], 1)] if (method_name == "fed-sb" and init == "pooled") else []
        past = [r for r in clients if r["client_id"] == row["client_id"] and r["round"] <= row["round"] and r["steps"] > 0]
        recomputed = opacus_epsilon(init_cost + [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in past], delta)
        assert row["epsilon"] == pytest.approx(recomputed, rel=1e-6)
        assert 0 < row["epsilon"] <= target
        assert row["noise_multiplier"] > 0 and 0 < row["sample_rate"] <= 1
    for r in rows(out, "rounds.parquet"):
        assert r["epsilon_max"] == max(c["epsilon"] for c in clients if c["round"] == r["round"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["enabled"] and summary["privacy"]["epsilon_max"] <= target
    # what is noised: Fed-SB L·r², FedIT Σ r(d+k) (hidden 64: d = k = 64)
    expected = LAYERS * RANK**2 if method_name == "fed-sb" else LAYERS * RANK * (64 + 64)
    assert summary["trainable_adapter_parameters"] == expected and summary["trainable_head_parameters"] == 0


def test_lora_sb_init_on_client_data_without_counted_noise_is_refused(tiny_model_dir, tmp_path):
    config = make_config(tmp_path, tiny_model_dir, "leak", **{
        "method.name": "fed-sb", "privacy.enabled": "true", "privacy.epsilon": 1.0, "adapters.init_data": "pooled"})
    with pytest.raises(UsageError, match="privacy.init_noise_multiplier"):
        run(config, progress=False)
    assert not (tmp_path / "leak").exists()


def test_rank_heterogeneous_fed_sb_sends_r_i_squared(ray_local, tiny_model_dir, tmp_path):
    config = make_config(tmp_path, tiny_model_dir, "hetero", **{
        "method.name": "fed-sb", "method.rank": 8, "clients.ranks": "[2,4,8]", "method.train_head": "false",
        "train.rounds": 2, "clients.per_round": 10})
    run(config, progress=False)
    clients = rows(tmp_path / "hetero", "clients.parquet")
    assert {r["rank"] for r in clients} == {2, 4, 8}
    key_bytes = sum(len(f"bert.encoder.layer.{i}.attention.self.{m}.lora_R") for i in range(2) for m in ("query", "value"))
    for r in clients:
        assert r["bytes_up"] == 4 * LAYERS * r["rank"] ** 2 + key_bytes
    assert all(r["agg_error"] < 1e-5 for r in rows(tmp_path / "hetero", "rounds.parquet"))


def file_digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_private_run_resumed_to_more_rounds_stays_within_the_target(ray_local, tiny_model_dir, tmp_path, capsys):
    """Calibrated for 2 rounds, resumed to 6 through `fedsim run --resume`: σ is recalibrated for the 4 rounds left,
    given what each client has spent, so that none exceeds the target; the first 2 rounds are kept as they were."""
    target, delta, sigma_init = 3.0, 1e-5, 30.0
    config = make_config(tmp_path, tiny_model_dir, "private", **{
        "method.name": "fed-sb", "privacy.enabled": "true", "privacy.epsilon": target, "privacy.delta": delta,
        "adapters.init_data": "pooled", "privacy.init_noise_multiplier": sigma_init, "method.train_head": "false",
        "clients.count": 6, "clients.per_round": 6, "workload.train_limit": 120, "train.rounds": 2, "runtime.workers": 1})
    save_config(config, tmp_path / "private.yaml")

    def init_rate(row):  # the private init Poisson-samples ceil(16 / 6) = 3 of each client's n records: q = 3 / n
        return min(1.0, 3 / row["samples"])

    out = tmp_path / "private"
    assert main(["run", str(tmp_path / "private.yaml")]) == 0
    first = {name: comparable_rows(out, name, ["wall_s"] if name == "rounds.parquet" else ["train_s"])
             for name in ("rounds.parquet", "clients.parquet")}
    spare = tmp_path / "spare"
    shutil.copytree(out, spare)
    capsys.readouterr()

    assert main(["run", "--resume", str(out), "train.rounds=6"]) == 0
    said = capsys.readouterr().out
    rounds, clients = rows(out, "rounds.parquet"), rows(out, "clients.parquet")
    for client_id in range(6):  # every client, over the whole run, by Opacus's accountant: within the target
        own = [c for c in clients if c["client_id"] == client_id and c["steps"] > 0]
        history = [(sigma_init, init_rate(own[0]), 1)] + [(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in own]
        epsilon = opacus_epsilon(history, delta)
        assert epsilon <= target
        assert own[-1]["round"] == 5 and own[-1]["epsilon"] == pytest.approx(epsilon, rel=1e-6)
    for name, before in first.items():  # nothing of the first 2 rounds is lost or changed
        after = comparable_rows(out, name, ["wall_s"] if name == "rounds.parquet" else ["train_s"])
        assert after[: len(before)] == before
    assert [r["round"] for r in rounds] == list(range(6))
    sigma_before, sigma_after = rounds[0]["noise_multiplier"], rounds[2]["noise_multiplier"]
    assert all(r["noise_multiplier"] == sigma_before for r in rounds[:2]) and all(r["noise_multiplier"] == sigma_after for r in rounds[2:])
    assert sigma_after > sigma_before and f"σ raised from {sigma_before:.4g} to {sigma_after:.4g}" in said
    assert all(c["noise_multiplier"] == rounds[c["round"]]["noise_multiplier"] for c in clients)  # the workers used the σ in force
    assert json.loads((out / "summary.json").read_text())["privacy"]["noise_multiplier"] == sigma_after

    # a target that the first 2 rounds already spent: refused before training, one line, exit 2, nothing touched
    before = file_digests(spare)
    assert main(["run", "--resume", str(spare), "train.rounds=6", "privacy.epsilon=1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fedsim: error: privacy.epsilon: a client has already spent ε = ") and "\n" not in error
    assert file_digests(spare) == before

    # a fixed σ, resumed to more rounds: the user's choice, not refused; the ε it will reach is said in one line
    assert main(["check", "--resume", str(spare), "train.rounds=6", "privacy.epsilon=null", "privacy.noise_multiplier=2.0"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "reaches ε =" in line]
    worst = 0.0
    for client_id in range(6):  # rounds 0–1 as run, then rounds 2–5 at σ = 2, each of 2 steps at the client's rate
        own = [c for c in rows(spare, "clients.parquet") if c["client_id"] == client_id]
        history = [(sigma_init, init_rate(own[0]), 1)] + [(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in own]
        worst = max(worst, opacus_epsilon(history + [(2.0, own[0]["sample_rate"], 4 * 2)], delta))
    assert len(said) == 1 and float(said[0].split("reaches ε = ")[1].split()[0]) == pytest.approx(worst, rel=1e-3)
    assert file_digests(spare) == before


def test_rank_aggregation_reaches_the_method(ray_local, tiny_model_dir, tmp_path):
    """clients.rank_aggregation through `run`: a rank-2 client and a rank-4 client; outside the leading 2×2 block
    of R only the rank-4 client trained, so partitioned's entries there are zero-pad's divided by its weight."""
    finals = {}
    for how in ("zero-pad", "partitioned"):
        config = make_config(tmp_path, tiny_model_dir, how, **{
            "method.name": "fed-sb", "method.rank": 4, "clients.ranks": "[2,4]", "clients.count": 2, "clients.per_round": 2,
            "clients.partition": "iid", "workload.train_limit": 40, "train.rounds": 1, "method.train_head": "false",
            "clients.rank_aggregation": how, "runtime.workers": 1})
        run(config, progress=False)
        finals[how] = final_state(tmp_path / how)
    sizes = {c["client_id"]: c["samples"] for c in rows(tmp_path / "zero-pad", "clients.parquet")}
    weight_of_rank_4 = sizes[1] / (sizes[0] + sizes[1])
    keys = [key for key in finals["zero-pad"] if key.endswith("lora_R")]
    assert len(keys) == LAYERS
    for key in keys:
        zero_pad, partitioned = finals["zero-pad"][key].double(), finals["partitioned"][key].double()
        outside = torch.ones(4, 4, dtype=torch.bool)
        outside[:2, :2] = False
        assert torch.allclose(zero_pad[:2, :2], partitioned[:2, :2], atol=1e-6)
        assert torch.allclose(zero_pad[outside], weight_of_rank_4 * partitioned[outside], rtol=1e-4, atol=1e-7)
        assert (zero_pad[outside] - partitioned[outside]).abs().max() > 1e-3


def test_rank_scaling_and_lora_fair_correction_reach_a_run(ray_local, tiny_model_dir, tmp_path):
    """Through `fedsim run --methods`: FlexLoRA with a rank-2 and a rank-4 client under clients.rank_scaling own (its
    default, the authors') and max; LoRA-FAIR under method.lora_fair_correction paper (its default) and closed-form.
    Each pair trains from the same start and data: what the setting changes is the run's final state."""
    out = tmp_path / "settings"
    settings = [f"output_dir={out}", f"model.name={tiny_model_dir}", "workload.train_limit=60", "workload.eval_limit=16",
                "clients.count=2", "clients.per_round=2", "clients.partition=iid", "clients.ranks=[2,4]", "method.rank=4",
                "train.rounds=2", "train.local_steps=2", "train.batch_size=4", "runtime.workers=1", "method.train_head=false"]
    members = ["flexlora", "flexlora:clients.rank_scaling=max", "lora-fair", "lora-fair:lora_fair_correction=closed-form"]
    assert main(["run", *settings, "--methods", ",".join(members), "--quiet"]) == 0
    folders = {"flexlora-own": out / "flexlora", "flexlora-max": out / "flexlora-rank_scalingmax",
               "lora-fair-paper": out / "lora-fair", "lora-fair-closed-form": out / "lora-fair-lora_fair_correctionclosed-form"}
    finals = {name: final_state(folder) for name, folder in folders.items()}
    for a, b in (("flexlora-own", "flexlora-max"), ("lora-fair-paper", "lora-fair-closed-form")):
        assert finals[a].keys() == finals[b].keys()
        assert any(not torch.equal(finals[a][key], finals[b][key]) for key in finals[a]), (a, b)
    assert "rank_scaling: null" in (folders["flexlora-own"] / "config.yaml").read_text()  # null: the method's own
    assert "lora_fair_correction: paper" in (folders["lora-fair-paper"] / "config.yaml").read_text()
