"""Differential privacy: DP-SGD through Opacus, and the privacy accounting of a client across rounds.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv:1607.00133):
per-sample gradients clipped to norm C, Gaussian noise of standard deviation σ·C on their sum,
Poisson sampling of each batch. Opacus computes the per-sample gradients (``GradSampleModule``),
clips and noises them (``DPOptimizer``) and accounts (RDP: Mironov 2017; PRV: Gopi et al. 2021).

What fedsim adds, in this one place:
- a client's privacy history across the rounds it takes part in, ``[(σ, q, steps), …]``, from which
  ε is recomputed with Opacus's accountant (the driver logs it per client and round);
- the calibration of σ to a target ε over a whole run *after* a cost already spent (the private
  LoRA-SB initialisation), which Opacus's ``get_noise_multiplier`` does not take;
- the private gradient sum of the LoRA-SB initialisation (per-sample clipping over all target
  weights together, Gaussian noise once on the sum: one Gaussian mechanism with q = 1).
Only the trained tensors are ever noised: for Fed-SB, R (and the head where trained).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

History = list[tuple[float, float, int]]  # (noise multiplier σ, sample rate q, steps)


@dataclass(frozen=True)
class PrivacySettings:
    """One client's DP-SGD parameters for its local steps."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int


def make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


def epsilon_spent(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε after the mechanisms of ``history`` (composed), by Opacus's accountant.

    For RDP this is ``RDPAccountant.get_epsilon`` computed the way it does (RDP adds up over steps),
    with each (q, σ) pair's one-step RDP cached: a client's ε is recomputed every round it trains.
    """
    steps = [(sigma, q, n) for sigma, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in steps):
        return float("inf")
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(n * _rdp_one_step(q, sigma) for sigma, q, n in steps)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is then loose, never optimistic
            warnings.simplefilter("ignore", UserWarning)
            return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
    acc = make_accountant(accountant)
    acc.history = list(steps)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=65536)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", spent: History = (), tolerance: float = 0.01) -> float:
    """The smallest σ (within ``tolerance`` in ε) such that ``spent`` + ``steps`` steps at rate q stay within ε."""
    if not spent:
        from opacus.accountants.utils import get_noise_multiplier

        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=tolerance))
    if epsilon_spent(list(spent), delta, accountant) >= target_epsilon:
        raise ValueError(f"the privacy already spent exceeds the target epsilon {target_epsilon}")
    low, high = 0.0, 10.0
    while epsilon_spent([*spent, (high, sample_rate, steps)], delta, accountant) > target_epsilon:
        low, high = high, 2 * high
    while epsilon_spent([*spent, (high, sample_rate, steps)], delta, accountant) < target_epsilon - tolerance:
        middle = (low + high) / 2
        if epsilon_spent([*spent, (middle, sample_rate, steps)], delta, accountant) > target_epsilon:
            low = middle
        else:
            high = middle
        if high - low < 1e-6:
            break
    return high


def poisson_batches(rows, sample_rate: float, seed: int) -> Iterator[dict[str, torch.Tensor] | None]:
    """Poisson sampling: each record joins each batch independently with probability q (``None`` = empty batch)."""
    rng = np.random.default_rng(seed)
    while True:
        indices = np.flatnonzero(rng.random(len(rows)) < sample_rate)
        yield rows.batch(indices) if len(indices) else None


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
        loss = self.module(**batch).loss
        loss.backward()
        return loss.item()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()


def private_gradient_sum(model: nn.Module, layer_names: list[str], batches: Iterable[dict[str, torch.Tensor]],
                         max_grad_norm: float, noise_multiplier: float, seed: int) -> dict[str, torch.Tensor]:
    """``Σ_samples clip_C(∂loss_j/∂W) + N(0, (σC)²)`` for the named linear weights (one Gaussian mechanism), float32 on their device.

    The per-sample gradient of every named weight is clipped together (one norm over all of them),
    so one record moves the sum by at most C.
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
    module = GradSampleModule(model, loss_reduction="sum")
    try:
        for batch in batches:
            module(**batch).loss.backward()  # HF mean loss: grad_sample is per-sample gradient / batch size
            size = len(batch["labels"])
            samples = [w.grad_sample.to(torch.float32) * size for w in weights]
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
