"""The Aggregator actor: the global state, exact aggregation by the method, bytes on the way down, checkpoints."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from fedsim.config import config_from_dict
from fedsim.methods import Upload, build_method, nbytes
from fedsim.methods.base import State
from fedsim.runtime.settings import method_settings
from fedsim.storage import Location

CHECKPOINTS_KEPT = 2


class Aggregator:
    """Ray actor (wrapped with ``ray.remote`` by the driver); also usable as a plain object in tests."""

    def __init__(self, config: dict):
        self.config = config_from_dict(config)
        self.method = build_method(self.config.method.name, method_settings(self.config))
        # runtime.aggregator_gpus: the methods compute on the device of the tensors they are given; the state stays on the CPU
        self.device = "cuda" if self.config.runtime.aggregator_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.state: State = {}
        self.broadcast_bytes = 0  # what a returning client receives next round
        self.seen: set[int] = set()  # clients that already hold the global state (first contact gets all of it)

    def set_state(self, state: State) -> None:
        self.state = canonical({key: value.cpu() for key, value in state.items()})

    def get_state(self) -> State:
        return self.state

    def downlink_bytes(self, client_ids: list[int]) -> dict[int, int]:
        """Bytes each client of the round receives: the whole state at first contact, else the last broadcast."""
        full = nbytes(self.state)
        sent = {cid: (self.broadcast_bytes if cid in self.seen else full) for cid in client_ids}
        self.seen.update(client_ids)
        return sent

    def aggregate(self, round_idx: int, *upload_lists: list[dict]) -> dict:
        """Aggregate the round's finite uploads; keep the new state; return the round's aggregation stats."""
        uploads = [Upload(u["client_id"], u["num_samples"], on(u["tensors"], self.device)) for batch in upload_lists for u in batch]
        if not uploads:
            self.broadcast_bytes = 0
            return {"agg_error": float("nan"), "layer_errors": {}, "clients_aggregated": 0}
        result = self.method.aggregate(on(self.state, self.device), uploads, round_idx)
        self.state = canonical(on(result.state, "cpu"))
        self.broadcast_bytes = nbytes(result.broadcast)
        return {"agg_error": result.agg_error, "layer_errors": result.layer_errors, "clients_aggregated": len(uploads)}

    def checkpoint(self, directory: str, round_idx: int) -> str:
        """``round_XXXX.safetensors`` (the state; never pickle) and ``round_XXXX.json`` (what else resumes need),
        in ``directory``: a local path or a URI (``fedsim.storage``)."""
        directory = Location(directory)
        stem = f"round_{round_idx:04d}"
        (directory / f"{stem}.safetensors").write_bytes(save({key: value.contiguous() for key, value in self.state.items()}))
        meta = {"round": round_idx, "broadcast_bytes": self.broadcast_bytes, "seen": sorted(self.seen)}
        (directory / f"{stem}.json").write_text(json.dumps(meta))  # written last: the json marks the checkpoint complete
        for old in directory.glob("round_*.json")[:-CHECKPOINTS_KEPT]:
            old.delete()
            (directory / old.name.replace(".json", ".safetensors")).delete()
        return str(directory / stem)

    def restore(self, stem: str) -> int:
        """Load the checkpoint ``stem`` (``…/checkpoints/round_XXXX``, as ``latest_checkpoint`` names it)."""
        directory, name = Location(stem).parent, Location(stem).name
        meta = json.loads((directory / f"{name}.json").read_text())
        self.state = canonical(load((directory / f"{name}.safetensors").read_bytes()))
        self.broadcast_bytes = meta["broadcast_bytes"]
        self.seen = set(meta["seen"])
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
