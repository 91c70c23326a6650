"""The local trainer: a client's steps of AdamW on its trainable tensors. Generic over methods; no Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsim.privacy import PrivacySettings, PrivateStep


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
    batches: Iterator[dict[str, torch.Tensor] | None],
    settings: TrainSettings,
    seed: int,
    privacy: PrivacySettings | None = None,
) -> TrainStats:
    """Run ``settings.local_steps`` steps of AdamW (fresh state) on ``params``; ``loss = model(**batch).loss``.

    ``seed`` fixes dropout, the DP noise and any other randomness, so a client's training is a
    function of (its data, the global state, the seed). With ``privacy``, every step is a DP-SGD
    step through Opacus (``fedsim.privacy``): ``batches`` should then be Poisson batches (``None``
    for an empty one), and ``settings.max_grad_norm`` is ignored (clipping is per sample).
    """
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    private = PrivateStep(model, optimizer, params, privacy, seed) if privacy is not None else None
    step_optimizer = private.optimizer if private is not None else optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    model.train()
    losses: list[float] = []
    samples = 0
    start = time.perf_counter()
    try:
        for _ in range(settings.local_steps):
            batch = next(batches)
            step_optimizer.zero_grad(set_to_none=True)
            if private is not None:
                losses.append(private.loss(batch))
            else:
                loss = model(**batch).loss
                loss.backward()
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                losses.append(loss.item())
            step_optimizer.step()
            scheduler.step()
            samples += _batch_size(batch)
    finally:
        if private is not None:
            private.close()
        model.eval()
    finite = [loss for loss in losses if loss == loss]
    return TrainStats(
        steps=len(losses),
        samples=samples,
        train_loss=sum(finite) / len(finite) if finite else float("nan"),
        train_s=time.perf_counter() - start,
        losses=losses,
    )


def _batch_size(batch: dict[str, torch.Tensor] | None) -> int:
    return 0 if batch is None else len(next(iter(batch.values())))
