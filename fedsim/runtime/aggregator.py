"""The Aggregator actor: the global state, exact aggregation by the method, the server optimizer's step, bytes on the way
down, checkpoints."""

from __future__ import annotations

import json
import threading
import time

import torch
from safetensors.torch import load, save

from fedsim.adapters.state import State, key_kind, nbytes
from fedsim.methods import Upload
from fedsim.methods.downlink import Downlinks
from fedsim.presum import PartialSum, combine
from fedsim.runtime.plan import RunPlan
from fedsim.server_optimizer import ServerOptimizer
from fedsim.storage import Location
from fedsim.training.scaffold import PREFIX as CONTROL, ServerControl, controls, without_controls

CHECKPOINTS_KEPT = 2
SERVER_PREFIX = "server:"  # the aggregator's own tensors in a checkpoint: "server:<part>.<name>"


class Aggregator:
    """Ray actor (wrapped with ``ray.remote`` by the driver, threaded so that a checkpoint is written while the next
    round runs); also usable as a plain object in tests."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.method = plan.method
        # runtime.aggregator_gpus: the methods compute on the device of the tensors they are given; the state stays on the CPU
        self.device = "cuda" if plan.config.runtime.aggregator_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.state: State = {}
        self.downlinks = Downlinks(self.method, plan.config.adapters.init_at == "client")  # what each client receives
        self.server_optimizer = ServerOptimizer.from_config(plan.config.server)
        # The aggregator's own state beside the global one, by part: each part's ``state_dict`` is checkpointed with the
        # state as "server:<part>.<name>" and given back to its ``load_state_dict`` on resume (a server control variate
        # would be one more part).
        self.control = ServerControl()  # SCAFFOLD's server control variate c (train.control_variates), by state key
        self.server_parts = {"optimizer": self.server_optimizer, "control": self.control}
        self.snapshots: dict[int, tuple[State, dict]] = {}  # rounds aggregated but not yet checkpointed
        self.lock = threading.Lock()

    def set_state(self, state: State) -> None:
        self.state = canonical({key: value.cpu() for key, value in state.items()})

    def get_state(self) -> State:
        return self.state

    def round_message(self) -> State:
        """What the clients of a round train from: the global state and, under SCAFFOLD, the server's control variates."""
        return {**self.state, **self.control_message()}

    def control_message(self) -> State:
        """SCAFFOLD's c as it travels: ``control:<key>`` (empty without train.control_variates, and in round 0)."""
        return {CONTROL + key: value for key, value in self.control.c.items()}

    def downlink_bytes(self, client_ids: list[int], round_idx: int) -> dict[int, int]:
        """Bytes each client receives at the start of ``round_idx`` (``fedsim.methods.downlink``)."""
        ranks = self.plan.client_ranks
        control_bytes = nbytes(self.control_message())  # SCAFFOLD: c changes every round
        return {cid: nbytes(self.downlinks.message(self.state, cid, ranks[cid], round_idx)) + control_bytes for cid in client_ids}

    def aggregate(self, round_idx: int, sampled: list[int], *upload_lists: list[dict]) -> dict:
        """The round's downlink bytes (to ``sampled``, before the state changes), then the aggregate of its finite
        uploads: the new state is kept (and held for its checkpoint); returns the round's aggregation stats."""
        start = time.perf_counter()
        bytes_down = self.downlink_bytes(sampled, round_idx)
        items = [item for batch in upload_lists for item in batch]
        parts = [item for item in items if isinstance(item, PartialSum) and item.clients]  # runtime.presum
        uploads = [Upload(u["client_id"], u["num_samples"], u["tensors"]) for u in items if not isinstance(u, PartialSum)]
        if any(controls(u.tensors) for u in uploads):  # SCAFFOLD: c ← c + Σ Δc_i / N; the method sees its own tensors only
            self.control.update([u.tensors for u in uploads], self.plan.config.clients.count, self.state)
            uploads = [Upload(u.client_id, u.num_samples, without_controls(u.tensors)) for u in uploads]
        aggregated = len(uploads) + sum(len(part.clients) for part in parts)
        stats = {"bytes_down": bytes_down, "agg_error": float("nan"), "agg_error_se": float("nan"), "layer_errors": {},
                 "clients_aggregated": aggregated}
        old_state, broadcast = self.state, {}
        if aggregated:
            if parts:
                result, standard_error = combine(self.method, self.state, parts, round_idx, self.plan.config.seed)
            else:
                uploads = [Upload(u.client_id, u.num_samples, on(u.tensors, self.device)) for u in uploads]
                result, standard_error = self.method.aggregate(on(self.state, self.device), uploads, round_idx), 0.0
            self.state, broadcast = canonical(on(result.state, "cpu")), on(result.broadcast, "cpu")
            if not self.server_optimizer.is_identity:
                self.state, broadcast = self.server_step(old_state, self.state, broadcast, round_idx)
            stats.update(agg_error=result.agg_error, agg_error_se=standard_error, layer_errors=result.layer_errors)
        self.downlinks.aggregated(old_state, self.state, broadcast, round_idx)
        with self.lock:
            self.snapshots[round_idx] = (self.saved_state(), self._meta(round_idx))
        stats["aggregate_s"] = time.perf_counter() - start
        return stats

    def server_step(self, old_state: State, new_state: State, broadcast: State, round_idx: int) -> tuple[State, State]:
        """The server optimizer's step on the tensors the method averaged this round (``Method.averaged_kinds``; the other
        tensors as the method left them): the new state, and the broadcast carrying the stepped tensors. ``agg_error``
        stays the aggregate's, measured before the step."""
        kinds = self.method.averaged_kinds(round_idx)
        if kinds is None:  # refused before the run (fedsim.server_optimizer.check_server_optimizer)
            raise ValueError(f"{self.method.name} does not aggregate by a mean in round {round_idx}: no server step")
        keys = [key for key in new_state if key_kind(key) in kinds]
        stepped = self.server_optimizer.step({key: old_state[key] for key in keys}, {key: new_state[key] for key in keys})
        return {**new_state, **stepped}, {**broadcast, **stepped}

    def saved_state(self) -> State:
        """What a checkpoint holds: the global state and the aggregator's own tensors (``server_parts``)."""
        return {**self.state, **{f"{SERVER_PREFIX}{part}.{name}": value for part, holder in self.server_parts.items()
                                 for name, value in holder.state_dict().items()}}

    def _meta(self, round_idx: int) -> dict:
        return {"round": round_idx, "downlinks": self.downlinks.to_json()}

    def checkpoint(self, directory: str, round_idx: int) -> str:
        """``round_XXXX.safetensors`` (the state after round ``round_idx``; never pickle) and ``round_XXXX.json`` (what
        else a resume needs), in ``directory``: a local path or a URI (``fedsim.storage``)."""
        with self.lock:
            state, meta = self.snapshots.pop(round_idx) if round_idx in self.snapshots else (self.saved_state(), self._meta(round_idx))
        directory = Location(directory)
        stem = f"round_{round_idx:04d}"
        (directory / f"{stem}.safetensors").write_bytes(save({key: value.contiguous() for key, value in state.items()}))
        (directory / f"{stem}.json").write_text(json.dumps(meta))  # written last: the json marks the checkpoint complete
        for old in directory.glob("round_*.json")[:-CHECKPOINTS_KEPT]:
            old.delete()
            (directory / old.name.replace(".json", ".safetensors")).delete()
        return str(directory / stem)

    def restore(self, stem: str) -> int:
        """Load the checkpoint ``stem`` (``…/checkpoints/round_XXXX``, as ``latest_checkpoint`` names it)."""
        directory, name = Location(stem).parent, Location(stem).name
        meta = json.loads((directory / f"{name}.json").read_text())
        saved = load((directory / f"{name}.safetensors").read_bytes())
        self.state = canonical({key: value for key, value in saved.items() if not key.startswith(SERVER_PREFIX)})
        for part, holder in self.server_parts.items():
            prefix = f"{SERVER_PREFIX}{part}."
            holder.load_state_dict({key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)})
        self.downlinks.load_json(meta["downlinks"])
        return meta["round"]


def on(state: State, device: str) -> State:
    """The tensors of ``state`` on ``device`` (the same objects where they are there already)."""
    return {key: value.to(device) for key, value in state.items()}


def canonical(state: State) -> State:
    """Keys in sorted order, as a checkpoint reloads them: sums over layers then run in the same order after a resume."""
    return dict(sorted(state.items()))


def latest_checkpoint(directory) -> str | None:
    """The newest complete checkpoint in ``directory`` (a path or URI), as ``…/round_XXXX``; None if there is none."""
    directory = Location(directory)
    complete = directory.glob("round_*.json")
    return str(directory / complete[-1].name.removesuffix(".json")) if complete else None
