"""Per-client accuracy per round (``eval.per_client``), for every run under a folder: a Markdown table and a PNG.

    python experiments/per_client.py experiments/results/fra-study > experiments/results/fra-study/per_client.md

Each run folder (``<split>/<method>/``) gives one panel: a line per client, its own held-out accuracy
after every round, and the global evaluation set's accuracy dashed. The table gives, per run, the
final global accuracy, each client's final accuracy, their spread (max − min), and the largest
aggregation error over the rounds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analysis.results import find_runs, load_run


def runs_under(root: Path) -> list:
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found += [load_run(p) for p in find_runs(folder)]
        except Exception:  # noqa: BLE001 - a folder without runs (the report's) is not an error here
            continue
    return found


def main(root: str) -> None:
    root = Path(root)
    runs = [run for run in runs_under(root) if run.clients is not None and "eval_metric" in run.clients.column_names]
    lines = ["| split | method | final global acc. | final acc. per client | spread | max agg. error |", "|---|---|---|---|---|---|"]
    fig = Figure(figsize=(4.2 * max(1, len(runs) // 2), 7), layout="constrained")
    axes = fig.subplots(2, max(1, math.ceil(len(runs) / 2)), squeeze=False).ravel()
    for ax, run in zip(axes, runs):
        rows = run.clients.to_pylist()
        clients = sorted({r["client_id"] for r in rows})
        final_round = max(r["round"] for r in rows)
        for client_id in clients:
            mine = sorted((r["round"], r["eval_metric"]) for r in rows if r["client_id"] == client_id)
            ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", markersize=3, label=f"client {client_id}")
        rounds = run.rounds.to_pylist()
        ax.plot([r["round"] for r in rounds], [r["eval_metric"] for r in rounds], "k--", label="global eval set")
        split = run.path.parent.name
        ax.set(title=f"{split}: {run.name}", xlabel="round", ylabel="accuracy", ylim=(0.3, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        final = {r["client_id"]: r["eval_metric"] for r in rows if r["round"] == final_round}
        values = np.array([final[c] for c in clients])
        errors = [r["agg_error"] for r in rounds if r["agg_error"] == r["agg_error"]]
        lines.append(f"| {split} | {run.name} | {rounds[-1]['eval_metric']:.3f} | "
                     + ", ".join(f"{final[c]:.3f}" for c in clients)
                     + f" | {values.max() - values.min():.3f} | {max(errors, default=float('nan')):.2e} |")
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    fig.savefig(root / "per_client.png", dpi=110)
    print("\n".join(lines))
    print("\n![per-client accuracy per round](per_client.png)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/fra-study")
