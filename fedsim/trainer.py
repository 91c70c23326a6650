"""The local trainer: a client's steps of AdamW on its trainable tensors. Generic over methods; no Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    """``train.*`` of the config."""

    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 over the local steps)
    warmup_steps: int = 0
    max_grad_norm: float | None = None


@dataclass
class TrainStats:
    steps: int
    samples: int
    train_loss: float  # mean over the steps
    train_s: float
    losses: list[float] = field(default_factory=list)


def lr_factor(step: int, settings: TrainSettings) -> float:
    """The schedule's multiplier of ``lr`` at ``step`` (0-based), linear warm-up first."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, settings.local_steps - settings.warmup_steps)
    if settings.schedule == "linear":
        return max(0.0, 1.0 - progress)
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule: unknown schedule '{settings.schedule}'; valid: constant, linear, cosine")


def train_local(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor]],
    settings: TrainSettings,
    seed: int,
) -> TrainStats:
    """Run ``settings.local_steps`` steps of AdamW (fresh state) on ``params``; ``loss = model(**batch).loss``.

    ``seed`` fixes dropout and any other randomness of the forward pass, so a client's training is
    a function of (its data, the global state, the seed).
    """
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    model.train()
    losses: list[float] = []
    samples = 0
    start = time.perf_counter()
    for _ in range(settings.local_steps):
        batch = next(batches)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        samples += _batch_size(batch)
    model.eval()
    return TrainStats(
        steps=len(losses),
        samples=samples,
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        train_s=time.perf_counter() - start,
        losses=losses,
    )


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))
