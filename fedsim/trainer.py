"""The local trainer: a client's steps of AdamW on its trainable tensors. Generic over methods; no Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsim.config import TrainConfig
from fedsim.privacy import PrivacySettings, PrivateStep


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


def lr_factor(step: int, train: TrainConfig, total_steps: int | None = None) -> float:
    """The schedule's multiplier of ``train.lr`` at ``step`` (0-based) of ``total_steps`` (default ``train.local_steps``):
    linear warm-up over ``train.warmup_steps``, then constant, or a linear or cosine decay to 0 at the last step."""
    total_steps = train.local_steps if total_steps is None else total_steps
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    if train.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine (train.schedule's choices are checked by the config)


def train_local(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor] | None],
    train: TrainConfig,
    seed: int,
    privacy: PrivacySettings | None = None,
    steps: int | None = None,
) -> TrainStats:
    """Run ``steps`` (default ``train.local_steps``) steps of AdamW (fresh state, the learning-rate schedule over those
    steps) on ``params``; ``loss = model(**batch).loss``.

    ``seed`` fixes dropout, the DP noise and any other randomness, so a client's training is a
    function of (its data, the global state, the seed). With ``privacy``, every step is a DP-SGD
    step through Opacus (``fedsim.privacy``): ``batches`` should then be Poisson batches (``None``
    for an empty one), and ``train.max_grad_norm`` is ignored (clipping is per sample).
    """
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    private = PrivateStep(model, optimizer, params, privacy, seed) if privacy is not None else None
    step_optimizer = private.optimizer if private is not None else optimizer
    steps = train.local_steps if steps is None else steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train, steps))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for _ in range(steps):
            batch = next(batches)
            step_optimizer.zero_grad(set_to_none=True)
            if private is not None:
                losses.append(private.loss(batch))
            else:
                loss = model(**batch).loss
                loss.backward()
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                losses.append(loss.item())
            step_optimizer.step()
            scheduler.step()
    finally:
        if private is not None:
            private.close()
        model.eval()
    finite = [loss for loss in losses if loss == loss]
    return TrainStats(
        steps=len(losses),
        train_loss=sum(finite) / len(finite) if finite else float("nan"),
        train_s=time.perf_counter() - start,
        losses=losses,
    )
