"""Per-client accuracy per round (``eval.per_client``), for every run under a folder: a Markdown table and a PNG.

    python experiments/per_client.py experiments/results/fra-study > experiments/results/fra-study/per_client.md

Each run folder (``<split>/<method>/``) gives one panel: a line per client, its own held-out accuracy
after every round, and the global evaluation set's accuracy dashed. The table gives, per run, the
final global accuracy, each client's final accuracy, their mean, the clients' label prior (the share of each
client's dominant label: what answering it alone scores), their spread (max − min), and the largest
aggregation error over the rounds; where runs differ only in seed, the mean per-client accuracy over seeds.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from analysis.results import find_runs, load_run
from seeds import spread  # experiments/seeds.py: mean and sample sd (0 for one value)


def runs_under(root: Path) -> list:
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found += [load_run(p) for p in find_runs(folder)]
        except Exception:  # noqa: BLE001 - a folder without runs (the report's) is not an error here
            continue
    return found


def label_prior(run) -> dict[int, float]:
    """Each client's dominant-label share of its shard (``label_counts.parquet``): the accuracy of always answering
    its majority label, which a personalised head can reach without learning the task."""
    path = run.label_counts_path
    if not path.is_file():
        return {}
    counts: dict[int, list[int]] = {}
    for row in pq.read_table(str(path)).to_pylist():
        counts.setdefault(row["client_id"], []).append(row["count"])
    return {client_id: max(c) / sum(c) for client_id, c in counts.items()}


def setting_label(run) -> str:
    """The method and its rank: what runs that differ only in seed share."""
    return f"{run.name} r={run.config['method']['rank']}"


def run_label(run) -> str:
    return f"{setting_label(run)} seed {run.config.get('seed', 0)}"


def main(root: str) -> None:
    root = Path(root)
    runs = [run for run in runs_under(root) if run.clients is not None and "eval_metric" in run.clients.column_names]
    lines = ["| split | run | final global acc. | final acc. per client | mean per client | label prior, mean | spread "
             "| max agg. error |", "|---|---|---|---|---|---|---|---|"]
    by_setting: dict[tuple[str, str], list[tuple[float, float]]] = {}
    fig = Figure(figsize=(4.2 * max(1, math.ceil(len(runs) / 2)), 7), layout="constrained")
    axes = fig.subplots(2, max(1, math.ceil(len(runs) / 2)), squeeze=False).ravel()
    for ax, run in zip(axes, runs):
        rows = [r for r in run.clients.to_pylist() if r["eval_metric"] is not None and r["eval_metric"] == r["eval_metric"]]
        clients = sorted({r["client_id"] for r in rows})
        final_round = max(r["round"] for r in rows)
        for client_id in clients:
            mine = sorted((r["round"], r["eval_metric"]) for r in rows if r["client_id"] == client_id)
            ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", markersize=3, label=f"client {client_id}")
        rounds = run.rounds.to_pylist()
        ax.plot([r["round"] for r in rounds], [r["eval_metric"] for r in rounds], "k--", label="global eval set")
        split = run.path.parent.name
        ax.set(title=f"{split}: {run_label(run)}", xlabel="round", ylabel="accuracy", ylim=(0.0, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="xx-small", ncol=2)
        final = {r["client_id"]: r["eval_metric"] for r in rows if r["round"] == final_round}
        values = np.array([final[c] for c in clients])
        prior = label_prior(run)
        prior_mean = float(np.mean([prior[c] for c in clients])) if prior else float("nan")
        errors = [r["agg_error"] for r in rounds if r["agg_error"] == r["agg_error"]]
        lines.append(f"| {split} | {run_label(run)} | {rounds[-1]['eval_metric']:.3f} | "
                     + ", ".join(f"{final[c]:.3f}" for c in clients)
                     + f" | {values.mean():.3f} | {prior_mean:.3f} | {values.max() - values.min():.3f} "
                     f"| {max(errors, default=float('nan')):.2e} |")
        by_setting.setdefault((split, setting_label(run)), []).append((float(values.mean()), prior_mean))
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    fig.savefig(root / "per_client.png", dpi=110)
    print("\n".join(lines))
    if any(len(v) > 1 for v in by_setting.values()):
        print("\nOver seeds: the mean per-client accuracy of the final round (mean ± sd over seeds, ddof 1), against the "
              "clients' label prior.\n")
        print("| split | method | seeds | mean per-client accuracy | min – max | label prior, mean |\n|---|---|---|---|---|---|")
        for (split, method), values in sorted(by_setting.items()):
            accuracies = [a for a, _ in values]
            mean, sd = spread(accuracies)
            print(f"| {split} | {method} | {len(values)} | {mean:.3f} ± {sd:.3f} "
                  f"| {min(accuracies):.3f} – {max(accuracies):.3f} | {statistics.fmean(p for _, p in values):.3f} |")
    print("\n![per-client accuracy per round](per_client.png)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/fra-study")
