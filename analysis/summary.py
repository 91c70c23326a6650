"""The answer a run ends with: one row per run, from the run's own files.

    from analysis.summary import summary_table, format_summary
    summary_table("results/default")          # a DataFrame (pandas installed) or an Arrow table
    print(format_summary(summary_rows("results/default")))

`fedsim run` prints `format_summary` when it ends, and `fedsim report` before its report. Every
number comes from ``rounds.parquet``, ``clients.parquet`` and ``summary.json``:

- ``final_metric``: the last evaluated round's ``eval_metric`` (``rounds.parquet``);
- ``up_per_client_round``: the mean ``bytes_up`` of the clients' rows that sent anything (``clients.parquet``);
- ``down_per_client_round``: the mean ``bytes_down`` of returning clients' rows (a client's rows after
  its first), what a client receives each round it takes part once it holds the state;
- ``down_first_contact``: the mean ``bytes_down`` of each client's first row (the whole global state:
  for Fed-SB its frozen B and A too);
- ``bytes_up``, ``bytes_down``: the totals over all rounds and clients (``rounds.parquet``);
- ``max_agg_error``: the largest aggregation error of any round (``rounds.parquet``);
- ``wall_s``: the run's wall time (``summary.json``; the sum of the rounds' ``wall_s`` where it is absent);
- ``epsilon``: the largest ε any client spent (``epsilon_max`` of ``rounds.parquet``), private runs only;
- ``init_s``: a client's compute to build the round-0 adapters itself (``adapters.init_at: client``): the mean
  ``init_s`` of the first contacts (``clients.parquet``), runs that have it only;
- ``produced_by``: the versions, code revision, devices and seed that produced the run (``summary.json``), the footer.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from analysis.results import Run, _as_runs, as_frame, run_labels
from fedsim.provenance import one_line

SUMMARY_COLUMNS = ["run", "method", "rank", "rounds", "final_metric", "up_per_client_round", "down_per_client_round",
                   "down_first_contact", "bytes_up", "bytes_down", "max_agg_error", "wall_s", "epsilon", "init_s"]


def _values(table: pa.Table | None, name: str) -> np.ndarray:
    if table is None or name not in table.column_names:
        return np.zeros(0)
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _first_rows(clients: pa.Table | None) -> np.ndarray:
    """True on each client's first row (its first contact with the server), by round."""
    rounds, client_ids = _values(clients, "round"), _values(clients, "client_id")
    first = np.zeros(rounds.size, bool)
    if rounds.size:
        order = np.lexsort((rounds, client_ids))
        starts = np.r_[True, client_ids[order][1:] != client_ids[order][:-1]]
        first[order[starts]] = True
    return first


def run_summary(run: Run, label: str | None = None) -> dict:
    """The closing row of one run (see the module's docstring for where each number comes from)."""
    rounds, clients = run.rounds, run.clients
    metric = _values(rounds, "eval_metric")
    metric = metric[np.isfinite(metric)]
    up, down = _values(clients, "bytes_up"), _values(clients, "bytes_down")
    first = _first_rows(clients)
    agg_error = _values(rounds, "agg_error")
    agg_error = agg_error[np.isfinite(agg_error)]
    epsilon = _values(rounds, "epsilon_max")
    epsilon = epsilon[np.isfinite(epsilon)]
    init_s = _values(clients, "init_s") if clients is not None and "init_s" in clients.column_names else np.zeros(first.size)
    method = run.config.get("method") if isinstance(run.config.get("method"), dict) else {}
    wall_s = run.summary.get("wall_s")
    return {
        "run": label or run.name,
        "method": method.get("name", run.name),
        "rank": method.get("rank"),
        "rounds": rounds.num_rows,
        "final_metric": float(metric[-1]) if metric.size else math.nan,
        "up_per_client_round": _mean(up[up > 0]),
        "down_per_client_round": _mean(down[~first & (down > 0)]),
        "down_first_contact": _mean(down[first & (down > 0)]),
        "bytes_up": int(_values(rounds, "bytes_up").sum()),
        "bytes_down": int(_values(rounds, "bytes_down").sum()),
        "max_agg_error": float(agg_error.max()) if agg_error.size else math.nan,
        "wall_s": float(wall_s) if wall_s is not None else float(_values(rounds, "wall_s").sum()),
        "epsilon": float(epsilon.max()) if epsilon.size else math.nan,
        "init_s": _mean(init_s[first & (init_s > 0)]),
        "produced_by": one_line(run.provenance) if run.provenance else None,
    }


def summary_rows(paths) -> list[dict]:
    """One closing row per run under ``paths`` (run folders, comparison folders or `Run` objects)."""
    runs = _as_runs(paths)
    return [run_summary(run, label) for run, label in zip(runs, run_labels(runs))]


def summary_table(paths, as_arrow: bool = False):
    """`summary_rows` as a table: a pandas DataFrame where pandas is installed, else (or with ``as_arrow=True``) Arrow."""
    return as_frame(pa.Table.from_pylist(summary_rows(paths)).select(SUMMARY_COLUMNS), as_arrow)


def human_bytes(value: float) -> str:
    """12345678 → '12.3 MB' (powers of 1000); NaN → '—'."""
    if not math.isfinite(value):
        return "—"
    for factor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= factor:
            return f"{value / factor:.1f} {unit}"
    return f"{value:.0f} B"


def _number(value: float, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def format_summary(rows: list[dict], metric: str = "accuracy") -> str:
    """The closing table: a line per run. Bytes per client per round in bytes; totals in kB/MB/GB."""
    private = any(math.isfinite(row["epsilon"]) for row in rows)
    built = any(math.isfinite(row.get("init_s", math.nan)) for row in rows)  # adapters.init_at: client
    header = ["run", "rank", f"final {metric}", "up B/client/round", "down B/client/round", "first contact B",
              "up, all", "down, all", "max agg error", "wall s"] + (["ε"] if private else []) + (["client init s"] if built else [])
    body = []
    for row in rows:
        cells = [row["run"], "—" if row["rank"] is None else str(row["rank"]), _number(row["final_metric"], ".4f"),
                 _number(row["up_per_client_round"], ",.0f"), _number(row["down_per_client_round"], ",.0f"),
                 _number(row["down_first_contact"], ",.0f"), human_bytes(row["bytes_up"]), human_bytes(row["bytes_down"]),
                 _number(row["max_agg_error"], ".2e"), _number(row["wall_s"], ".1f")]
        if private:
            cells.append(_number(row["epsilon"], ".2f"))
        if built:
            cells.append(_number(row.get("init_s", math.nan), ".2f"))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(b) for b in body), *produced_by(rows)])


def produced_by(rows: list[dict]) -> list[str]:
    """The table's footer: what produced the runs (``fedsim.provenance.one_line``), once where all runs share it."""
    lines = {row["run"]: row["produced_by"] for row in rows if row.get("produced_by")}
    if len(set(lines.values())) == 1:
        return [f"produced by: {next(iter(lines.values()))}"]
    return [f"produced by ({run}): {line}" for run, line in lines.items()]


def verdict(rows: list[dict], metric: str = "accuracy") -> str:
    """One line comparing the runs as measured: who ends highest, and who sends least per client per round."""
    scored = [row for row in rows if math.isfinite(row["final_metric"])]
    parts = []
    if scored:
        best = max(scored, key=lambda row: row["final_metric"])
        others = ", ".join(f"{row['run']} {row['final_metric']:.4f}" for row in scored if row is not best)
        parts.append(f"highest final {metric}: {best['run']} {best['final_metric']:.4f}" + (f" (then {others})" if others else ""))
    sent = [row for row in rows if math.isfinite(row["up_per_client_round"])]
    if sent:
        least = min(sent, key=lambda row: row["up_per_client_round"])
        ratios = ", ".join(f"{row['run']} {row['up_per_client_round'] / least['up_per_client_round']:.2f}×"
                           for row in sent if row is not least)
        parts.append(f"least sent up per client per round: {least['run']}" + (f" (then {ratios})" if ratios else ""))
    return "; ".join(parts) + "." if parts else ""
