"""Differential privacy: DP-SGD through Opacus, and the privacy accounting of a client across rounds.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv:1607.00133):
per-sample gradients clipped to norm C, Gaussian noise of standard deviation σ·C on their sum,
Poisson sampling of each batch. Opacus computes the per-sample gradients (``GradSampleModule``),
clips and noises them (``DPOptimizer``) and accounts (RDP: Mironov 2017; PRV: Gopi et al. 2021).

What fedsim adds, in this one place:
- a client's privacy history across the rounds it takes part in, ``[(σ, q, steps), …]``, from which
  ε is recomputed with Opacus's accountant (the driver logs it per client and round);
- the calibration of σ to a target ε over the remaining steps of a run *after* costs already spent
  (the private LoRA-SB initialisation, the rounds before a resume), for every client at once, which
  Opacus's ``get_noise_multiplier`` does not take;
- a per-record loss (``mean_record_loss``): each record's own loss, so that its gradient does not
  depend on the other records of the batch (a causal LM's token-mean over the batch would);
- the private gradient sum of the LoRA-SB initialisation (per-sample clipping over all target
  weights together, Gaussian noise once on the sum: one sampled Gaussian mechanism).
Only the trained tensors are ever noised: for Fed-SB, R (and the head where trained).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.data import per_example_loss

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

        with warnings.catch_warnings():  # as in epsilon_spent
            warnings.simplefilter("ignore", UserWarning)
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


class BudgetSpent(ValueError):
    """A client has already spent the target ε: no σ keeps it within the target if it trains again."""

    def __init__(self, epsilon: float, target_epsilon: float):
        super().__init__(f"a client has already spent ε = {epsilon:.4g}, the target is {target_epsilon:g}")
        self.epsilon = epsilon


Client = tuple[History, float]  # (what a client has spent so far, its sample rate q from now on)


def worst_case_epsilon(clients: Sequence[Client], noise_multiplier: float, steps: int, delta: float,
                       accountant: str = "rdp") -> float:
    """The largest ε any client reaches if it takes ``steps`` more steps at σ = ``noise_multiplier``, each at
    its own rate (the worst case: it takes part in every remaining round)."""
    return max((epsilon_spent([*spent, (noise_multiplier, rate, steps)], delta, accountant)
                for spent, rate in _undominated(clients)), default=0.0)


def calibrate_noise_for_clients(target_epsilon: float, delta: float, clients: Sequence[Client], steps: int,
                                accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The smallest σ (within ``tolerance`` in ε) with which no client exceeds ``target_epsilon`` after ``steps`` more
    steps at its own rate, whatever it has spent before (the worst case: it takes part in every remaining round).

    σ is calibrated for the most exposed client, then every other one is checked against it (one ε each)
    and σ raised where one would still exceed the target. Raises ``BudgetSpent`` when a client has
    already spent the target.
    """
    candidates = _undominated(clients)
    spent = max((epsilon_spent(list(history), delta, accountant) for history, _ in candidates), default=0.0)
    if spent >= target_epsilon:
        raise BudgetSpent(spent, target_epsilon)
    sigma = None
    for history, rate in candidates:
        if sigma is None or epsilon_spent([*history, (sigma, rate, steps)], delta, accountant) > target_epsilon:
            sigma = calibrate_noise(target_epsilon, delta, rate, steps, accountant, history, tolerance)
    return sigma


def _undominated(clients: Sequence[Client]) -> list[Client]:
    """The clients no other client dominates, most exposed first (a client's ε, whatever σ comes next, is then
    at most that of one of them).

    Client a dominates b when their histories, with entries of equal (σ, q) merged, hold the same (σ, steps)
    and a's rate is ≥ b's in every entry and from now on: the sampled Gaussian mechanism's privacy loss grows
    with q, and composition adds it up. Clients of one run differ mostly by size (q = batch / n), so few remain.
    """
    groups: dict[tuple, list[tuple[float, ...]]] = {}
    for history, rate in clients:
        merged: dict[tuple[float, float], int] = {}
        for sigma, q, steps in history:
            if steps > 0:
                merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
        entries = sorted(((sigma, steps), q) for (sigma, q), steps in merged.items())
        groups.setdefault(tuple(key for key, _ in entries), []).append((*[q for _, q in entries], rate))
    front: list[Client] = []
    for keys, rate_vectors in groups.items():
        kept: list[tuple[float, ...]] = []
        for rates in sorted(set(rate_vectors), reverse=True):
            if not any(all(k >= r for k, r in zip(other, rates)) for other in kept):
                kept.append(rates)
        front += [([(sigma, q, steps) for (sigma, steps), q in zip(keys, rates[:-1])], rates[-1]) for rates in kept]
    return sorted(front, key=lambda client: -client[1])


def mean_record_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the batch's records of each record's own loss (what Opacus's ``loss_reduction="mean"`` expects).

    Classification (labels of shape [B]): the model's loss, already the mean of per-record cross-entropies.
    Causal LM (labels [B, T]): each record's own mean token loss (``fedsim.data.per_example_loss``), then the
    mean over records. The model's own loss would divide by the tokens of the whole batch, so a record's
    gradient would scale with its share of the batch's tokens, and clipping it would not bound it by C.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return model(**batch).loss
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return per_example_loss(model(**inputs).logits, labels).mean()


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
        loss = mean_record_loss(self.module, batch)
        loss.backward()
        return loss.item()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()


def private_gradient_sum(model: nn.Module, layer_names: list[str], batches: Iterable[dict[str, torch.Tensor]],
                         max_grad_norm: float, noise_multiplier: float, seed: int) -> dict[str, torch.Tensor]:
    """``Σ_records clip_C(∂loss_j/∂W) + N(0, (σC)²)`` for the named linear weights (one Gaussian mechanism).

    ``loss_j`` is record j's own loss (``mean_record_loss``); its gradient over every named weight is
    clipped together (one norm over all of them), so adding or removing one record of ``batches``
    moves the sum by at most C. Which records ``batches`` hold decides the mechanism's sampling rate
    (the caller's: ``ClientWorker.init_gradients`` Poisson-samples them).
    """
    from opacus import GradSampleModule

    weights = [model.get_submodule(name).weight for name in layer_names]
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in weights]
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
            samples = [w.grad_sample.to(torch.float64) for w in weights]
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
        name: (total + torch.normal(0.0, noise_multiplier * max_grad_norm, total.shape, generator=generator,
                                    dtype=torch.float64, device=total.device)).cpu()
        for name, total in zip(layer_names, sums)
    }
