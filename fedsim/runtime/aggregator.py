"""The Aggregator actor: the global state, exact aggregation by the method, bytes on the way down, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedsim.config import config_from_dict
from fedsim.methods import Upload, build_method, nbytes
from fedsim.methods.base import State
from fedsim.runtime.settings import method_settings

CHECKPOINTS_KEPT = 2


class Aggregator:
    """Ray actor (wrapped with ``ray.remote`` by the driver); also usable as a plain object in tests."""

    def __init__(self, config: dict):
        self.config = config_from_dict(config)
        self.method = build_method(self.config.method.name, method_settings(self.config))
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
        uploads = [Upload(u["client_id"], u["num_samples"], u["tensors"]) for batch in upload_lists for u in batch]
        if not uploads:
            self.broadcast_bytes = 0
            return {"agg_error": float("nan"), "layer_errors": {}, "clients_aggregated": 0}
        result = self.method.aggregate(self.state, uploads, round_idx)
        self.state = canonical(result.state)
        self.broadcast_bytes = nbytes(result.broadcast)
        return {"agg_error": result.agg_error, "layer_errors": result.layer_errors, "clients_aggregated": len(uploads)}

    def checkpoint(self, directory: str, round_idx: int) -> str:
        """``round_XXXX.safetensors`` (the state; never pickle) and ``round_XXXX.json`` (what else resumes need)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"round_{round_idx:04d}"
        save_file({key: value.contiguous() for key, value in self.state.items()}, f"{stem}.safetensors")
        meta = {"round": round_idx, "broadcast_bytes": self.broadcast_bytes, "seen": sorted(self.seen)}
        Path(f"{stem}.json.tmp").write_text(json.dumps(meta))
        Path(f"{stem}.json.tmp").replace(f"{stem}.json")  # the json marks the checkpoint complete
        for old in sorted(directory.glob("round_*.json"))[:-CHECKPOINTS_KEPT]:
            old.unlink()
            old.with_suffix(".safetensors").unlink(missing_ok=True)
        return str(stem)

    def restore(self, stem: str) -> int:
        meta = json.loads(Path(f"{stem}.json").read_text())
        self.state = canonical(load_file(f"{stem}.safetensors"))
        self.broadcast_bytes = meta["broadcast_bytes"]
        self.seen = set(meta["seen"])
        return meta["round"]


def canonical(state: State) -> State:
    """Keys in sorted order, as a checkpoint reloads them: sums over layers then run in the same order after a resume."""
    return dict(sorted(state.items()))


def latest_checkpoint(directory: Path) -> str | None:
    complete = sorted(directory.glob("round_*.json"))
    return str(complete[-1].with_suffix("")) if complete else None
