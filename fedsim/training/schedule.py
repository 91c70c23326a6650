"""A client's steps in a round and its learning-rate schedule: functions of the ``train`` section alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedsim.config import TrainConfig


@dataclass
class TrainStats:
    steps: int
    train_loss: float  # mean over the steps
    train_s: float
    losses: list[float] = field(default_factory=list)


def client_steps(train: TrainConfig, num_samples: int) -> int:
    """A client's optimiser steps in a round: ``train.local_steps``, or ``⌈⌈n_i / batch_size⌉ × train.local_epochs⌉``."""
    if train.local_epochs is None:
        return train.local_steps
    return max(1, math.ceil(math.ceil(num_samples / train.batch_size) * train.local_epochs))


def lr_factor(step: int, train: TrainConfig, total_steps: int | None = None, round_idx: int = 0) -> float:
    """The schedule's multiplier of ``train.lr`` at ``step`` (0-based) of ``total_steps`` (default ``train.local_steps``)
    in round ``round_idx``: ``train.lr_decay^round_idx`` (the decay over rounds of FedAvg's experiments, McMahan et al.
    2017, arXiv:1602.05629) times the local schedule: linear warm-up over ``train.warmup_steps``, then constant, or a
    linear or cosine decay to 0 at the last step."""
    return train.lr_decay ** round_idx * _local_factor(step, train, total_steps)


def _local_factor(step: int, train: TrainConfig, total_steps: int | None) -> float:
    total_steps = train.local_steps if total_steps is None else total_steps
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    if train.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine (train.schedule's choices are checked by the config)
