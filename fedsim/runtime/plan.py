"""What the driver resolves once and every actor receives: the typed plan of a run.

The config (already validated), the method built from it, what the data preparation found (``DataPlan``),
and each client's adapter rank. Actors read these fields; they do not re-read files, re-validate the
config or recompute what is here. What changes from round to round (the clients, the global state, σ)
travels with each call.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.client_state import ClientStore
from fedsim.config import Config
from fedsim.methods import Method, build_method
from fedsim.partition import assign_ranks
from fedsim.prepare import DataPlan
from fedsim.storage import Location


@dataclass(frozen=True)
class RunPlan:
    config: Config
    method: Method
    data: DataPlan
    client_ranks: tuple[int, ...]  # clients.ranks resolved: each client's adapter rank
    output_dir: str  # the run's folder (a local path or a URI): the per-client store lives under it

    @classmethod
    def resolve(cls, config: Config, data: DataPlan, output_dir: str | None = None) -> "RunPlan":
        c = config
        ranks = assign_ranks(c.clients.ranks, c.clients.count, c.method.rank, c.seed)
        return cls(config, build_method(c.method, c.clients, c.seed), data, tuple(int(r) for r in ranks),
                   str(output_dir if output_dir is not None else c.output_dir))

    @property
    def client_store(self) -> ClientStore:
        """The clients' own tensors (a personalised method's ``client_kinds``), kept outside the workers."""
        return ClientStore(Location(self.output_dir) / "client_state")
