"""fedsim.storage.Location on a local path and on memory:// (the same calls, one in-memory filesystem a process)."""

import pyarrow as pa
import pytest

from fedsim.storage import Location, join


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    return Location(str(tmp_path / "run") if request.param == "local" else f"memory://{tmp_path.name}/run")


def test_write_read_list_and_delete(root):
    assert not root.exists() and root.iterdir() == []
    (root / "a" / "b.txt").write_text("héllo")  # the parent folders are made
    (root / "a" / "c.bin").write_bytes(b"\x00\x01")
    assert (root / "a" / "b.txt").read_text() == "héllo" and (root / "a" / "c.bin").read_bytes() == b"\x00\x01"
    assert root.is_dir() and (root / "a").is_dir() and (root / "a" / "b.txt").is_file()
    assert [child.name for child in (root / "a").iterdir()] == ["b.txt", "c.bin"]
    assert [child.name for child in (root / "a").glob("*.txt")] == ["b.txt"]
    (root / "a" / "b.txt").delete()
    assert not (root / "a" / "b.txt").exists()
    root.delete()
    assert not root.exists()


def test_tables_and_names(root):
    table = pa.table({"round": [0, 1, 2], "x": [0.5, 1.5, 2.5]})
    (root / "rounds.parquet").write_table(table)
    assert (root / "rounds.parquet").read_table().equals(table)
    assert (root / "rounds.parquet").read_table(filters=[("round", ">", 0)]).num_rows == 2
    child = root / "checkpoints" / "round_0001.json"
    assert child.name == "round_0001.json" and child.parent == root / "checkpoints"
    assert str(child).endswith("run/checkpoints/round_0001.json")


def test_memory_is_one_filesystem_a_process_and_keeps_uri_text():
    Location("memory://shared/x.txt").write_text("1")
    assert Location("memory://shared").is_dir() and Location("memory://shared/x.txt").read_text() == "1"
    assert join("memory://shared", "y", "z") == "memory://shared/y/z"
    assert not Location("memory://shared").is_local


def test_local_folder_hands_a_real_folder_and_copies_it_up(root):
    with (root / "adapter").local_folder() as folder:
        (folder / "adapter_config.json").write_text("{}")
    assert (root / "adapter" / "adapter_config.json").read_text() == "{}"
