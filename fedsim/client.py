"""One virtual client's round, on a resident model: load the global state, train, build the upload.

No Ray here: a worker actor calls this once per client of its cohort, and tests call it directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from fedsim.config import TrainConfig
from fedsim.adapters.state import State
from fedsim.methods.base import Method
from fedsim.privacy import PrivacySettings
from fedsim.trainer import TrainStats, train_local


def run_client(
    model: nn.Module,
    method: Method,
    state: State,
    round_idx: int,
    batches: Iterator[dict[str, torch.Tensor]],
    train: TrainConfig,
    seed: int,
    rank: int | None = None,
    privacy: PrivacySettings | None = None,
    steps: int | None = None,
) -> tuple[State, TrainStats]:
    """Train one client (of adapter rank ``rank``, default the method's) from the global ``state`` for ``steps`` steps
    (default ``train.local_steps``); return its upload and its training stats. ``privacy`` makes every step a DP-SGD step."""
    method.load_state(model, state, rank)
    params = method.trainable_parameters(model, round_idx)
    stats = train_local(model, list(params.values()), batches, train, seed, privacy, steps)
    return method.upload(model, round_idx), stats


def is_finite(tensors: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())
