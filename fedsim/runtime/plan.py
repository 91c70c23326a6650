"""What the driver resolves once and every actor receives: the typed plan of a run.

The config (already validated), the method built from it, what the data preparation found (``DataPlan``),
and each client's adapter rank. Actors read these fields; they do not re-read files, re-validate the
config or recompute what is here. What changes from round to round (the clients, the global state, σ)
travels with each call.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.config import Config
from fedsim.methods import Method, build_method
from fedsim.partition import assign_ranks
from fedsim.prepare import DataPlan


@dataclass(frozen=True)
class RunPlan:
    config: Config
    method: Method
    data: DataPlan
    client_ranks: tuple[int, ...]  # clients.ranks resolved: each client's adapter rank

    @classmethod
    def resolve(cls, config: Config, data: DataPlan) -> "RunPlan":
        c = config
        ranks = assign_ranks(c.clients.ranks, c.clients.count, c.method.rank, c.seed)
        return cls(config, build_method(c.method, c.clients, c.seed), data, tuple(int(r) for r in ranks))
