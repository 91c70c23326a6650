"""Privacy accounting: what ε a client has spent after a history of sampled Gaussian mechanisms, and the σ that keeps
every client of a run within a target.

A history is ``[(σ, q, steps), …]``: ``steps`` steps of the sampled Gaussian mechanism (DP-SGD: Abadi et al., CCS 2016,
arXiv:1607.00133) at noise multiplier σ and Poisson rate q. ε is Opacus's: Rényi DP (Mironov, "Rényi Differential
Privacy", CSF 2017) or the PRV accountant (Gopi et al., "Numerical Composition of Differential Privacy", NeurIPS 2021).
What fedsim adds is the calibration of σ *after* costs already spent (a private LoRA-SB initialisation, the rounds
before a resume), for every client of a run at once, which Opacus's ``get_noise_multiplier`` does not take.
Pure maths on histories: no config, no run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np

History = list[tuple[float, float, int]]  # (noise multiplier σ, sample rate q, steps)


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
