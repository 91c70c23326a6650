"""The run's privacy plan: the σ every client trains with, what each client spends, and ε per client and round.

Each client runs DP-SGD (Abadi et al., CCS 2016, arXiv:1607.00133) on its own records, Poisson-sampled at its own
rate q_i = train.batch_size / n_i; a private LoRA-SB initialisation is one more sampled Gaussian mechanism on the
records it reads. The plan, from the ``privacy`` section and the few values it reads from elsewhere (passed in):
- ``calibrate``: σ such that no client exceeds ``privacy.epsilon`` even if it takes part in every round, each at its
  own rate and steps, after the private init (or ``privacy.noise_multiplier``, the user's choice);
- ``resume``: the same for the rounds still to run, after what each client spent in the rounds done, keeping σ where
  it still holds (stopping and resuming changes no number) and raising it where not;
- ``account``: each client's ε after each round, over its whole history (RDP: Mironov 2017; PRV: Gopi et al. 2021;
  the maths in ``fedsim.privacy_accounting``);
- ``summary``: the ``privacy`` entry of ``summary.json``.
No Ray, no files, no trainer: the driver reads the rows and hands them over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedsim.config import AdaptersConfig, PrivacyConfig
from fedsim.errors import UsageError
from fedsim.privacy_accounting import BudgetSpent, History, calibrate_noise_for_clients, epsilon_spent, worst_case_epsilon


def poisson_rate(batch_size: int, client_size: int) -> float:
    """DP-SGD's Poisson rate for a client of ``client_size`` records: q_i = batch_size / n_i (at most 1)."""
    return min(1.0, batch_size / max(1, client_size))


def init_share(init_data: str, init_samples: int, clients: int) -> int:
    """Calibration rows LoRA-SB's init takes from each client it reads: all ``init_samples`` from the one client
    (``client``), or an equal share of them from each (``pooled``)."""
    return init_samples if init_data == "client" else max(1, math.ceil(init_samples / clients))


def init_rate(private: bool, init_data: str | None, rows_per_client: int, client_id: int, client_size: int) -> float | None:
    """Under DP, the Poisson rate at which LoRA-SB's init samples this client's records (the rate its cost is booked
    at: ``ClientWorker.init_gradients`` samples at it); None where the init does not read them privately (no DP; no
    client data: ``init_data`` None or ``public``; ``client``: only client 0's)."""
    reads_client = init_data == "pooled" or (init_data == "client" and client_id == 0)
    if not (private and reads_client):
        return None
    return min(1.0, rows_per_client / max(1, client_size))


def check_private_init(privacy: PrivacyConfig, adapters: AdaptersConfig, needs_init_gradients: bool) -> None:
    """A private run whose LoRA-SB init would read client data without counting it is refused; so is a LoRA-SB init
    built by each client from data other than the public sample (no client holds the pooled or another client's rows)."""
    if adapters.init_at == "client" and needs_init_gradients and adapters.init_data != "public":
        raise UsageError(f"adapters.init_at: client needs adapters.init_data=public (each client builds B and A from the public "
                         f"calibration sample; with init_data={adapters.init_data} it would need rows it does not hold); set "
                         "adapters.init_data=public or adapters.init_at=server")
    if privacy.enabled and needs_init_gradients and adapters.init_data != "public" and privacy.init_noise_multiplier is None:
        raise UsageError(f"privacy.init_noise_multiplier: LoRA-SB's initialisation reads client data (adapters.init_data="
                         f"{adapters.init_data}); set adapters.init_data=public, or a privacy.init_noise_multiplier so that it is "
                         "computed privately and counted")


@dataclass
class PrivacyPlan:
    """One run's privacy plan. Without ``privacy.enabled``: σ None, ε NaN, and nothing is read."""

    privacy: PrivacyConfig
    client_sizes: list[int]  # each client's training records n_i
    client_steps: list[int]  # each client's DP-SGD steps in a round it trains (``fedsim.training.schedule.client_steps``)
    batch_size: int  # train.batch_size: the expected Poisson batch
    rounds: int  # train.rounds
    init_data: str | None  # adapters.init_data where LoRA-SB's init reads data (public | client | pooled); None: it reads none
    init_samples: int  # adapters.init_samples
    noise_multiplier: float | None = field(default=None, init=False)  # σ in force: set by ``calibrate`` / ``resume``
    client_rows: dict[int, list[dict]] = field(default_factory=dict, init=False)  # each client's result rows so far

    @property
    def init_rows_per_client(self) -> int:
        return init_share(self.init_data, self.init_samples, len(self.client_sizes))

    def sample_rate(self, client_id: int) -> float:
        return poisson_rate(self.batch_size, self.client_sizes[client_id])

    def history(self, client_id: int) -> History:
        """A client's DP mechanisms so far: the private init (if it read the client's data, at the rate it sampled them)
        and every round it trained in (its rows' ``noise_multiplier``, ``sample_rate``, ``steps``)."""
        history = []
        rate = init_rate(self.privacy.enabled, self.init_data, self.init_rows_per_client, client_id, self.client_sizes[client_id])
        if rate is not None:
            history.append((self.privacy.init_noise_multiplier, rate, 1))
        return history + [(row["noise_multiplier"], row["sample_rate"], row["steps"])
                          for row in self.client_rows.get(client_id, []) if row["steps"] > 0]

    def calibrate(self, start_round: int = 0, previous: float | None = None) -> float | None:
        """Set and return the σ of DP-SGD from ``start_round`` on, for every client (None without DP):
        ``privacy.noise_multiplier``, or the smallest σ with which no client exceeds ``privacy.epsilon`` even if it takes
        part in every remaining round, each at its own rate and steps, after what it has spent (``history``). A resumed
        run keeps the ``previous`` σ where that still holds and raises it where not; where a client has already spent
        the target it is refused. A fixed ``privacy.noise_multiplier`` is the user's choice: a resumed run says the ε
        it reaches."""
        self.noise_multiplier = self._noise_multiplier(start_round, previous)
        return self.noise_multiplier

    def _noise_multiplier(self, start_round: int, previous: float | None) -> float | None:
        p = self.privacy
        if not p.enabled:
            return None
        smallest = max(1, min(self.client_sizes))
        if p.delta >= 1 / smallest:  # δ ≥ 1/n allows "publish a record in the clear" mechanisms
            raise UsageError(f"privacy.delta: {p.delta:g} is not below 1/n = {1 / smallest:.3g} (n = {smallest}, the smallest "
                             f"client's records); δ must be well below 1/n, e.g. {0.1 / smallest:.1g}")
        rounds_left = self.rounds - start_round
        clients = [(self.history(cid), self.sample_rate(cid), rounds_left * steps) for cid, steps in enumerate(self.client_steps)]
        if p.noise_multiplier is not None:
            if start_round > 0 and rounds_left > 0:
                reach = worst_case_epsilon(clients, p.noise_multiplier, p.delta, p.accountant)
                print(f"fedsim: privacy.noise_multiplier={p.noise_multiplier:g} is fixed: a client taking part in every round "
                      f"up to {self.rounds - 1} reaches ε = {reach:.4g} (δ = {p.delta:g})")
            return p.noise_multiplier
        if rounds_left <= 0:
            return previous
        if previous is not None and worst_case_epsilon(clients, previous, p.delta, p.accountant) <= p.epsilon:
            return previous
        try:
            sigma = calibrate_noise_for_clients(p.epsilon, p.delta, clients, p.accountant)
        except BudgetSpent as spent:
            if start_round == 0:
                raise UsageError(f"privacy.init_noise_multiplier: the private LoRA-SB initialisation alone spends ε = "
                                 f"{spent.epsilon:.4g} of privacy.epsilon={p.epsilon:g}; raise it or use adapters.init_data=public"
                                 ) from None
            raise UsageError(f"privacy.epsilon: a client has already spent ε = {spent.epsilon:.4g} in rounds 0–{start_round - 1}, "
                             f"the target is {p.epsilon:g}: any further round would exceed it; raise privacy.epsilon, or keep "
                             f"train.rounds={start_round}") from None
        except ValueError as error:  # Opacus: no σ up to its bound meets the target
            raise UsageError(f"privacy.epsilon: {p.epsilon:g} cannot be met at δ = {p.delta:g} ({error}); raise it") from None
        if previous is not None:
            print(f"fedsim: privacy: σ raised from {previous:.4g} to {sigma:.4g} for rounds {start_round}–{self.rounds - 1}, "
                  f"so that no client exceeds ε = {p.epsilon:g} (δ = {p.delta:g}) even if it takes part in every one")
        return sigma

    def resume(self, last_round: int, client_rows: Sequence[dict], round_rows: Sequence[dict], run: object) -> float | None:
        """Take up a run stopped after ``last_round``: what every client spent in the rounds done (``client_rows``, from
        ``clients.parquet``), and the σ in force then (``round_rows``' last), then ``calibrate`` for the rounds left.
        ``run`` names the run in the message refusing one whose rounds trained without DP."""
        if not self.privacy.enabled:
            return self.calibrate(last_round + 1)
        if any(row["steps"] > 0 and row["noise_multiplier"] != row["noise_multiplier"] for row in client_rows):
            raise UsageError(f"privacy.enabled: rounds 0–{last_round} of {run} trained without DP; resuming cannot make them "
                             "private: start a new run")
        for row in client_rows:
            self.client_rows.setdefault(row["client_id"], []).append(row)
        previous = round_rows[-1]["noise_multiplier"] if round_rows else None
        return self.calibrate(last_round + 1, None if previous is None or previous != previous else previous)

    def account(self, rows: Sequence[dict]) -> None:
        """Book a round's rows and write into each its client's ε spent so far (Opacus's accountant over its whole
        history: ``epsilon``); NaN without DP."""
        p = self.privacy
        for row in rows:
            self.client_rows.setdefault(row["client_id"], []).append(row)
        for row in rows:
            row["epsilon"] = epsilon_spent(self.history(row["client_id"]), p.delta, p.accountant) if p.enabled else float("nan")

    def summary(self) -> dict:
        """The ``privacy`` entry of ``summary.json``: the target, σ, the largest ε any client spent, how the init paid."""
        p = self.privacy
        if not p.enabled:
            return {"enabled": False}
        spent = [row["epsilon"] for rows in self.client_rows.values() for row in rows if row["epsilon"] == row["epsilon"]]
        return {
            "enabled": True, "target_epsilon": p.epsilon, "noise_multiplier": self.noise_multiplier, "delta": p.delta,
            "accountant": p.accountant, "max_grad_norm": p.max_grad_norm, "epsilon_max": max(spent, default=0.0),
            "init": ("no data (LoRA's random initialisation)" if self.init_data is None
                     else "public data held out from every client (no privacy spent)" if self.init_data == "public"
                     else f"private: each client's records Poisson-sampled at rate min(1, {self.init_rows_per_client}/n_i), "
                          f"clipped at {p.max_grad_norm}, noise multiplier {p.init_noise_multiplier}, counted once per client "
                          f"({self.init_data})"),
        }


# -- ClientWorker's questions, from the config it holds (the rates it samples at are the ones booked above) -------------


def dp_sample_rate(config, client_size: int) -> float:
    """DP-SGD's Poisson rate for a client of ``client_size`` records (``poisson_rate`` at ``train.batch_size``)."""
    return poisson_rate(config.train.batch_size, client_size)


def init_rows_per_client(config) -> int:
    """``init_share`` of ``adapters.init_samples`` over ``clients.count``."""
    return init_share(config.adapters.init_data, config.adapters.init_samples, config.clients.count)


def init_sample_rate(config, needs_init_gradients: bool, client_id: int, client_size: int) -> float | None:
    """``init_rate`` for this client, from the config and whether the method's init reads data."""
    init_data = config.adapters.init_data if needs_init_gradients else None
    return init_rate(config.privacy.enabled, init_data, init_rows_per_client(config), client_id, client_size)
