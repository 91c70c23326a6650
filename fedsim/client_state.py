"""Per-client tensors that persist across rounds (a personalised method's ``client_kinds``), kept outside the workers.

A worker that trains client i reads i's tensors here, overlays them on the global state
(``Method.client_state``), trains, and writes back what the method keeps (``Method.keep``). Nothing
stays in memory between reads, so memory is flat in the number of clients; the files are storage,
never communication.

Layout, under ``<output_dir>/client_state`` (a local folder or a URI: ``fedsim.storage.Location``)::

    <client_id // shard_size, 4 digits>/<client_id, 8 digits>/<round, 6 digits>.safetensors

One folder a client, so reading a client lists one small folder and reads one file, whatever the number
of clients; the shard level keeps folders to ``shard_size`` entries (1,000 clients a folder by default).

**Versions and resume.** Every write is a new file named by the round that produced it; a read asks for
the newest version at or before a round. A run that resumes from its round-t checkpoint reads as of
round t, so tensors that clients of round t+1 wrote before a crash (their checkpoint never came) are
not seen; when round t+1 runs again it overwrites them, and ``rollback(t)`` removes them outright.
``write(..., keep_from=c)`` then deletes the client's versions that no resume from round c or later
can need (all but its newest at or before c), so a client holds at most its versions after c plus one.
"""

from __future__ import annotations

import os
import re

import pyarrow.fs as pafs
import torch
from safetensors.torch import load, save

from fedsim.storage import Location

State = dict[str, torch.Tensor]

VERSION = re.compile(r"^(\d+)\.safetensors$")


class ClientStore:
    """The per-client tensors of one run, at ``location`` (e.g. ``<output_dir>/client_state``)."""

    def __init__(self, location: str | os.PathLike | Location, shard_size: int = 1000):
        self.root = Location(location)
        self.shard_size = shard_size

    def folder(self, client_id: int) -> Location:
        return self.root / f"{client_id // self.shard_size:04d}" / f"{client_id:08d}"

    def versions(self, client_id: int) -> list[int]:
        """The rounds for which ``client_id`` has tensors, ascending."""
        return sorted(int(m.group(1)) for loc in self.folder(client_id).iterdir() if (m := VERSION.match(loc.name)))

    def read(self, client_id: int, as_of_round: int) -> State:
        """The client's tensors as they were after round ``as_of_round``: its newest version at or before it;
        ``{}`` for a client that has none (it starts from the global state)."""
        usable = [v for v in self.versions(client_id) if v <= as_of_round]
        if not usable:
            return {}
        return load(self._file(client_id, usable[-1]).read_bytes())

    def write(self, client_id: int, round_idx: int, tensors: State, keep_from: int | None = None) -> None:
        """Store what ``client_id`` keeps after training in round ``round_idx`` (replacing a version of the same
        round). ``keep_from``: the oldest checkpoint round a run may still resume from; this client's versions
        that no such resume reads are deleted."""
        data = save({key: value.contiguous() for key, value in tensors.items()},
                    metadata={"client_id": str(client_id), "round": str(round_idx)})
        self._file(client_id, round_idx).write_bytes(data)
        if keep_from is not None:
            for version in stale(self.versions(client_id), keep_from):
                self._file(client_id, version).delete()

    def rollback(self, round_idx: int) -> int:
        """Delete every version written after round ``round_idx`` (call on resume from round ``round_idx``'s
        checkpoint). One listing of the whole store; returns how many files went."""
        doomed = [path for path, version in self._all_versions() if version > round_idx]
        for path in doomed:
            self.root.fs.delete_file(path)
        return len(doomed)

    def prune(self, keep_from: int) -> int:
        """``write``'s clean-up for every client at once (e.g. at the end of a run); returns how many files went."""
        by_client: dict[str, list[tuple[int, str]]] = {}
        for path, version in self._all_versions():
            by_client.setdefault(path.rsplit("/", 1)[0], []).append((version, path))
        doomed = [path for found in by_client.values() for version, path in sorted(found)
                  if version in stale([v for v, _ in found], keep_from)]
        for path in doomed:
            self.root.fs.delete_file(path)
        return len(doomed)

    def _file(self, client_id: int, round_idx: int) -> Location:
        return self.folder(client_id) / f"{round_idx:06d}.safetensors"

    def _all_versions(self) -> list[tuple[str, int]]:
        selector = pafs.FileSelector(self.root.path, recursive=True, allow_not_found=True)
        return [(info.path, int(m.group(1))) for info in self.root.fs.get_file_info(selector)
                if info.type == pafs.FileType.File and (m := VERSION.match(info.base_name))]


def stale(versions: list[int], keep_from: int) -> list[int]:
    """Versions no resume from round ``keep_from`` or later reads: all before the newest at or before ``keep_from``."""
    kept = [v for v in versions if v <= keep_from]
    return [v for v in versions if kept and v < kept[-1]]
