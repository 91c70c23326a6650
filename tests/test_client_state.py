"""The per-client tensor store: round trips (local folder and pyarrow's in-memory ``mock://`` filesystem),
versions read as of a round, the clean-up that resumes rely on, and its size and access pattern at 1,000 clients."""

import tracemalloc

import pytest
import torch

from fedsim.client_state import ClientStore, stale
from fedsim.storage import Location


def tensors(seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.0.query.lora_B": torch.randn(16, rank, generator=g),
        "enc.0.value.lora_B": torch.randn(16, rank, generator=g).to(torch.bfloat16),
        "head:classifier.weight": torch.randn(3, 16, generator=g, dtype=torch.float64),
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["local", "mock"])
def test_round_trip_is_bit_exact(tmp_path, where):
    # mock:// is pyarrow's in-memory filesystem (Location has no memory://); one Location, so one filesystem
    root = Location(tmp_path / "client_state") if where == "local" else Location("mock://bucket/run/client_state")
    store = ClientStore(root)
    assert store.read(5, 10) == {} and store.versions(5) == []  # a client never seen starts from the global state
    written = {client_id: tensors(client_id) for client_id in (0, 5, 1234)}
    for client_id, values in written.items():
        store.write(client_id, 3, values)
    for client_id, values in written.items():
        assert same(store.read(client_id, 3), values)
        assert store.versions(client_id) == [3]
    assert store.read(5, 2) == {}  # nothing as of round 2
    if where == "local":
        assert (tmp_path / "client_state" / "0001" / "00001234" / "000003.safetensors").is_file()


def test_a_read_gets_the_newest_version_at_or_before_the_round(tmp_path):
    store = ClientStore(tmp_path)
    for round_idx in (0, 2, 5):
        store.write(7, round_idx, tensors(round_idx))
    assert store.versions(7) == [0, 2, 5]
    assert same(store.read(7, 0), tensors(0)) and same(store.read(7, 1), tensors(0))
    assert same(store.read(7, 4), tensors(2)) and same(store.read(7, 99), tensors(5))
    assert store.read(7, -1) == {}
    store.write(7, 2, tensors(20))  # a round run again replaces its version
    assert store.versions(7) == [0, 2, 5] and same(store.read(7, 3), tensors(20))


def test_keep_from_deletes_only_what_no_resume_from_that_round_or_later_reads(tmp_path):
    assert stale([0, 1, 2, 3], keep_from=1) == [0]
    assert stale([0, 2, 3], keep_from=1) == []  # the newest at or before 1 is 0: kept
    assert stale([2, 3], keep_from=1) == [] and stale([0, 1], keep_from=-1) == []
    store = ClientStore(tmp_path)
    store.write(3, 0, tensors(0))
    store.write(3, 1, tensors(1))
    store.write(3, 2, tensors(2), keep_from=0)
    assert store.versions(3) == [0, 1, 2]
    store.write(3, 3, tensors(3), keep_from=2)
    assert store.versions(3) == [2, 3]
    assert same(store.read(3, 2), tensors(2))  # a resume from the round-2 checkpoint still finds its tensors


def test_rollback_removes_what_was_written_after_the_checkpoint(tmp_path):
    """A crash after some clients of round t+1 wrote, before round t+1's checkpoint: resuming from round t must not
    see them, whichever clients they were."""
    store = ClientStore(tmp_path)
    for client_id in range(4):
        store.write(client_id, 0, tensors(client_id))
    store.write(1, 1, tensors(11))
    store.write(3, 1, tensors(13))
    (tmp_path / "0000" / "00000002" / "000001.safetensors.tmp").write_bytes(b"half a file")  # a write cut short
    assert store.versions(2) == [0]  # the half-written file is not a version
    assert store.rollback(0) == 2
    assert [store.versions(c) for c in range(4)] == [[0]] * 4
    assert same(store.read(1, 1), tensors(1)) and same(store.read(3, 5), tensors(3))
    assert store.rollback(0) == 0


def test_prune_applies_keep_from_to_every_client_at_once(tmp_path):
    store = ClientStore(tmp_path)
    for client_id, rounds in {0: [0, 1, 2], 1: [0, 2], 2: [2, 3]}.items():
        for round_idx in rounds:
            store.write(client_id, round_idx, tensors(round_idx))
    assert store.prune(keep_from=1) == 1
    assert [store.versions(c) for c in range(3)] == [[1, 2], [0, 2], [2, 3]]


def test_a_thousand_clients_one_file_each_and_a_read_touches_one_file(tmp_path, monkeypatch):
    store = ClientStore(tmp_path / "client_state")
    client_ids = range(0, 2000, 2)  # 1,000 clients over two shards
    values = {"enc.0.query.lora_B": torch.zeros(32, 4), "enc.0.value.lora_B": torch.zeros(32, 4)}
    data_bytes = sum(t.numel() * t.element_size() for t in values.values())
    for client_id in client_ids:
        store.write(client_id, 0, {k: v + client_id for k, v in values.items()})
    files = [p for p in (tmp_path / "client_state").rglob("*") if p.is_file()]
    assert len(files) == 1000
    assert sorted(p.name for p in (tmp_path / "client_state").iterdir()) == ["0000", "0001"]
    sizes = [p.stat().st_size for p in files]
    assert all(data_bytes < size < data_bytes + 512 for size in sizes)  # the tensors and a small header
    print(f"1,000 clients: {sum(sizes):,} bytes in {len(files)} files ({data_bytes} bytes of tensors each)")

    listed, read = [], []
    iterdir, read_bytes = Location.iterdir, Location.read_bytes
    monkeypatch.setattr(Location, "iterdir", lambda self: listed.append(self.path) or iterdir(self))
    monkeypatch.setattr(Location, "read_bytes", lambda self: read.append(self.path) or read_bytes(self))
    got = store.read(1998, 0)
    assert torch.equal(got["enc.0.query.lora_B"], values["enc.0.query.lora_B"] + 1998)
    assert listed == [str(tmp_path / "client_state" / "0001" / "00001998")]  # one small folder listed
    assert read == [str(tmp_path / "client_state" / "0001" / "00001998" / "000000.safetensors")]  # one file read
    monkeypatch.undo()

    # nothing stays in memory between reads: reading every client leaves the heap where it was
    store.read(0, 0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for client_id in client_ids:
        store.read(client_id, 0)
    grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert grown < 256 * 1024
