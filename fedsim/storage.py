"""Where a run's files live: a local folder, or a URI of any filesystem pyarrow understands.

``output_dir`` may be ``results/x``, ``/shared/x``, or ``s3://bucket/x`` (``gs://``, ``hdfs://``,
``file://``…; ``memory://x`` is one in-memory filesystem for the whole process, for tests and notebooks), so that worker actors on other nodes and the user's notebook read the same files.
pyarrow's filesystems do the I/O; this module only adds what they lack: a path object that keeps
the URI's options (``s3://b/x?endpoint_override=host:9000&scheme=http``) on its children, atomic
writes on a local disk (a temporary file, then a rename: a crash never leaves half a file), and a
local folder to hand to libraries that only write to a local path (PEFT's ``save_pretrained``),
copied up afterwards.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fedsim.errors import UsageError


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, *names: str) -> str:
    """``location/names…`` as text: a URI keeps its options, a relative local path stays relative."""
    if is_uri(location):
        child = Location(location)
        for name in names:
            child = child / name
        return str(child)
    return os.path.join(os.fspath(location), *names)


_MEMORY: list[pafs.FileSystem] = []  # memory://: one in-memory filesystem for the whole process (tests, notebooks)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if uri.startswith("memory://"):
        if not _MEMORY:
            _MEMORY.append(pafs._MockFileSystem())
        return _MEMORY[0], "/" + uri.removeprefix("memory://").partition("?")[0].strip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as error:
        raise UsageError(f"output_dir: cannot open {uri!r} ({str(error).splitlines()[0]}); give a local path or a URI "
                         "pyarrow understands, such as s3://bucket/run, gs://bucket/run or hdfs://host/run") from None


class Location:
    """A file or folder on a local disk or on a pyarrow filesystem; ``location / "name"`` is a child."""

    def __init__(self, location: str | os.PathLike | Location):
        if isinstance(location, Location):
            self.fs, self.path, self._root = location.fs, location.path, location._root
            return
        text = os.fspath(location)
        if is_uri(text):
            base, _, query = text.partition("?")
            self.fs, self.path = _filesystem(text)
            self.path = self.path.rstrip("/") or "/"
            # a child's URI: the given URI with the child's path in place of this one's, options kept
            self._root = (base.rstrip("/"), self.path, f"?{query}" if query else "")
        else:
            self.fs, self.path, self._root = pafs.LocalFileSystem(), os.path.abspath(text), None

    # -- names ------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return self._at(posixpath.dirname(self.path))

    def __truediv__(self, name: str) -> Location:
        return self._at(posixpath.join(self.path, name))

    def _at(self, path: str) -> Location:
        child = Location(self)
        child.path = path
        return child

    def __str__(self) -> str:
        if self._root is None:
            return self.path
        base, root_path, query = self._root
        return base + self.path[len(root_path):] + query

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def native(self) -> Path | Location:
        """What to hand back to users: a ``pathlib.Path`` on a local disk, else this Location."""
        return Path(self.path) if self.is_local else self

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is not on a local disk")
        return self.path

    # -- queries ----------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix with something under it."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            return True
        return not self.is_local and info.type == pafs.FileType.NotFound and bool(self._children())

    def _children(self) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def iterdir(self) -> list[Location]:
        """Direct children, sorted by name."""
        return sorted((self._at(info.path) for info in self._children()), key=lambda loc: loc.name)

    def glob(self, pattern: str) -> list[Location]:
        """Direct children whose name matches ``pattern`` (fnmatch), sorted by name."""
        return [child for child in self.iterdir() if fnmatch.fnmatch(child.name, pattern)]

    # -- reading ----------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_table(self, **kwargs) -> pa.Table:
        return pq.read_table(self.path, filesystem=self.fs, **kwargs)

    # -- writing ----------------------------------------------------------------------------------
    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: on a local disk through a temporary file and a rename; an object
        store's single PUT is atomic already."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "wb") as file:
                file.write(data)
            os.replace(tmp, self.path)
            return
        try:
            stream = self.fs.open_output_stream(self.path)
        except FileNotFoundError:  # a filesystem with real folders (HDFS, memory://): make the parent, then write
            self.parent.mkdir()
            stream = self.fs.open_output_stream(self.path)
        with stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_table(self, table: pa.Table, **kwargs) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kwargs)
        self.write_bytes(sink.getvalue().to_pybytes())

    def delete(self) -> None:
        """Remove this file, or this folder and everything in it; nothing if absent."""
        info = self._info()
        if info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)
        elif info.type == pafs.FileType.Directory or self.is_dir():
            self.fs.delete_dir(self.path)

    def _copy_up(self, staging: str) -> None:
        pafs.copy_files(staging, self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    @contextlib.contextmanager
    def local_folder(self) -> Iterator[Path]:
        """A local folder for writers that only take a local path; copied here when the block ends."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            yield Path(self.path)
            return
        staging = tempfile.mkdtemp(prefix="fedsim-")
        try:
            yield Path(staging)
            try:
                self._copy_up(staging)
            except FileNotFoundError:  # a filesystem with real folders (HDFS, memory://): make the folder, then copy
                self.mkdir()
                self._copy_up(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

