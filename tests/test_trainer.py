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
