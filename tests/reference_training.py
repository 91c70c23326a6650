"""The reference the engine is tested against: one client trained alone through PEFT's own forward, torch's AdamW and,
under DP, Opacus (``GradSampleModule`` for the per-record gradients, ``DPOptimizer`` for clipping and noise).

This is what fedsim's local training was before it became one engine (``fedsim.training.engine``); it lives in the
tests only, as the independent computation the engine's results must equal: every method's upload in float64, and every
private client's clipped per-record gradients and noise, client by client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from fedsim.adapters.state import State
from fedsim.config import TrainConfig
from fedsim.data import IGNORE_INDEX
from fedsim.methods.base import Method
from fedsim.privacy import PrivacySettings, mean_record_loss
from fedsim.training.schedule import TrainStats, lr_factor


def run_client(model: nn.Module, method: Method, state: State, round_idx: int, batches: Iterator[dict[str, torch.Tensor]],
               train: TrainConfig, seed: int, rank: int | None = None, privacy: PrivacySettings | None = None,
               steps: int | None = None) -> tuple[State, TrainStats]:
    """Train one client (of adapter rank ``rank``) from ``state`` for ``steps`` steps (default ``train.local_steps``);
    return its upload and stats. ``privacy`` makes every step a DP-SGD step through Opacus."""
    method.load_state(model, state, rank)
    params = method.trainable_parameters(model, round_idx)
    stats = train_local(model, list(params.values()), batches, train, seed, privacy, steps)
    return method.upload(model, round_idx), stats


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
    ``train.micro_batch_size`` splits each batch into micro-batches whose gradients add up to the
    whole batch's (``micro_batches``; under DP, Opacus's virtual steps: per-sample gradients clipped
    micro-batch by micro-batch, the noise added once per batch). The model's KV cache is off while it trains.
    """
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    private = PrivateStep(model, optimizer, params, privacy, seed) if privacy is not None else None
    step_optimizer = private.optimizer if private is not None else optimizer
    steps = train.local_steps if steps is None else steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train, steps))
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    if use_cache is not None:
        model_config.use_cache = False
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for _ in range(steps):
            batch = next(batches)
            step_optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(batch, train.micro_batch_size) if batch is not None else [(None, 1.0)]
            if private is not None:
                losses.append(_private_step(private, parts))
            else:
                losses.append(backward(model, parts))
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                step_optimizer.step()
            scheduler.step()
    finally:
        if private is not None:
            private.close()
        if use_cache is not None:
            model_config.use_cache = use_cache
        model.eval()
    finite = [loss for loss in losses if loss == loss]
    return TrainStats(
        steps=len(losses),
        train_loss=sum(finite) / len(finite) if finite else float("nan"),
        train_s=time.perf_counter() - start,
        losses=losses,
    )


def backward(model: nn.Module, parts: list[tuple[dict[str, torch.Tensor], float]]) -> float:
    """Backward through each micro-batch's weighted loss (gradients accumulate); returns the whole batch's loss."""
    total = None
    for micro, weight in parts:
        loss = model(**micro).loss
        (loss * weight).backward()
        total = weight * loss.detach() if total is None else total + weight * loss.detach()
    return total.item() if total is not None else float("nan")


def _private_step(private: PrivateStep, parts: list[tuple[dict[str, torch.Tensor] | None, float]]) -> float:
    """One DP-SGD step over a Poisson batch's micro-batches: Opacus's virtual steps (as its BatchMemoryManager
    does). Each micro-batch's per-sample gradients are clipped and added to the running clipped sum with the
    step skipped; the last one's step adds the noise once and divides by the expected batch size."""
    optimizer = private.optimizer
    parts = parts or [(None, 1.0)]  # nothing labelled: an empty batch, noise all the same
    loss = 0.0
    for index, (micro, weight) in enumerate(parts):
        loss += weight * private.loss(micro)
        if index < len(parts) - 1:
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()  # clip and accumulate only
            optimizer.zero_grad(set_to_none=True)  # drops the per-sample gradients, keeps the clipped sum
    optimizer.step()
    return loss


class PrivateStep:
    """DP-SGD around a model and its trainable tensors for one client's local steps (hooks removed by ``close``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 settings: PrivacySettings, seed: int):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.params = params
        self.module = GradSampleModule(model, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            expected_batch_size=settings.expected_batch_size, loss_reduction="mean",
            generator=torch.Generator(device=params[0].device).manual_seed(seed),
        )

    def loss(self, batch: dict[str, torch.Tensor] | None) -> float:
        """Forward and backward on one Poisson batch; an empty batch contributes zero gradient (noise still comes)."""
        if batch is None:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            return float("nan")
        loss = mean_record_loss(self.module, batch)
        loss.backward()
        return loss.item()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()


def micro_batches(batch: dict[str, torch.Tensor], size: int | None) -> list[tuple[dict[str, torch.Tensor], float]]:
    """The reference's micro-batching (the engine cuts records into passes instead: ``record_passes``): ``batch`` cut into consecutive micro-batches of ``size`` rows, each with the weight that makes
    ``Σ weight · micro-loss`` the whole batch's loss (so the gradients add up to the whole batch's).

    HF's losses are means: over the rows for classification (``labels`` of shape (n,)), so a
    micro-batch weighs its share of the rows; over the labelled next-token positions for a causal LM
    (``labels`` of shape (n, T), ``-100`` where no loss is taken), so it weighs its share of the
    batch's labelled tokens. A micro-batch with no labelled token is left out; right-padding columns
    no row of a micro-batch uses are cut off. ``size`` None (or the whole batch): the batch as it is.
    """
    labels = batch["labels"]
    rows = len(labels)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1) if labels.dim() == 2 else torch.ones(rows, dtype=torch.long)
    if size is None or size >= rows:
        return [(batch, 1.0)] if counts.sum() > 0 else []
    total = int(counts.sum())
    parts = []
    for start in range(0, rows, size):
        count = int(counts[start:start + size].sum())
        if count == 0:
            continue
        micro = {key: value[start:start + size] for key, value in batch.items()}
        parts.append((_trim_padding(micro), count / total))
    return parts


def _trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the trailing sequence columns that no row attends to (right padding of a longer row elsewhere in the batch)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    used = torch.nonzero(mask.any(dim=0)).flatten()
    width = int(used[-1]) + 1 if len(used) else mask.shape[1]
    if width == mask.shape[1]:
        return batch
    full = mask.shape[1]
    return {key: value[:, :width] if value.dim() >= 2 and value.shape[1] == full else value for key, value in batch.items()}
