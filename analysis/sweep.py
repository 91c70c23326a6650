"""Sweeps: run a grid of configs (methods × client counts × ranks × ε …) and gather them in one Parquet table.

    fedsim sweep my.yaml train.rounds=10 --grid method.name=fed-sb,fedit clients.count=10,100 method.rank=4,16

Each grid point is the config (the embedded default, CONFIG, the fixed key=value overrides) with the
point's values, written to ``<output_dir>/<point name>/``. All points run under one Ray session —
local by default, or a cluster with ``runtime.address=auto`` (or ``RAY_ADDRESS``), e.g. inside a
``fedsim submit`` job. Points already finished (their ``summary.json`` exists) are skipped unless
``overwrite``, so a stopped sweep resumes where it stopped. Then every point's ``rounds.parquet`` is
gathered into ``<output_dir>/sweep.parquet`` with a ``point`` column and one column per grid key.
"""

from __future__ import annotations

import copy
import itertools
import re
import pyarrow as pa
import yaml

from fedsim.errors import UsageError
from fedsim.storage import Location, join

SWEEP_FILE = "sweep.parquet"


def split_values(text: str) -> list[str]:
    """``a,b,[x,y]`` → ``['a', 'b', '[x,y]']``: commas inside brackets or braces do not split."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_grid(items: list[str], flag: str = "--grid", required: bool = True) -> dict[str, list]:
    """``["method.name=fed-sb,fedit", "clients.count=10,100"]`` → ``{"method.name": ["fed-sb", "fedit"], ...}`` (values as
    YAML). ``flag``: the option the items came from, as the errors name it (``fedsim tune --space`` lists values too);
    ``required``: at least one key (``--space`` may hold only distributions)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag}: expected key=v1,v2,... (e.g. method.name=fed-sb,fedit), got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        if not key:
            raise UsageError(f"{flag}: missing key in {item!r}")
        if key in grid:
            raise UsageError(f"{flag}: {key} is given twice")
        values = [yaml.safe_load(v) for v in split_values(text)]
        if not values:
            raise UsageError(f"{flag}: {key} has no values; write {key}=v1,v2")
        if key == "output_dir":
            raise UsageError(f"{flag}: output_dir cannot vary; each point writes to <output_dir>/<point name>")
        grid[key] = values
    if not grid and required:
        raise UsageError(f"{flag}: give at least one key=v1,v2,... (e.g. {flag} method.name=fed-sb,fedit)")
    return grid


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination, in the order given (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict) -> str:
    """A folder name from a point: ``name-fed-sb_count-100`` (the last part of each key, unsafe characters replaced)."""
    parts = []
    for key, value in point.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key.split('.')[-1]}-{text}")
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", "_".join(parts))


def _set(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"--grid: {key}: {part} is not a section")
    node[parts[-1]] = value


def point_config(base: dict, point: dict, output_dir: str, seed: int | None = None):
    """The resolved ``Config`` of one point (of a sweep's grid, or a tune's trial): ``base`` (the config dict with the
    fixed overrides) with the point's values, its own ``output_dir`` and, where given, ``seed``."""
    from fedsim.config import config_from_dict
    from fedsim.methods import resolved

    data = copy.deepcopy(base)
    for key, value in point.items():
        _set(data, key, value)
    if seed is not None:
        data["seed"] = seed
    data["output_dir"] = output_dir
    config = config_from_dict(data)
    config.method = resolved(config.method)  # method.name and the method's own settings
    return config


def sweep_configs(config_path: str | None, grid: dict[str, list], overrides: list[str] = (), output_dir: str | None = None):
    """``[(point, point name, Config)]`` for every grid point; every config is validated before anything runs."""
    from fedsim.config import load_config_dict

    base = load_config_dict(config_path, list(overrides))
    root_text = str(output_dir or base.get("output_dir") or "results/sweep")
    root = Location(root_text)
    points = expand_grid(grid)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise UsageError("--grid: two points get the same folder name; make the values differ in more than punctuation")
    out = []
    for point, name in zip(points, names):
        try:
            config = point_config(base, point, join(root_text, name))
        except UsageError as error:
            raise UsageError(f"--grid point {name}: {error}") from None
        out.append((point, name, config))
    return root, out


def run_sweep(config_path, grid, overrides=(), output_dir=None, overwrite: bool = False, progress: bool = True,
              dry_run: bool = False) -> Location:
    """Run every point not yet finished under one Ray session, then gather; return the path of ``sweep.parquet``."""
    root, points = sweep_configs(config_path, dict(grid), overrides, output_dir)
    todo = [(p, n, c) for p, n, c in points if overwrite or not (root / n / "summary.json").is_file()]
    if dry_run:
        for point, name, _ in points:
            state = "run" if any(name == n for _, n, _ in todo) else "done, skipped"
            print(f"{name}: {point} ({state})")
        return (root / SWEEP_FILE).native()
    if todo:
        from fedsim.runtime import run_comparison

        # unfinished points: a stopped run of a point is started again from scratch
        run_comparison([c for _, _, c in todo], str(root), overwrite=True, progress=progress)
    return gather(root, [(p, n) for p, n, _ in points])


def gather(root, points: list[tuple[dict, str]] | None = None) -> Location:
    """Stack every point's rounds (with ``point`` and the grid values as columns) into ``root/sweep.parquet``."""
    root = Location(root)
    if points is None:  # every run folder under root, with no grid columns
        points = [({}, p.name) for p in root.iterdir() if (p / "rounds.parquet").is_file()]
    tables = []
    for point, name in points:
        path = root / name / "rounds.parquet"
        if not path.is_file():
            continue
        table = path.read_table()
        n = table.num_rows
        table = table.add_column(0, "point", pa.array([name] * n, pa.string()))
        for i, (key, value) in enumerate(point.items()):
            column = pa.array([value if not isinstance(value, (list, dict)) else str(value)] * n)
            table = table.add_column(1 + i, key, column)
        tables.append(table)
    if not tables:
        raise UsageError(f"sweep: no finished points under {root}")
    out = root / SWEEP_FILE
    out.write_table(pa.concat_tables(tables, promote_options="permissive"))
    return out.native()
