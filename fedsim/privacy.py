"""Differential privacy's mechanism: DP-SGD's pieces outside the training engine.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv:1607.00133):
per-sample gradients clipped to norm C, Gaussian noise of standard deviation σ·C on their sum,
Poisson sampling of each batch. The engine clips and noises each client's records itself
(``fedsim.training.private``; tests compare it with Opacus's ``GradSampleModule`` and ``DPOptimizer``
for the client alone); Opacus computes the LoRA-SB initialisation's per-sample gradients here. The run's privacy plan (σ, who spends what, ε per client and
round) is ``fedsim.privacy_plan``; the accounting maths, ``fedsim.privacy_accounting``.

What fedsim adds here:
- a per-record loss (``mean_record_loss``): each record's own loss, so that its gradient does not
  depend on the other records of the batch (a causal LM's token-mean over the batch would);
- the private gradient sum of the LoRA-SB initialisation (per-sample clipping over all target
  weights together, Gaussian noise once on the sum: one sampled Gaussian mechanism).
Only the trained tensors are ever noised: for Fed-SB, R (and the head where trained).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.training.losses import record_losses


@dataclass(frozen=True)
class PrivacySettings:
    """One client's DP-SGD parameters for its local steps."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int


def mean_record_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the batch's records of each record's own loss (``fedsim.training.losses.record_losses``: what
    Opacus's ``loss_reduction="mean"`` expects). A causal LM's own loss would divide by the tokens of the whole batch,
    so a record's gradient would scale with its share of the batch's tokens, and clipping it would not bound it by C."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    task = "causal-lm" if labels.dim() == 2 else "classification"
    return record_losses(model(**inputs).logits, labels, task).mean()


def poisson_batches(rows, sample_rate: float, seed: int) -> Iterator[dict[str, torch.Tensor] | None]:
    """Poisson sampling: each record joins each batch independently with probability q (``None`` = empty batch)."""
    rng = np.random.default_rng(seed)
    while True:
        indices = np.flatnonzero(rng.random(len(rows)) < sample_rate)
        yield rows.batch(indices) if len(indices) else None


def private_gradient_sum(model: nn.Module, layer_names: list[str], batches: Iterable[dict[str, torch.Tensor]],
                         max_grad_norm: float, noise_multiplier: float, seed: int) -> dict[str, torch.Tensor]:
    """``Σ_records clip_C(∂loss_j/∂W) + N(0, (σC)²)`` for the named linear weights (one Gaussian mechanism), float32 on
    their device.

    ``loss_j`` is record j's own loss (``mean_record_loss``); its gradient over every named weight is
    clipped together (one norm over all of them), so adding or removing one record of ``batches``
    moves the sum by at most C. Which records ``batches`` hold decides the mechanism's sampling rate
    (the caller's: ``ClientWorker.init_gradients`` Poisson-samples them).
    """
    from opacus import GradSampleModule

    weights = [model.get_submodule(name).weight for name in layer_names]
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    model.eval()  # no dropout; the target linears alone in training mode, which Opacus's hooks require
    for name in layer_names:
        model.get_submodule(name).train()
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    module = GradSampleModule(model, loss_reduction="mean")
    try:
        for batch in batches:
            mean_record_loss(module, batch).backward()  # grad_sample: each record's gradient of its own loss
            samples = [w.grad_sample.to(torch.float32) for w in weights]
            norms = torch.stack([s.reshape(len(s), -1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
            factors = (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
            for total, s in zip(sums, samples):
                total += torch.einsum("i,i...->...", factors, s)
            for w in weights:
                w.grad_sample = None
                w.grad = None
    finally:
        module._close()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    generator = torch.Generator(device=sums[0].device).manual_seed(seed)
    return {
        name: total.add_(torch.normal(0.0, noise_multiplier * max_grad_norm, total.shape, generator=generator,
                                      dtype=torch.float32, device=total.device))
        for name, total in zip(layer_names, sums)
    }
