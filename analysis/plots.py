"""Plots of a run's results (matplotlib, no global state: figures are built with ``Figure`` directly).

    python -m analysis.plots results/default      # comparison.png + each run's plot.png

``plot_runs`` draws six panels per set of runs (eval metric per round, eval metric against cumulative
bytes, each run's rank and bytes per client per round, train loss, aggregation error, cumulative
bytes per round); ``plot_label_counts`` draws the non-IID split of a run's data over its clients.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.results import LABEL_COUNTS_FILE, Run, _as_runs, find_runs, load_run, run_labels, with_cumulative_bytes
from analysis.summary import human_bytes, run_summary
from fedsim.errors import UsageError
from fedsim.storage import Location

AGG_ERROR_FLOOR = 1e-12  # zeros (exact aggregation) are drawn here on the log axis
MAX_CLIENTS_SHOWN = 50
DPI = 110


def save_figure(fig: Figure, path) -> Path | Location:
    """Write ``fig`` as a PNG to a local path or a URI (``fedsim.storage``); return where."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    location = Location(path)
    location.write_bytes(buffer.getvalue())
    return location.native()


def _column(table, name) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def _describe(runs: list[Run]) -> str:
    """A subtitle from the first run's config: workload, model, clients."""
    cfg = runs[0].config
    parts = []
    for key, label in (("workload", "workload"), ("model", "model")):
        value = cfg.get(key)
        name = value.get("name") if isinstance(value, dict) else value
        if name:
            parts.append(f"{label} {name}")
    clients = cfg.get("clients")
    if isinstance(clients, dict) and clients.get("count"):
        per_round = clients.get("per_round")
        parts.append(f"{clients['count']} clients" + (f", {per_round} per round" if per_round else ""))
    return " · ".join(parts)


def _metric_name(runs: list[Run]) -> str:
    """`workload.metric` where a config names it; else accuracy, which is what fedsim's `eval_metric` holds for both
    tasks (classification accuracy; for a causal LM the mean of its sets' accuracies); "eval metric" without a config."""
    workload = runs[0].config.get("workload")
    metric = workload.get("metric") if isinstance(workload, dict) else None
    if metric is None and isinstance(runs[0].config.get("model"), dict):
        metric = "accuracy"
    return f"eval {metric}" if metric else "eval metric"


def _bytes_axis(axis) -> None:
    """A log axis of bytes labelled 1 MB, 2 MB, 5 MB, 10 MB… (no crowded minor labels)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(EngFormatter(unit="B"))
    axis.set_minor_formatter(NullFormatter())


def _legend_label(label: str, summary: dict) -> str:
    rank = summary["rank"]
    return label if rank is None or f"r={rank}" in label else f"{label} r={rank}"


def _summary_text(labels: list[str], summaries: list[dict], metric: str) -> str:
    """The runs' ranks and bytes as measured, one block a run (the closing table of `fedsim run`, in short)."""
    blocks = []
    for label, row in zip(labels, summaries):
        final = row["final_metric"]
        blocks.append("\n".join([
            f"{_legend_label(label, row)}",
            f"  final {metric}: {final:.4f}" if np.isfinite(final) else f"  final {metric}: —",
            f"  up per client per round:   {human_bytes(row['up_per_client_round'])}",
            f"  down per client per round: {human_bytes(row['down_per_client_round'])}",
            f"  down at first contact:     {human_bytes(row['down_first_contact'])}",
            f"  all rounds, up + down:     {human_bytes(row['bytes_up'] + row['bytes_down'])}",
            *([f"  client compute, B and A:   {row['init_s']:.2f} s"] if np.isfinite(row.get("init_s", np.nan)) else []),
        ]))
    return "\n\n".join(blocks)


def plot_runs(runs, path) -> Location:
    """One PNG, 2×3 panels, a line per run: eval metric per round, eval metric against cumulative bytes (up + down),
    the runs' ranks and bytes per client per round as measured; train loss, aggregation error, cumulative bytes per round."""
    runs = _as_runs(runs)
    if not runs:
        raise UsageError("plots: no runs to plot; pass run folders or a folder of runs")
    labels = run_labels(runs)
    summaries = [run_summary(run, label) for run, label in zip(runs, labels)]
    metric_name = _metric_name(runs)
    fig = Figure(figsize=(17, 9), layout="constrained")
    (ax_eval, ax_eval_bytes, ax_text), (ax_loss, ax_err, ax_bytes) = fig.subplots(2, 3)
    floored = any_eval = False
    for run, label, summary in zip(runs, labels, summaries):
        rounds = with_cumulative_bytes(run.rounds)
        x = _column(rounds, "round")
        style = dict(label=_legend_label(label, summary), marker="o", markersize=3, linewidth=1.5)

        metric = _column(rounds, "eval_metric")
        total = _column(rounds, "bytes_up_cum") + _column(rounds, "bytes_down_cum")
        ok = np.isfinite(metric)
        any_eval |= bool(ok.any())
        ax_eval.plot(x[ok], metric[ok], **style)
        ok_bytes = ok & np.isfinite(total) & (total > 0)
        line, = ax_eval_bytes.plot(total[ok_bytes], metric[ok_bytes], **style)
        up = _column(rounds, "bytes_up_cum")
        ok_up = ok & np.isfinite(up) & (up > 0)
        ax_eval_bytes.plot(up[ok_up], metric[ok_up], linestyle="--", linewidth=1, marker="o", markersize=2, color=line.get_color(),
                           alpha=0.6)

        loss = _column(rounds, "train_loss")
        ok = np.isfinite(loss)
        ax_loss.plot(x[ok], loss[ok], **style)

        err = _column(rounds, "agg_error")
        ok = np.isfinite(err)
        floored |= bool((err[ok] < AGG_ERROR_FLOOR).any())
        ax_err.plot(x[ok], np.maximum(err[ok], AGG_ERROR_FLOOR), **style)

        ok = np.isfinite(total) & (total > 0)
        ax_bytes.plot(x[ok], total[ok], **style)

    ax_eval.set(title=f"{metric_name} per round", xlabel="round", ylabel=metric_name)
    ax_eval_bytes.set_xscale("log")
    _bytes_axis(ax_eval_bytes.xaxis)
    ax_eval_bytes.set(title=f"{metric_name} against bytes sent so far, all clients\n(solid: up + down; dashed: up only)",
                      xlabel="cumulative bytes after the round (log)", ylabel=metric_name)
    if not any_eval:
        for ax in (ax_eval, ax_eval_bytes):
            ax.text(0.5, 0.5, "no evaluation rounds", ha="center", va="center", transform=ax.transAxes)
    ax_text.axis("off")
    ax_text.set_title("as measured (clients.parquet, rounds.parquet)")
    ax_text.text(0.0, 1.0, _summary_text(labels, summaries, metric_name), family="monospace", fontsize="medium",
                 va="top", ha="left", transform=ax_text.transAxes)
    ax_loss.set(title="train loss per round (mean over clients)", xlabel="round", ylabel="train loss")
    ax_err.set_yscale("log")
    ax_err.set(
        title="aggregation error per round",
        xlabel="round",
        ylabel="‖Σ wᵢBᵢAᵢ − ΔW‖ / ‖Σ wᵢBᵢAᵢ‖"
        + (f"\n(log; values < {AGG_ERROR_FLOOR:g}, e.g. exact 0, drawn at {AGG_ERROR_FLOOR:g})" if floored else " (log)"),
    )
    ax_bytes.set_yscale("log")
    _bytes_axis(ax_bytes.yaxis)
    ax_bytes.set(title="communication, cumulative (up + down, all clients)", xlabel="round", ylabel="bytes (log)")
    for ax in (ax_eval, ax_eval_bytes, ax_loss, ax_err, ax_bytes):
        if ax is not ax_eval_bytes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3, which="both" if ax in (ax_err, ax_bytes, ax_eval_bytes) else "major")
        if ax.lines:
            ax.legend(fontsize="small")
    subtitle = _describe(runs)
    title = " vs ".join(_legend_label(label, summary) for label, summary in zip(labels, summaries))
    fig.suptitle(title + (f" — {subtitle}" if subtitle else ""), fontweight="bold")
    return save_figure(fig, path)


def plot_label_counts(run, path, max_clients: int = MAX_CLIENTS_SHOWN) -> Location:
    """Stacked bars: examples of each label per client (the first `max_clients` clients by id)."""
    runs = _as_runs(run)
    if len(runs) != 1:
        raise UsageError(f"plots: label counts are drawn for one run, got {len(runs)}; pass one run folder")
    run = runs[0]
    source = Location(run.path) / LABEL_COUNTS_FILE
    if not source.is_file():
        raise UsageError(f"plots: {run.path} has no {LABEL_COUNTS_FILE}; it is written for labelled workloads only")
    table = source.read_table(columns=["client_id", "label", "count"])
    client_ids = table["client_id"].to_numpy().astype(np.int64)
    label_values = table["label"].to_numpy(zero_copy_only=False)
    counts = table["count"].to_numpy().astype(np.float64)

    all_clients = np.unique(client_ids)
    shown = all_clients[:max_clients]
    labels = np.unique(label_values)
    matrix = np.zeros((len(shown), len(labels)))
    keep = np.isin(client_ids, shown)
    np.add.at(
        matrix,
        (np.searchsorted(shown, client_ids[keep]), np.searchsorted(labels, label_values[keep])),
        counts[keep],
    )

    fig = Figure(figsize=(max(8.0, 0.22 * len(shown) + 3), 5), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab20" if len(labels) > 10 else "tab10"]
    x = np.arange(len(shown))
    bottom = np.zeros(len(shown))
    for j, label in enumerate(labels):
        ax.bar(x, matrix[:, j], bottom=bottom, width=0.85, label=f"label {label}", color=cmap(j % cmap.N))
        bottom += matrix[:, j]
    step = max(1, len(shown) // 25)
    ax.set_xticks(x[::step], [str(c) for c in shown[::step]], fontsize="small")
    which = f"first {len(shown)} of {len(all_clients)} clients" if len(shown) < len(all_clients) else f"{len(shown)} clients"
    ax.set(title=f"{run.name}: examples per label per client ({which})", xlabel="client id", ylabel="examples")
    if len(labels) <= 20:
        ax.legend(fontsize="small", ncols=1 if len(labels) <= 10 else 2, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def _single_run_plots(run: Run, out_dir: Location, prefix: str = "") -> list[Location]:
    written = [plot_runs([run], out_dir / f"{prefix}plot.png")]
    if run.label_counts_path.is_file():
        written.append(plot_label_counts(run, out_dir / f"{prefix}label_counts.png"))
    return written


def write_run_plots(path_or_runs, out_dir=None) -> list[Location]:
    """Write the standard plots; return their paths.

    A run folder: `plot.png` (and `label_counts.png` where the run has label counts) into it.
    A comparison folder (one run per subfolder): `comparison.png` into that folder, plus each
    run's own plots into the run's folder. With `out_dir`, everything goes there instead (a run's
    plots prefixed with its name when there are several runs).
    """
    if isinstance(path_or_runs, (str, Path)):
        runs = [load_run(p) for p in find_runs(path_or_runs)]
        base = Location(path_or_runs)
        base = base.parent if base.is_file() else base
    else:
        runs = _as_runs(path_or_runs)
        if not runs:
            raise UsageError("plots: no runs to plot; pass run folders or a folder of runs")
        parents = {r.path.parent for r in runs}
        base = runs[0].path if len(runs) == 1 else (parents.pop() if len(parents) == 1 else Location(Path.cwd()))
    out = Location(out_dir) if out_dir is not None else None

    if len(runs) == 1:
        return _single_run_plots(runs[0], out or runs[0].path)

    written = [plot_runs(runs, (out or base) / "comparison.png")]
    for run, label in zip(runs, run_labels(runs)):
        if out is None:
            written += _single_run_plots(run, run.path)
        else:
            written += _single_run_plots(run, out, prefix=f"{label.replace('/', '_').replace(' ', '_')}-")
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m analysis.plots RESULTS_DIR [OUT_DIR]`: write the plots and print their paths."""
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2:
        print("usage: python -m analysis.plots RESULTS_DIR [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        for p in write_run_plots(argv[0], argv[1] if len(argv) == 2 else None):
            print(p)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
