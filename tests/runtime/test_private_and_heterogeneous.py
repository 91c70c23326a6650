"""Private federated runs and rank-heterogeneous clients, end to end on the session's local Ray."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from opacus.accountants import RDPAccountant

from fedsim.errors import UsageError
from fedsim.runtime import run
from test_end_to_end import make_config

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
    init_cost = [(30.0, 1.0, 1)] if (method_name == "fed-sb" and init == "pooled") else []
    for row in clients:
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
