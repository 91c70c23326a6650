"""Readers of a fedsim run's output folder.

A run folder holds ``config.yaml``, ``rounds.parquet`` (a row per round), ``clients.parquet`` (a row
per client per round), ``summary.json``, ``provenance.json`` (what produced it, at each start) and
``label_counts.parquet``. A comparison folder holds one run folder per method. These functions read them for plots and notebooks::

    from analysis.results import find_runs, load_run, runs_table, clients_table
    runs = [load_run(p) for p in find_runs("results/default")]
    rounds = runs_table(runs)         # rounds of every run, with a `run` column
    clients = clients_table(runs)     # a row per client per round of every run

The tables handed back (`runs_table`, `clients_table`, `analysis.summary.summary_table`) are pandas
DataFrames where pandas is installed (the `notebooks` extra installs it) and Arrow tables where it
is not; `as_arrow=True` always gives the Arrow table. A `Run` holds its tables as read, in Arrow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from fedsim.errors import UsageError
from fedsim.provenance import PACKAGES, PROVENANCE_FILE
from fedsim.storage import Location

ROUNDS_FILE = "rounds.parquet"
CLIENTS_FILE = "clients.parquet"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
LABEL_COUNTS_FILE = "label_counts.parquet"


def as_frame(table: pa.Table, as_arrow: bool = False):
    """``table`` as a pandas DataFrame where pandas is installed, else (or with ``as_arrow=True``) the Arrow table itself."""
    if as_arrow:
        return table
    try:
        import pandas  # noqa: F401  (the `notebooks` extra)
    except ImportError:
        return table
    return table.to_pandas()


@dataclass
class Run:
    """One run's results: its folder (a local path or a URI such as s3://bucket/run), name (the method), resolved config and
    tables (Arrow, as read; ``runs_table(run)`` and ``clients_table(run)`` give DataFrames)."""

    path: Path | Location
    name: str
    config: dict
    rounds: pa.Table
    clients: pa.Table | None = None
    summary: dict = field(default_factory=dict)

    @property
    def label_counts_path(self) -> Location:
        return self.path / LABEL_COUNTS_FILE

    @property
    def provenance(self) -> dict:
        """What produced the run (``fedsim.provenance``): summary.json's record, else (a run not finished) the last start's
        in provenance.json, else {} (a run written before fedsim recorded it)."""
        if "provenance" in self.summary:
            return self.summary["provenance"]
        starts = self.path / PROVENANCE_FILE
        if starts.is_file():
            loaded = json.loads(starts.read_text())
            return loaded[-1] if loaded else {}
        return {}


def provenance_columns(run: Run) -> dict:
    """A run's provenance as flat columns a notebook can group by: each library's version (``python``, ``fedsim``, ``torch``,
    ``transformers``, …), ``git_revision``, ``git_dirty``, ``devices``, ``torch_threads`` and ``seed``; None where not recorded."""
    record = run.provenance
    versions = record.get("versions", {})
    git = record.get("git") or {}
    columns = {name: versions.get(name) for name in ("python", *PACKAGES)}
    columns.update({"git_revision": git.get("revision"), "git_dirty": git.get("dirty"),
                    "devices": ", ".join(record["devices"]) if "devices" in record else None,
                    "torch_threads": ", ".join(map(str, record["torch_threads"])) if "torch_threads" in record else None,
                    "seed": record.get("seed")})
    return columns


def _with_provenance(table: pa.Table, run: Run) -> pa.Table:
    types = {"git_dirty": pa.bool_(), "seed": pa.int64()}
    for name, value in provenance_columns(run).items():
        if name not in table.column_names:
            table = table.append_column(name, pa.array([value] * table.num_rows, types.get(name, pa.string())))
    return table


def _is_run(path: Location) -> bool:
    return (path / ROUNDS_FILE).is_file()


def find_runs(path) -> list[Path | Location]:
    """`path` itself if it is a run folder, else its direct subfolders that are (sorted by name)."""
    path = Location(path)
    if path.is_file() and path.name == ROUNDS_FILE:
        path = path.parent
    if not path.is_dir():
        raise UsageError(f"results: {path} is not a folder; pass the output_dir of a fedsim run (or a folder of runs)")
    if _is_run(path):
        return [path.native()]
    runs = [p.native() for p in path.iterdir() if _is_run(p)]
    if not runs:
        raise UsageError(
            f"results: {path} has no {ROUNDS_FILE} (and no run subfolders); pass the output_dir of a fedsim run"
        )
    return runs


def _read_parquet(path: Location) -> pa.Table:
    try:
        return path.read_table()
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"results: cannot read {path} as Parquet ({exc}); is the run still writing it?") from None


def load_run(path) -> Run:
    """Read a run folder (a local path or a URI). Name: `method.name` from config.yaml, else the folder's name."""
    path = Location(path)
    if path.is_file() and path.name == ROUNDS_FILE:
        path = path.parent
    if not path.is_dir():
        raise UsageError(f"results: {path} is not a folder; pass the output_dir of a fedsim run")
    if not _is_run(path):
        raise UsageError(f"results: {path} has no {ROUNDS_FILE}; pass the output_dir of a fedsim run")

    config = _read_mapping(path / CONFIG_FILE, yaml.safe_load, yaml.YAMLError, "YAML")
    summary = _read_mapping(path / SUMMARY_FILE, json.loads, json.JSONDecodeError, "JSON")

    method = config.get("method")
    name = method.get("name") if isinstance(method, dict) else method if isinstance(method, str) else None
    clients_path = path / CLIENTS_FILE
    return Run(
        path=path.native(),
        name=str(name) if name else path.name,
        config=config,
        rounds=_read_parquet(path / ROUNDS_FILE),
        clients=_read_parquet(clients_path) if clients_path.is_file() else None,
        summary=summary,
    )


def _as_runs(paths_or_runs) -> list[Run]:
    """Runs from Run objects, run folders or comparison folders (a single one, or a list)."""
    if isinstance(paths_or_runs, (str, Path, Location, Run)):
        paths_or_runs = [paths_or_runs]
    runs: list[Run] = []
    for item in paths_or_runs:
        if isinstance(item, Run):
            runs.append(item)
        else:
            runs.extend(load_run(p) for p in find_runs(item))
    return runs


def run_labels(runs: list[Run]) -> list[str]:
    """Display names: the run's name, made unique with its folder name where two runs share one (the folder name alone
    where it starts with the run's: `fed-sb-init_atclient`, as `fedsim run --methods` names a member's folder)."""
    names = [r.name for r in runs]
    labels = []
    for run in runs:
        if names.count(run.name) > 1 and run.path.name.startswith(f"{run.name}-"):
            labels.append(run.path.name)
        elif names.count(run.name) > 1 and run.path.name != run.name:
            labels.append(f"{run.name} ({run.path.name})")
        else:
            labels.append(run.name)
    # Still duplicated (same name and same folder name, different parents): number them.
    return [f"{lab} #{labels[:i].count(lab) + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def with_cumulative_bytes(rounds: pa.Table) -> pa.Table:
    """`rounds` sorted by round, with `bytes_up_cum` and `bytes_down_cum` (running totals) appended."""
    if "round" in rounds.column_names:
        rounds = rounds.sort_by("round")
    for col in ("bytes_up", "bytes_down"):
        name = f"{col}_cum"
        if name in rounds.column_names:
            rounds = rounds.drop_columns([name])
        if col in rounds.column_names:
            values = pc.fill_null(rounds[col].cast(pa.int64()), 0)
            rounds = rounds.append_column(name, pc.cumulative_sum(values))
    return rounds


def runs_table(paths, as_arrow: bool = False):
    """The rounds tables of several runs stacked, with a `run` column (first), cumulative bytes, and the run's provenance
    (``provenance_columns``: group by ``transformers`` or ``git_revision``).

    `paths`: run folders, comparison folders or `Run` objects (one or a list). Rows are sorted by
    round within each run; runs keep the order given. Columns missing from one run are null there.
    A pandas DataFrame where pandas is installed, else (or with ``as_arrow=True``) an Arrow table.
    """
    runs = _as_runs(paths)
    if not runs:
        raise UsageError("results: no runs given; pass run folders or a folder of runs")
    tables = []
    for run, label in zip(runs, run_labels(runs)):
        rounds = _with_provenance(with_cumulative_bytes(run.rounds), run)
        tables.append(rounds.add_column(0, "run", pa.array([label] * rounds.num_rows, pa.string())))
    return as_frame(pa.concat_tables(tables, promote_options="permissive"), as_arrow)


def clients_table(paths, as_arrow: bool = False):
    """The clients tables (a row per client per round) of several runs stacked, with a `run` column first and the run's
    provenance (``provenance_columns``) last.

    Runs without a ``clients.parquet`` add no rows. A pandas DataFrame where pandas is installed,
    else (or with ``as_arrow=True``) an Arrow table.
    """
    runs = _as_runs(paths)
    if not runs:
        raise UsageError("results: no runs given; pass run folders or a folder of runs")
    tables = [_with_provenance(run.clients, run).add_column(0, "run", pa.array([label] * run.clients.num_rows, pa.string()))
              for run, label in zip(runs, run_labels(runs)) if run.clients is not None]
    if not tables:
        raise UsageError(f"results: no {CLIENTS_FILE} in {', '.join(str(r.path) for r in runs)}")
    return as_frame(pa.concat_tables(tables, promote_options="permissive"), as_arrow)


def _read_mapping(file: Location, parse, error: type[Exception], kind: str) -> dict:
    """A YAML or JSON file holding a mapping; ``{}`` when the file is absent or holds something else."""
    if not file.is_file():
        return {}
    try:
        loaded = parse(file.read_text())
    except error as exc:
        raise UsageError(f"results: {file} is not valid {kind} ({str(exc).splitlines()[0]})") from None
    return loaded if isinstance(loaded, dict) else {}
