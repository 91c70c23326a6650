"""The local trainer's learning-rate schedule (``train.schedule``, ``train.warmup_steps``)."""

import math

import pytest

from fedsim.config import TrainConfig
from fedsim.trainer import lr_factor


def factors(steps, **train):
    config = TrainConfig(local_steps=steps, **train)
    return [lr_factor(step, config) for step in range(steps)]


def test_constant_with_and_without_warmup():
    assert factors(4) == [1.0] * 4
    assert factors(5, warmup_steps=2) == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_linear_decays_to_zero_after_warmup():
    assert factors(5, schedule="linear") == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert factors(6, schedule="linear", warmup_steps=2) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_cosine_follows_half_a_cosine():
    expected = [0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]
    assert factors(4, schedule="cosine") == pytest.approx(expected)
    assert factors(4, schedule="cosine", warmup_steps=1)[0] == 1.0


def test_a_clients_own_step_count_sets_the_decay():
    """With local_epochs a client's steps are its own: the schedule decays over them, not over train.local_steps."""
    config = TrainConfig(local_steps=10, schedule="linear")
    assert [lr_factor(step, config, total_steps=4) for step in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_local_epochs_give_each_client_its_own_steps():
    from fedsim.trainer import client_steps

    epochs = TrainConfig(local_steps=None, local_epochs=2, batch_size=8)
    assert [client_steps(epochs, n) for n in (1, 8, 9, 40, 41)] == [2, 2, 4, 10, 12]  # ⌈n/8⌉ × 2
    assert client_steps(TrainConfig(local_steps=None, local_epochs=0.5, batch_size=8), 40) == 3  # ⌈5 × 0.5⌉
    assert client_steps(TrainConfig(local_steps=7), 40) == 7


def test_local_steps_and_local_epochs_are_one_or_the_other():
    from fedsim.config import load_config
    from fedsim.errors import UsageError

    with pytest.raises(UsageError, match=r"^train.local_epochs: give exactly one of train.local_steps or train.local_epochs"):
        load_config(None, ["train.local_epochs=1"])
    assert load_config(None, ["train.local_epochs=1", "train.local_steps=null"]).train.local_epochs == 1.0


def test_private_calibration_uses_each_clients_own_steps():
    """Under local_epochs a large client takes more steps at a lower rate: σ keeps every client within the target."""
    from fedsim.config import load_config
    from fedsim.privacy import dp_sample_rate, epsilon_spent, plan_noise_multiplier
    from fedsim.trainer import client_steps

    config = load_config(None, ["privacy.enabled=true", "privacy.epsilon=2", "privacy.delta=1e-4", "train.local_steps=null",
                                "train.local_epochs=1", "train.batch_size=8", "train.rounds=4", "clients.count=4",
                                "clients.per_round=4"])
    sizes = [20, 60, 200, 900]
    sigma = plan_noise_multiplier(config, False, sizes)
    reached = [epsilon_spent([(sigma, dp_sample_rate(config, n), 4 * client_steps(config.train, n))], 1e-4) for n in sizes]
    assert 2.0 - 0.05 <= max(reached) <= 2.0  # the most exposed client at the target, none above
    fixed_steps = load_config(None, ["privacy.enabled=true", "privacy.epsilon=2", "privacy.delta=1e-4", "train.local_steps=5",
                                     "train.batch_size=8", "train.rounds=4", "clients.count=4", "clients.per_round=4"])
    assert plan_noise_multiplier(fixed_steps, False, sizes) != sigma  # the steps are the clients' own, not local_steps
