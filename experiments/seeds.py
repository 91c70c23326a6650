"""Mean and spread over seeds of sweeps' runs: a Markdown table and accuracy against communicated bytes.

    python experiments/seeds.py experiments/results/matched-comm/equal-rank experiments/results/matched-comm/equal-comm \
        --out experiments/results/matched-comm > experiments/results/matched-comm/seeds.md

Reads each sweep's ``sweep.parquet`` (``fedsim sweep … --grid … seed=0,1,2``): the runs that differ only
in ``seed`` form one setting. Per setting: the final accuracy's mean, standard deviation (over seeds,
ddof 1) and range; the accuracy of the last three rounds (each seed's mean of them, then mean ± sd over seeds: steadier
where accuracy swings from round to round); bytes per client per round (up + down, the mean over rounds); the largest
aggregation error; ε where private. ``accuracy_vs_bytes.png``: final accuracy (mean, error bar ±1
standard deviation, every seed as a dot) against each client's total bytes over the run (log scale), and
the accuracy per round with its spread.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from matplotlib.figure import Figure

def settings(sweep_dirs: list[str]) -> dict[str, dict[int, list[dict]]]:
    """``{setting label: {seed: rounds (sorted)}}`` from the sweeps' tables; the label names the grid values but seed."""
    found: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for folder in sweep_dirs:
        rows = pq.read_table(Path(folder) / "sweep.parquet").to_pylist()
        rounds_columns = pq.read_schema(Path(folder) / rows[0]["point"] / "rounds.parquet").names
        grid_keys = [k for k in rows[0] if k not in (*rounds_columns, "point", "seed")]  # the columns gather() added
        by_point: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_point[row["point"]].append(row)
        for point_rows in by_point.values():
            first = point_rows[0]
            config = yaml.safe_load((Path(folder) / first["point"] / "config.yaml").read_text())
            label = f"{first['method']} r={config['method']['rank']}"
            label += "".join(f" {k.split('.')[-1]}={first[k]}" for k in grid_keys if k not in ("method.name", "method.rank"))
            clients = config.get("clients", {})
            if clients.get("rank_aggregation", "zero-pad") != "zero-pad" and "clients.rank_aggregation" not in grid_keys:
                label += f" {clients['rank_aggregation']}"  # not the default: say how the ranks combine
            found[label][int(first.get("seed", 0))] = sorted(point_rows, key=lambda r: r["round"])
    return found


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="sweep folders (each with sweep.parquet)")
    parser.add_argument("--out", required=True, help="folder for accuracy_vs_bytes.png")
    args = parser.parse_args()
    for folder in args.sweeps:
        if not (Path(folder) / "sweep.parquet").is_file():
            parser.error(f"{folder}: no sweep.parquet there; give folders that `fedsim sweep` wrote")
    found = settings(args.sweeps)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax_bytes, ax_rounds = fig.subplots(1, 2)
    lines = ["| setting | seeds | final accuracy, mean ± sd | min – max | last 3 rounds, mean ± sd "
             "| bytes per client per round (up + down) | client's bytes over the run | max agg. error | ε |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, by_seed in sorted(found.items()):
        runs = [by_seed[s] for s in sorted(by_seed)]
        finals = [r[-1]["eval_metric"] for r in runs]
        mean, sd = spread(finals)
        evaluated = [[x["eval_metric"] for x in r if x["eval_metric"] == x["eval_metric"]] for r in runs]  # eval.every > 1: NaN between
        late_mean, late_sd = spread([statistics.fmean(scores[-3:]) for scores in evaluated])
        per_client_round = statistics.fmean((x["bytes_up"] + x["bytes_down"]) / x["clients_ok"]
                                            for r in runs for x in r if x["clients_ok"])
        run_bytes = per_client_round * len(runs[0])  # every client takes part in every round here
        errors = [x["agg_error"] for r in runs for x in r if x["agg_error"] == x["agg_error"]]
        epsilons = [x["epsilon_max"] for r in runs for x in r if x["epsilon_max"] == x["epsilon_max"]]
        epsilon = f"{max(epsilons):.2f}" if epsilons else "–"
        accuracy = f"{mean:.3f} ± {sd:.3f}" if len(finals) > 1 else f"{mean:.3f}"
        lines.append(f"| {label} | {len(runs)} | {accuracy} | {min(finals):.3f} – {max(finals):.3f} "
                     f"| {late_mean:.3f} ± {late_sd:.3f} | {per_client_round:,.0f} | {run_bytes:,.0f} | {max(errors, default=float('nan')):.2e} | {epsilon} |")
        points = ax_bytes.errorbar([run_bytes], [mean], yerr=[sd], fmt="o", capsize=4, label=label)
        ax_bytes.scatter([run_bytes] * len(finals), finals, s=10, color=points[0].get_color(), alpha=0.5)
        rounds = sorted({x["round"] for r in runs for x in r if x["eval_metric"] == x["eval_metric"]})  # the evaluated ones
        curve = [spread([x["eval_metric"] for r in runs for x in r if x["round"] == i]) for i in rounds]
        line, = ax_rounds.plot(rounds, [m for m, _ in curve], marker="o", markersize=3, label=label)
        ax_rounds.fill_between(rounds, [m - s for m, s in curve], [m + s for m, s in curve], color=line.get_color(), alpha=0.15)
    ax_bytes.set(xscale="log", xlabel="bytes per client over the run (up + down)", ylabel="final accuracy (mean ± sd over seeds)",
                 title="accuracy against communication")
    ax_rounds.set(xlabel="round", ylabel="accuracy (mean ± sd over seeds)", title="accuracy per round")
    for ax in (ax_bytes, ax_rounds):
        ax.grid(alpha=0.3)
    ax_rounds.legend(fontsize="x-small")
    fig.savefig(Path(args.out) / "accuracy_vs_bytes.png", dpi=110)
    print("\n".join(lines))
    print("\n![accuracy against bytes, and per round](accuracy_vs_bytes.png)")


if __name__ == "__main__":
    main()
