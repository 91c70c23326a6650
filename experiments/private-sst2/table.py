"""Experiment 2b's tables and plot: each method at ε = 1, 3 and without DP, its bytes, σ and each client's ε spent.

    python experiments/private-sst2/table.py experiments/results/private-sst2/runs --out experiments/results/private-sst2

Reads every run folder under RUNS (``<method>-r<rank>-<epsilon-1|epsilon-3|non-private>``, written by
experiments/run.sh): its config, ``summary.json``, ``rounds.parquet`` and ``clients.parquet``. Prints Markdown: the
accuracy table (method × privacy, with the non-private ceiling, the numbers DP-SGD noises and the bytes a client sends
and receives over the run) and what DP costs (σ, each client's ε, records trained a second in the last round, private
against non-private). Writes ``accuracy_vs_bytes.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

LEVELS = ("non-private", "epsilon-3", "epsilon-1")
TITLES = {"non-private": "non-private", "epsilon-3": "ε = 3", "epsilon-1": "ε = 1"}


def read_run(folder: Path) -> dict:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    rounds = pq.read_table(folder / "rounds.parquet").to_pylist()
    clients = pq.read_table(folder / "clients.parquet").to_pylist()
    private = config["privacy"]["enabled"]
    level = "non-private" if not private else f"epsilon-{config['privacy']['epsilon']:g}"
    last_round = rounds[-1]["round"]  # records/s from the last round: the first also holds any start-up of the worker
    records = sum(row["samples"] for row in clients if row["status"] == "ok" and row["round"] == last_round)  # one epoch a round
    last = {}
    for row in clients:
        last[row["client_id"]] = row
    return {
        "method": config["method"]["name"], "rank": config["method"]["rank"], "lr": config["train"]["lr"], "level": level,
        "accuracy": summary["final_eval_metric"], "clients": config["clients"]["count"],
        "bytes": (summary["bytes_up"] + summary["bytes_down"]) / config["clients"]["count"],
        "up_per_round": rounds[-1]["bytes_up"] / rounds[-1]["clients_ok"], "agg_error": summary["max_agg_error"],
        "majority": majority_share(folder / "data" / "eval.parquet"),
        "noised": summary["trainable_adapter_parameters"] + summary["trainable_head_parameters"],
        "sigma": summary["privacy"]["noise_multiplier"] if private else None,
        "epsilons": [last[c]["epsilon"] for c in sorted(last)] if private else [],
        "train_s": sum(row["train_s_max"] for row in rounds), "wall_s": summary["wall_s"],
        "records_per_s": records / rounds[-1]["train_s_max"],
    }


def majority_share(eval_file: Path) -> float:
    labels = pq.read_table(eval_file, columns=["label"]).column("label").to_pylist()
    return max(labels.count(label) for label in set(labels)) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="the folder of experiment 2b's run folders")
    parser.add_argument("--out", required=True, help="folder for accuracy_vs_bytes.png")
    args = parser.parse_args()
    runs = [read_run(folder) for folder in sorted(Path(args.runs).iterdir()) if (folder / "summary.json").is_file()]
    if not runs:
        parser.error(f"{args.runs}: no finished runs there")
    settings = sorted({(r["method"], r["rank"]) for r in runs}, key=lambda s: (s[0] != "fed-sb", s))
    found = {(r["method"], r["rank"], r["level"]): r for r in runs}

    lines = ["| method | rank | lr | numbers trained (noised under DP) | " + " | ".join(TITLES[level] for level in LEVELS)
             + " | up per client a round | bytes per client over the run | max agg. error |",
             "|---|---|---|---|" + "---|" * len(LEVELS) + "---|---|---|"]
    for method, rank in settings:
        here = [found.get((method, rank, level)) for level in LEVELS]
        any_run = next(r for r in here if r)
        cells = [f"{r['accuracy']:.3f}" if r else "–" for r in here]
        lines.append(f"| {method} | {rank} | {any_run['lr']:g} | {any_run['noised']:,} | " + " | ".join(cells)
                     + f" | {any_run['up_per_round'] / 1e3:.1f} kB | {any_run['bytes'] / 1e6:.2f} MB "
                     f"| {max(r['agg_error'] for r in here if r):.1e} |")
    lines.append(f"\nThe majority class of the scored phrases: {runs[0]['majority']:.3f}.")
    lines += ["", "| run | σ | ε spent, each client | train s (both rounds) | records/s (last round) | a private "
                  "record's cost over a non-private one's | wall s |", "|---|---|---|---|---|---|---|"]
    for method, rank in settings:
        ceiling = found.get((method, rank, "non-private"))
        for level in LEVELS:
            r = found.get((method, rank, level))
            if r is None:
                continue
            sigma = f"{r['sigma']:.3f}" if r["sigma"] is not None else "–"
            spent = " / ".join(f"{e:.3f}" for e in r["epsilons"]) or "–"
            cost = f"{ceiling['records_per_s'] / r['records_per_s']:.2f}×" if ceiling and r is not ceiling else "–"
            lines.append(f"| {method} r={rank} {TITLES[level]} | {sigma} | {spent} | {r['train_s']:.0f} | "
                         f"{r['records_per_s']:.0f} | {cost} | {r['wall_s']:.0f} |")
    print("\n".join(lines))

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    markers = {"non-private": "o", "epsilon-3": "s", "epsilon-1": "^"}
    for method, rank in settings:
        color = None
        for level in LEVELS:
            r = found.get((method, rank, level))
            if r is None:
                continue
            points = ax.scatter([r["bytes"]], [r["accuracy"]], marker=markers[level], color=color,
                                label=f"{method} r={rank}" if color is None else None)
            color = points.get_facecolor()[0]
    for level in LEVELS:
        ax.scatter([], [], marker=markers[level], color="grey", label=TITLES[level])
    ax.axhline(runs[0]["majority"], color="grey", linestyle=":", label="majority class")
    ax.set(xscale="log", xlabel="bytes per client over the run (up + down)", ylabel="accuracy on SST-2 dev (6,735 phrases)",
           title="private SST-2: accuracy against communication")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1e6:g} MB"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value / 1e6:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(Path(args.out) / "accuracy_vs_bytes.png", dpi=110)
    print("\n![accuracy against bytes](accuracy_vs_bytes.png)")


if __name__ == "__main__":
    main()
