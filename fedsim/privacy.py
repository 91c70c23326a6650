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
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.errors import UsageError
from fedsim.training.losses import record_losses

History = list[tuple[float, float, int]]  # (noise multiplier σ, sample rate q, steps)


# -- the run's privacy plan: who pays for the init, what σ every client trains with --------------------


def init_spends_privacy(config, needs_init_gradients: bool, client_id: int) -> bool:
    """Whether the LoRA-SB initialisation read this client's records under DP (and so spent its privacy)."""
    uses_client = config.adapters.init_data == "pooled" or (config.adapters.init_data == "client" and client_id == 0)
    return config.privacy.enabled and needs_init_gradients and uses_client


def init_rows_per_client(config) -> int:
    """Calibration rows the LoRA-SB init takes from each client it reads: all ``adapters.init_samples`` from the one
    client (``client``), or an equal share of them from each (``pooled``)."""
    a = config.adapters
    return a.init_samples if a.init_data == "client" else max(1, math.ceil(a.init_samples / config.clients.count))


def init_sample_rate(config, needs_init_gradients: bool, client_id: int, client_size: int) -> float | None:
    """Under DP, the Poisson rate at which the LoRA-SB init samples this client's records (the rate its cost is
    booked at: ``ClientWorker.init_gradients``); None where the init does not read them privately."""
    if not init_spends_privacy(config, needs_init_gradients, client_id):
        return None
    return min(1.0, init_rows_per_client(config) / max(1, client_size))


def dp_sample_rate(config, client_size: int) -> float:
    """DP-SGD's Poisson rate for a client of ``client_size`` records: q_i = train.batch_size / n_i (at most 1)."""
    return min(1.0, config.train.batch_size / max(1, client_size))


def privacy_history(config, needs_init_gradients: bool, client_id: int, rows: list[dict], client_size: int) -> History:
    """A client's DP mechanisms so far: the private init (if it read the client's data, at the rate it sampled them)
    and every round it trained in (its result rows: ``noise_multiplier``, ``sample_rate``, ``steps``)."""
    history = []
    init_rate = init_sample_rate(config, needs_init_gradients, client_id, client_size)
    if init_rate is not None:
        history.append((config.privacy.init_noise_multiplier, init_rate, 1))
    history += [(row["noise_multiplier"], row["sample_rate"], row["steps"]) for row in rows if row["steps"] > 0]
    return history


def check_private_init(config, needs_init_gradients: bool) -> None:
    """A private run whose LoRA-SB init would read client data without counting it is refused; so is a LoRA-SB init
    built by each client from data other than the public sample (no client holds the pooled or another client's rows)."""
    p, a = config.privacy, config.adapters
    if a.init_at == "client" and needs_init_gradients and a.init_data != "public":
        raise UsageError(f"adapters.init_at: client needs adapters.init_data=public (each client builds B and A from the public "
                         f"calibration sample; with init_data={a.init_data} it would need rows it does not hold); set "
                         "adapters.init_data=public or adapters.init_at=server")
    if p.enabled and needs_init_gradients and a.init_data != "public" and p.init_noise_multiplier is None:
        raise UsageError(f"privacy.init_noise_multiplier: LoRA-SB's initialisation reads client data (adapters.init_data={a.init_data}); "
                         "set adapters.init_data=public, or a privacy.init_noise_multiplier so that it is computed privately and counted")


def plan_noise_multiplier(config, needs_init_gradients: bool, client_sizes: list[int], start_round: int = 0,
                          histories: dict[int, list[dict]] | None = None, previous: float | None = None) -> float | None:
    """The σ of DP-SGD in force from ``start_round`` on, for every client (None without DP): ``privacy.noise_multiplier``,
    or the smallest σ with which no client exceeds ``privacy.epsilon`` even if it takes part in every remaining round,
    each at its own rate and its own steps (``fedsim.trainer.client_steps``), after what it has spent (the private
    LoRA-SB init; ``histories``: its result rows so far). A resumed run keeps the ``previous`` σ where that still holds
    (so that stopping and resuming changes no number) and raises it where not; where a client has already spent the
    target it is refused. A fixed ``privacy.noise_multiplier`` is the user's choice: a resumed run says the ε it reaches.
    """
    from fedsim.training.schedule import client_steps

    p, c = config.privacy, config
    if not p.enabled:
        return None
    smallest = max(1, min(client_sizes))
    if p.delta >= 1 / smallest:  # δ ≥ 1/n allows "publish a record in the clear" mechanisms
        raise UsageError(f"privacy.delta: {p.delta:g} is not below 1/n = {1 / smallest:.3g} (n = {smallest}, the smallest client's "
                         f"records); δ must be well below 1/n, e.g. {0.1 / smallest:.1g}")
    rounds_left = c.train.rounds - start_round
    histories = histories or {}
    clients = [(privacy_history(c, needs_init_gradients, cid, histories.get(cid, []), size), dp_sample_rate(c, size),
                rounds_left * client_steps(c.train, size)) for cid, size in enumerate(client_sizes)]
    if p.noise_multiplier is not None:
        if start_round > 0 and rounds_left > 0:
            reach = worst_case_epsilon(clients, p.noise_multiplier, p.delta, p.accountant)
            print(f"fedsim: privacy.noise_multiplier={p.noise_multiplier:g} is fixed: a client taking part in every round "
                  f"up to {c.train.rounds - 1} reaches ε = {reach:.4g} (δ = {p.delta:g})")
        return p.noise_multiplier
    if rounds_left <= 0:
        return previous
    if previous is not None and worst_case_epsilon(clients, previous, p.delta, p.accountant) <= p.epsilon:
        return previous
    try:
        sigma = calibrate_noise_for_clients(p.epsilon, p.delta, clients, p.accountant)
    except BudgetSpent as spent:
        if start_round == 0:
            raise UsageError(f"privacy.init_noise_multiplier: the private LoRA-SB initialisation alone spends ε = {spent.epsilon:.4g} "
                             f"of privacy.epsilon={p.epsilon:g}; raise it or use adapters.init_data=public") from None
        raise UsageError(f"privacy.epsilon: a client has already spent ε = {spent.epsilon:.4g} in rounds 0–{start_round - 1}, "
                         f"the target is {p.epsilon:g}: any further round would exceed it; raise privacy.epsilon, or keep "
                         f"train.rounds={start_round}") from None
    except ValueError as error:  # Opacus: no σ up to its bound meets the target
        raise UsageError(f"privacy.epsilon: {p.epsilon:g} cannot be met at δ = {p.delta:g} ({error}); raise it") from None
    if previous is not None:
        print(f"fedsim: privacy: σ raised from {previous:.4g} to {sigma:.4g} for rounds {start_round}–{c.train.rounds - 1}, "
              f"so that no client exceeds ε = {p.epsilon:g} (δ = {p.delta:g}) even if it takes part in every one")
    return sigma


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


Client = tuple[History, float, int]  # (what a client has spent so far, its sample rate q from now on, its steps from now on)


def worst_case_epsilon(clients: Sequence[Client], noise_multiplier: float, delta: float, accountant: str = "rdp") -> float:
    """The largest ε any client reaches if it takes its remaining steps at σ = ``noise_multiplier``, each at its own
    rate (the worst case: it takes part in every remaining round)."""
    return max((epsilon_spent([*spent, (noise_multiplier, rate, steps)], delta, accountant)
                for spent, rate, steps in _undominated(clients)), default=0.0)


def calibrate_noise_for_clients(target_epsilon: float, delta: float, clients: Sequence[Client], accountant: str = "rdp",
                                tolerance: float = 0.01) -> float:
    """The smallest σ (within ``tolerance`` in ε) with which no client exceeds ``target_epsilon`` after its remaining
    steps at its own rate, whatever it has spent before (the worst case: it takes part in every remaining round).

    σ is calibrated for the most exposed client, then every other one is checked against it (one ε each)
    and σ raised where one would still exceed the target. Raises ``BudgetSpent`` when a client has
    already spent the target.
    """
    candidates = _undominated(clients)
    spent = max((epsilon_spent(list(history), delta, accountant) for history, _, _ in candidates), default=0.0)
    if spent >= target_epsilon:
        raise BudgetSpent(spent, target_epsilon)
    sigma = None
    for history, rate, steps in candidates:
        if sigma is None or epsilon_spent([*history, (sigma, rate, steps)], delta, accountant) > target_epsilon:
            sigma = calibrate_noise(target_epsilon, delta, rate, steps, accountant, history, tolerance)
    return sigma


def _undominated(clients: Sequence[Client]) -> list[Client]:
    """The clients no other client dominates, most exposed first (a client's ε, whatever σ comes next, is then
    at most that of one of them).

    Client a dominates b when their histories, with entries of equal (σ, q) merged, hold the same (σ, steps), they
    have as many steps to go, and a's rate is ≥ b's in every entry and from now on: the sampled Gaussian
    mechanism's privacy loss grows with q, and composition adds it up. Clients of one run differ mostly by size
    (q = batch / n), so few remain.
    """
    groups: dict[tuple, list[tuple[float, ...]]] = {}
    for history, rate, future_steps in clients:
        merged: dict[tuple[float, float], int] = {}
        for sigma, q, steps in history:
            if steps > 0:
                merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
        entries = sorted(((sigma, steps), q) for (sigma, q), steps in merged.items())
        groups.setdefault((tuple(key for key, _ in entries), future_steps), []).append((*[q for _, q in entries], rate))
    front: list[Client] = []
    for (keys, future_steps), rate_vectors in groups.items():
        kept: list[tuple[float, ...]] = []
        for rates in sorted(set(rate_vectors), reverse=True):
            if not any(all(k >= r for k, r in zip(other, rates)) for other in kept):
                kept.append(rates)
        front += [([(sigma, q, steps) for (sigma, steps), q in zip(keys, rates[:-1])], rates[-1], future_steps) for rates in kept]
    return sorted(front, key=lambda client: (-client[1], -client[2]))


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
