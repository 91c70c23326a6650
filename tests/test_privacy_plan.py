"""The run's privacy plan without Ray: σ calibrated at start, recalibrated on resume, ε booked per client and round."""

import math
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from fedsim.config import AdaptersConfig, PrivacyConfig, TrainConfig
from fedsim.errors import UsageError
from fedsim.privacy_accounting import epsilon_spent, worst_case_epsilon
from fedsim.privacy_plan import PrivacyPlan, check_private_init
from fedsim.training.schedule import client_steps

SIZES = [20, 60, 200, 900]


def make_plan(sizes=SIZES, rounds=4, init_data=None, train=None, **privacy):
    """A plan as the driver builds one: each client's steps from the train section, q_i = 8 / n_i."""
    train = train or TrainConfig(batch_size=8, local_steps=3)
    privacy = PrivacyConfig(**{"enabled": True, "epsilon": 2.0, "delta": 1e-4, **privacy})
    return PrivacyPlan(privacy, list(sizes), [client_steps(train, n) for n in sizes], train.batch_size, rounds, init_data, 16)


def opacus_epsilon(history, delta):
    """Opacus's RDP accountant over ``history``, in its own representation: [(σ, q, steps), …]."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def row(client_id, sigma, q, steps, round_idx=0):
    return {"round": round_idx, "client_id": client_id, "noise_multiplier": sigma, "sample_rate": q, "steps": steps}


def test_calibrated_sigma_keeps_every_client_within_the_target_at_its_own_steps():
    """Under local_epochs a large client takes more steps at a lower rate: σ keeps every client within the target."""
    epochs = TrainConfig(batch_size=8, local_steps=None, local_epochs=1.0)
    plan = make_plan(train=epochs)
    sigma = plan.calibrate()
    assert plan.noise_multiplier == sigma
    reached = [epsilon_spent([(sigma, min(1, 8 / n), 4 * client_steps(epochs, n))], 1e-4) for n in SIZES]
    assert 2.0 - 0.05 <= max(reached) <= 2.0  # the most exposed client at the target, none above
    assert make_plan(train=TrainConfig(batch_size=8, local_steps=5)).calibrate() != sigma  # the steps are each client's own


def test_a_private_init_is_paid_before_the_rounds():
    public = make_plan(init_data="public").calibrate()
    pooled = make_plan(init_data="pooled", init_noise_multiplier=3.0)
    assert pooled.history(0) == [(3.0, min(1, 4 / 20), 1)]  # 16 samples pooled over 4 clients: 4 of client 0's 20 records
    assert pooled.calibrate() > public
    only_client_0 = make_plan(init_data="client", init_noise_multiplier=3.0)
    assert only_client_0.history(0) == [(3.0, min(1, 16 / 20), 1)] and only_client_0.history(1) == []
    with pytest.raises(UsageError, match=r"^privacy.init_noise_multiplier: the private LoRA-SB initialisation alone spends"):
        make_plan(init_data="pooled", init_noise_multiplier=0.3).calibrate()


def test_delta_must_be_below_one_over_the_smallest_client():
    with pytest.raises(UsageError, match=r"^privacy.delta: 0.1 is not below 1/n = 0.05 \(n = 20"):
        make_plan(delta=0.1).calibrate()


def test_without_privacy_there_is_no_sigma_and_epsilon_is_nan():
    plan = PrivacyPlan(PrivacyConfig(), SIZES, [3] * 4, 8, 4, "pooled", 16)
    assert plan.calibrate() is None and plan.history(0) == []
    rows = [row(0, float("nan"), float("nan"), 3)]
    plan.account(rows)
    assert math.isnan(rows[0]["epsilon"]) and plan.summary() == {"enabled": False}


def test_account_books_each_clients_epsilon_over_its_whole_history():
    plan = make_plan(init_data="pooled", init_noise_multiplier=5.0)
    sigma = plan.calibrate()
    first = [row(0, sigma, 8 / 20, 3), row(2, float("nan"), float("nan"), 0)]  # client 2 dropped out: no steps
    plan.account(first)
    second = [row(0, sigma, 8 / 20, 3, 1), row(2, sigma, 8 / 200, 3, 1)]
    plan.account(second)
    init = lambda n: (5.0, min(1, 4 / n), 1)  # noqa: E731
    assert first[0]["epsilon"] == pytest.approx(opacus_epsilon([init(20), (sigma, 8 / 20, 3)], 1e-4), rel=1e-9)
    assert first[1]["epsilon"] == pytest.approx(opacus_epsilon([init(200)], 1e-4), rel=1e-9)  # the init alone
    assert second[0]["epsilon"] == pytest.approx(opacus_epsilon([init(20), (sigma, 8 / 20, 6)], 1e-4), rel=1e-9)
    assert second[1]["epsilon"] == pytest.approx(opacus_epsilon([init(200), (sigma, 8 / 200, 3)], 1e-4), rel=1e-9)
    assert second[0]["epsilon"] > first[0]["epsilon"] > second[1]["epsilon"] > first[1]["epsilon"] > 0
    summary = plan.summary()
    assert summary["epsilon_max"] == second[0]["epsilon"] and summary["noise_multiplier"] == sigma
    assert sorted(summary) == ["accountant", "delta", "enabled", "epsilon_max", "init", "max_grad_norm", "noise_multiplier",
                               "target_epsilon"]
    assert summary["init"].startswith("private: each client's records Poisson-sampled at rate min(1, 4/n_i)")


def rounds_done(plan, sigma, rounds):
    """Every client took part in each of ``rounds`` rounds at σ: the rows clients.parquet and rounds.parquet hold."""
    clients = [row(cid, sigma, plan.sample_rate(cid), plan.client_steps[cid], t) for t in range(rounds) for cid in range(4)]
    return clients, [{"round": t, "noise_multiplier": sigma} for t in range(rounds)]


def test_resume_keeps_sigma_where_it_holds_and_raises_it_where_not(capsys):
    sigma = make_plan(rounds=4).calibrate()
    clients, rounds = rounds_done(make_plan(rounds=4), sigma, 2)
    kept = make_plan(rounds=4)
    assert kept.resume(1, clients, rounds, "runs/a") == sigma  # stopping and resuming changes no number
    assert capsys.readouterr().out == ""
    longer = make_plan(rounds=6)  # two more rounds than σ was calibrated for: σ must rise for rounds 2–5
    raised = longer.resume(1, clients, rounds, "runs/a")
    assert raised > sigma and longer.noise_multiplier == raised
    assert f"fedsim: privacy: σ raised from {sigma:.4g} to {raised:.4g} for rounds 2–5" in capsys.readouterr().out
    ahead = [(longer.history(cid), longer.sample_rate(cid), 4 * longer.client_steps[cid]) for cid in range(4)]
    assert 2.0 - 0.05 <= worst_case_epsilon(ahead, raised, 1e-4) <= 2.0  # within the target after what was spent
    assert [len(longer.history(cid)) for cid in range(4)] == [2] * 4  # the rows done are booked for the accounting


def test_resume_refuses_what_cannot_be_made_private():
    sigma = make_plan(rounds=4).calibrate()
    clients, rounds = rounds_done(make_plan(rounds=4), sigma, 4)
    with pytest.raises(UsageError, match=r"^privacy.epsilon: a client has already spent ε = .* in rounds 0–3, the target is 1"):
        make_plan(rounds=6, epsilon=1.0).resume(3, clients, rounds, "runs/a")
    plain = [{**r, "noise_multiplier": float("nan")} for r in clients]
    with pytest.raises(UsageError, match=r"^privacy.enabled: rounds 0–3 of runs/a trained without DP"):
        make_plan(rounds=6).resume(3, plain, rounds, "runs/a")


def test_resume_under_a_fixed_sigma_says_the_epsilon_it_reaches(capsys):
    clients, rounds = rounds_done(make_plan(rounds=4), 1.5, 2)
    fixed = make_plan(rounds=4, epsilon=None, noise_multiplier=1.5)
    assert fixed.resume(1, clients, rounds, "runs/a") == 1.5
    said = capsys.readouterr().out
    ahead = [(fixed.history(cid), fixed.sample_rate(cid), 2 * fixed.client_steps[cid]) for cid in range(4)]
    assert f"a client taking part in every round up to 3 reaches ε = {worst_case_epsilon(ahead, 1.5, 1e-4):.4g}" in said


def test_a_private_init_on_client_data_must_be_counted():
    private = PrivacyConfig(enabled=True, epsilon=2.0)
    with pytest.raises(UsageError, match=r"^privacy.init_noise_multiplier: LoRA-SB's initialisation reads client data"):
        check_private_init(private, AdaptersConfig(init_data="pooled"), needs_init_gradients=True)
    check_private_init(private, AdaptersConfig(init_data="pooled"), needs_init_gradients=False)  # LoRA: no init data
    check_private_init(private, AdaptersConfig(init_data="public"), needs_init_gradients=True)
    with pytest.raises(UsageError, match=r"^adapters.init_at: client needs adapters.init_data=public"):
        check_private_init(PrivacyConfig(), AdaptersConfig(init_data="client", init_at="client"), needs_init_gradients=True)


def test_the_plan_imports_neither_the_trainer_nor_torch():
    loaded = subprocess.run([sys.executable, "-c", "import sys, fedsim.privacy_plan; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert "'fedsim.trainer'" not in loaded and "'torch'" not in loaded
