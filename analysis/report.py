"""``fedsim report DIR [DIR…]``: the figures and a short Markdown summary of one or more runs.

    from analysis.report import write_report
    write_report(["results/default"], "results/default/report")

Writes into OUT (default: ``<first DIR>/report``):

- ``accuracy_vs_comm.png`` — final eval metric against the parameters communicated over the whole
  run (up + down, every client, log x), the Pareto front (most accurate for the fewest parameters)
  marked;
- ``comm_vs_clients.png`` — the analytic communication per round against the number of clients
  (10 to 1000, log–log) for every method, at the first run's model, targets and rank;
- ``metrics.png`` — eval metric, eval loss and train loss per round;
- ``agg_error.png`` — the aggregation error per round;
- ``privacy.png`` — ε against the eval metric, only where a run's ``rounds.parquet`` has an
  ``epsilon_max`` column;
- ``report.md`` — a table per run (rounds, final metric, bytes measured and predicted, the
  deviation, flagged beyond ``analysis.comm.TOLERANCE``) and the figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.comm import TOLERANCE, RunPrediction, human, per_round_vs_clients, predict_run, run_shapes
from analysis.plots import AGG_ERROR_FLOOR, _column, _describe, _metric_name, save_figure
from analysis.results import Run, _as_runs, run_labels
from fedsim.errors import UsageError
from fedsim.storage import Location

CLIENT_COUNTS = (10, 20, 50, 100, 200, 500, 1000)


def _final_metric(run: Run) -> float:
    metric = _column(run.rounds, "eval_metric")
    ok = np.isfinite(metric)
    return float(metric[ok][-1]) if ok.any() else float("nan")


def _predict(run: Run) -> tuple[RunPrediction | None, str]:
    try:
        return predict_run(run.path), ""
    except (UsageError, OSError, ValueError, KeyError) as error:
        return None, f"{type(error).__name__}: {error}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal parameters and a higher or equal metric, one strictly)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        dominated = any(
            (x2 <= x and y2 >= y and (x2 < x or y2 > y))
            for j, (x2, y2) in enumerate(points) if j != i and math.isfinite(x2) and math.isfinite(y2)
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def communicated_params(run: Run, prediction: RunPrediction | None) -> tuple[float, bool]:
    """(parameters up + down over the run, exact?): from the prediction, else measured bytes / 4."""
    if prediction is not None:
        t = prediction.totals()
        return float(t["pred_params_up"] + t["pred_params_down"]), True
    total = np.nansum(_column(run.rounds, "bytes_up")) + np.nansum(_column(run.rounds, "bytes_down"))
    return float(total) / 4.0, False


def plot_accuracy_vs_comm(runs: list[Run], labels: list[str], params: list[float], path, metric: str) -> Location:
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    points = [(p, _final_metric(r)) for p, r in zip(params, runs)]
    front = pareto_front(points)
    for i, ((x, y), label) in enumerate(zip(points, labels)):
        if math.isfinite(x) and x > 0 and math.isfinite(y):
            ax.scatter([x], [y], s=70, zorder=3, label=label, edgecolors="black" if i in front else "none", linewidths=1.5)
    if front:
        xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(xs, ys, where="post", color="grey", linestyle="--", linewidth=1, zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.set(title=f"final {metric} against communication (Pareto front: black edge, dashed)",
           xlabel="parameters communicated over the run, up + down, all clients (log)", ylabel=f"final {metric}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return save_figure(fig, path)


def plot_comm_vs_clients(run: Run, path, clients=CLIENT_COUNTS) -> Location:
    """Analytic: bytes a round against the number of clients, per client and for the whole round, every method."""
    from fedsim.methods import METHODS

    shapes, method = run_shapes(run.path)
    federated = [name for name, cls in METHODS.items() if cls.num_clients is None]
    switch = {key: value for key, value in method.config.options.items() if key == "switch_round"}  # the run's, where it set one
    table = per_round_vs_clients(shapes, federated, method.rank, clients, **switch)
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    ax_client, ax_round = fig.subplots(1, 2)
    # dashed styles for the methods that coincide with another (fra-lora = fedit, fra-then-ffa = ffa-lora in steady state)
    markers = "os^vDPXhp*<>d"
    for i, (name, rows) in enumerate(table.items()):
        style = ("-" if i < 7 else "--") + markers[i % len(markers)]
        x = [r.clients for r in rows]
        ax_client.plot(x, [r.up_bytes + r.down_bytes for r in rows], style, label=name, markersize=5, alpha=0.85)
        ax_round.plot(x, [r.round_bytes for r in rows], style, label=name, markersize=5, alpha=0.85)
    ax_client.set(title="per client per round (steady state, up + down)", xlabel="clients per round (log)", ylabel="bytes per client (log)")
    ax_round.set(title="per round, all clients (up + down)", xlabel="clients per round (log)", ylabel="bytes per round (log)")
    for ax in (ax_client, ax_round):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"analytic communication: {shapes.name}, {len(shapes.layers)} adapted layers, rank {method.rank}, "
                 f"{shapes.dtype}" + (", head included" if shapes.head else ""), fontweight="bold")
    return save_figure(fig, path)


def plot_metrics(runs: list[Run], labels: list[str], path, metric: str) -> Location:
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("eval_metric", f"{metric} per round", metric), ("eval_loss", "eval loss per round", "eval loss (cross-entropy)"),
              ("train_loss", "train loss per round (mean over clients)", "train loss (cross-entropy)"))
    for ax, (column, title, ylabel) in zip(axes, panels):
        for run, label in zip(runs, labels):
            x, y = _column(run.rounds, "round"), _column(run.rounds, column)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], "-o", markersize=3, label=label)
        ax.set(title=title, xlabel="round", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(_describe(runs), fontweight="bold")
    return save_figure(fig, path)


def plot_agg_error(runs: list[Run], labels: list[str], path) -> Location:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    floored = False
    for run, label in zip(runs, labels):
        x, y = _column(run.rounds, "round"), _column(run.rounds, "agg_error")
        ok = np.isfinite(y)
        floored |= bool((y[ok] < AGG_ERROR_FLOOR).any())
        ax.plot(x[ok], np.maximum(y[ok], AGG_ERROR_FLOOR), "-o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set(title="aggregation error per round", xlabel="round",
           ylabel="‖Σ wᵢBᵢAᵢ − ΔW‖_F / ‖Σ wᵢBᵢAᵢ‖_F (relative, log)"
           + (f"\nexact (< {AGG_ERROR_FLOOR:g}) drawn at {AGG_ERROR_FLOOR:g}" if floored else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_privacy(runs: list[Run], labels: list[str], path, metric: str) -> Location | None:
    """ε spent (``epsilon_max`` of each round) against the eval metric; None when no run has ``epsilon_max``."""
    private = [(r, l) for r, l in zip(runs, labels) if "epsilon_max" in r.rounds.column_names]
    if not private:
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for run, label in private:
        eps, acc = _column(run.rounds, "epsilon_max"), _column(run.rounds, "eval_metric")
        ok = np.isfinite(eps) & np.isfinite(acc)
        ax.plot(eps[ok], acc[ok], "-o", markersize=4, label=label)
    ax.set(title=f"privacy against {metric} (one point per evaluated round)",
           xlabel="ε spent so far (max over clients, at the run's δ)", ylabel=metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def write_report(paths, out_dir=None, clients=CLIENT_COUNTS, tolerance: float = TOLERANCE) -> Location:
    """Write the figures and ``report.md`` for the runs under ``paths``; return the report's path."""
    runs = _as_runs(paths)
    if not runs:
        raise UsageError("report: no runs found; pass run folders or folders of runs")
    first = Location(paths[0] if isinstance(paths, (list, tuple)) else paths)
    out = Location(out_dir) if out_dir is not None else (first if first.is_dir() else first.parent) / "report"
    labels = run_labels(runs)
    metric = _metric_name(runs)
    predictions = [_predict(run) for run in runs]
    params = [communicated_params(run, p)[0] for run, (p, _) in zip(runs, predictions)]

    figures = {"accuracy_vs_comm": plot_accuracy_vs_comm(runs, labels, params, out / "accuracy_vs_comm.png", metric)}
    try:
        figures["comm_vs_clients"] = plot_comm_vs_clients(runs[0], out / "comm_vs_clients.png", clients)
    except (UsageError, OSError, ValueError) as error:
        figures["comm_vs_clients"] = None
        comm_note = f"analytic plot skipped: {error}"
    else:
        comm_note = ""
    figures["metrics"] = plot_metrics(runs, labels, out / "metrics.png", metric)
    figures["agg_error"] = plot_agg_error(runs, labels, out / "agg_error.png")
    figures["privacy"] = plot_privacy(runs, labels, out / "privacy.png", metric)

    lines = ["# fedsim report", "", _describe(runs) or "", "",
             f"| run | method | rank | rounds | final {metric} | params communicated | bytes up (measured) | bytes down (measured) | "
             "predicted up | predicted down | max deviation | |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for run, label, (prediction, why), param in zip(runs, labels, predictions, params):
        method = run.config.get("method", {}) if isinstance(run.config.get("method"), dict) else {}
        up, down = np.nansum(_column(run.rounds, "bytes_up")), np.nansum(_column(run.rounds, "bytes_down"))
        if prediction is not None:
            t = prediction.totals()
            deviation = prediction.max_rel_err()
            flag = f"⚠ {len(prediction.flagged)} round(s) off by > {tolerance:.0%}" if prediction.flagged else "ok"
            cells = [human(t["pred_bytes_up"], "B"), human(t["pred_bytes_down"], "B"), f"{deviation:.2%}", flag]
            for row in prediction.flagged:
                notes.append(f"- **{label}**, round {row['round']}: up {row['bytes_up']} B measured vs {row['pred_bytes_up']} B "
                             f"predicted ({row['rel_err_up']:.1%}); down {row['bytes_down']} vs {row['pred_bytes_down']} "
                             f"({row['rel_err_down']:.1%})")
        else:
            cells = ["—", "—", "—", "no prediction"]
            notes.append(f"- **{label}**: no prediction ({why})")
        final = _final_metric(run)
        lines.append(f"| {label} | {method.get('name', run.name)} | {method.get('rank', '')} | {run.rounds.num_rows} | "
                     f"{final:.4f} | {human(param)}{'' if prediction else ' (≈ bytes/4)'} | {human(up, 'B')} | {human(down, 'B')} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Measured bytes are those the runtime sent (tensor data plus keys); predicted bytes replay each "
              f"run's schedule through `analysis.comm`. A round whose measured bytes differ from the prediction by "
              f"more than {tolerance:.0%} is flagged.", ""]
    if notes:
        lines += ["## Flags", "", *notes, ""]
    if comm_note:
        lines += [comm_note, ""]
    lines += ["## Figures", ""]
    titles = {"accuracy_vs_comm": f"Final {metric} against communicated parameters (Pareto front marked)",
              "comm_vs_clients": "Analytic communication per round against the number of clients",
              "metrics": "Metric and losses per round", "agg_error": "Aggregation error per round",
              "privacy": f"ε against {metric}"}
    for key, path in figures.items():
        if path is not None:
            lines += [f"### {titles[key]}", "", f"![{titles[key]}]({path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report.native()


def write_demo_runs(root, methods=("fed-sb", "fedit", "ffa-lora", "flora"), rounds: int = 6, clients: int = 20,
                    per_round: int = 5, rank: int = 8, model: str = "minilm", seed: int = 0) -> list[Path]:
    """Synthetic run folders (no training) for the walkthrough notebook and the tests.

    Each run has the files a real run leaves (config.yaml, rounds.parquet, clients.parquet,
    summary.json): a seeded schedule of ``per_round`` of ``clients`` clients a round, the bytes the
    runtime would count for it (from ``analysis.comm``), and made-up metrics. Not results.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from analysis.comm import MessageReplay, method_of, model_shapes
    from fedsim.adapters.state import nbytes

    root = Path(root)
    rng = np.random.default_rng(seed)
    schedule = [sorted(rng.choice(clients, size=per_round, replace=False).tolist()) for _ in range(rounds)]
    skill = {"fed-sb": 0.86, "fedit": 0.80, "ffa-lora": 0.76, "flora": 0.84, "fedex-lora": 0.85, "fra-lora": 0.82,
             "fra-then-ffa": 0.81, "central": 0.88}
    written = []
    for method in methods:
        folder = root / method
        folder.mkdir(parents=True, exist_ok=True)
        config = {"seed": seed, "output_dir": str(folder), "model": {"name": model, "target_modules": ["query", "value"],
                  "task": "classification", "dtype": "float32"}, "workload": {"name": "demo (synthetic)", "metric": "accuracy"},
                  "method": {"name": method, "rank": rank, "train_head": True, "switch_round": 3, "adapter": "lora-sb"},
                  "clients": {"count": clients, "per_round": per_round}, "train": {"rounds": rounds}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "data").mkdir(exist_ok=True)
        (folder / "data" / "meta.json").write_text(json.dumps({"num_labels": 5}))
        shapes = model_shapes(model, ["query", "value"], num_labels=5, head=True)
        replay = MessageReplay(method_of(method, rank), shapes)
        round_rows, client_rows = [], []
        for t, cohort in enumerate(schedule):
            up = nbytes(replay.up(t, rank))
            down = {cid: nbytes(replay.down(cid, rank, t)) for cid in cohort}
            replay.aggregate(t, {cid: rank for cid in cohort})
            loss = 1.6 * math.exp(-0.35 * (t + 1)) + rng.normal(0, 0.02)
            acc = skill.get(method, 0.8) * (1 - math.exp(-0.6 * (t + 1))) + rng.normal(0, 0.005)
            for cid in cohort:
                client_rows.append({"round": t, "client_id": cid, "worker_id": cid % 2, "rank": rank, "samples": 50,
                                    "steps": 5, "train_loss": loss, "bytes_up": up, "bytes_down": down[cid],
                                    "train_s": 0.1, "status": "ok"})
            exact = replay.method.about.exact in ("yes", "—")
            round_rows.append({"round": t, "method": method, "clients_sampled": per_round, "clients_ok": per_round,
                               "bytes_up": up * per_round, "bytes_down": sum(down.values()),
                               "agg_error": 0.0 if exact else 0.05 / (t + 1), "train_loss": loss, "eval_metric": acc,
                               "eval_loss": loss * 1.1, "wall_s": 0.5})
        pq.write_table(pa.Table.from_pylist(round_rows), folder / "rounds.parquet")
        pq.write_table(pa.Table.from_pylist(client_rows), folder / "clients.parquet")
        (folder / "summary.json").write_text(json.dumps({"method": method, "rounds": rounds, "synthetic": True}))
        written.append(folder)
    return written
