"""Experiment 7's second stage: each variant at its tuned lr, 3 seeds at Dirichlet α = 0.1 and 0.5 and an IID reference,
on SST-2 and BBC News, scored on the evaluation file. One Markdown table per dataset and one plot.

    python experiments/label-skew/stage2.py experiments/results/label-skew/stage2 --out experiments/results/label-skew/stage2

Reads ``<stage2>/<dataset>/<variant>/{skew,iid}/sweep.parquet`` (run.sh step 2: ``fedsim sweep <the variant's best.yaml>
--grid clients.alpha=0.1,0.5 seed=0,1,2``, and ``clients.partition=iid --grid seed=0``). Per dataset, variant and split:
the last round's accuracy, mean ± standard deviation over seeds (ddof 1) and range; bytes per client a round (up + down,
the mean over the rounds after the first, where every client has had its first contact); the lr (from the runs'
config.yaml); the majority class of the evaluation rows. Then, per skewed split and seed, how skewed that seed's clients
are (from the run's ``label_counts.parquet``: the clients holding at least 90% one label, and their share of the training
rows) beside each variant's accuracy, since a seed draws the split. ``stage2_<dataset>.png``: each variant's accuracy per
split, every seed a dot, the mean a bar.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from matplotlib.figure import Figure

SPLITS = ("α = 0.1", "α = 0.5", "IID")
ONE_LABEL = 0.9  # a client holding at least this share of one label counts as a one-label client


def one_label_clients(label_counts: Path) -> tuple[int, int, float]:
    """``(one-label clients, clients, their share of the training rows)`` from a run's ``label_counts.parquet``."""
    per_client: dict[int, list[int]] = defaultdict(list)
    for row in pq.read_table(label_counts).to_pylist():
        per_client[row["client_id"]].append(row["count"])
    held = [(max(counts), sum(counts)) for counts in per_client.values() if sum(counts)]
    one_label = [total for top, total in held if top >= ONE_LABEL * total]
    return len(one_label), len(held), sum(one_label) / sum(total for _, total in held)


def split_of(row: dict, part: str) -> str:
    return "IID" if part == "iid" else f"α = {row['clients.alpha']:g}"


def collect(dataset_dir: Path) -> tuple[dict, dict, dict, float | None, dict, dict]:
    """``{variant: {split: [final accuracy per seed]}}``, ``{variant: bytes per client a round}``, ``{variant: lr}``, the
    evaluation rows' majority-class share (None where no run kept its data folder), ``{(split, seed): {variant: final
    accuracy}}`` and ``{(split, seed): one_label_clients(...)}`` for the skewed splits."""
    finals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_seed: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    skew_of_seed: dict[tuple[str, int], tuple[int, int, float]] = {}
    bytes_per_round: dict[str, list[float]] = defaultdict(list)
    lrs: dict[str, float] = {}
    majority = None
    for variant_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
        for part in ("skew", "iid"):
            table = variant_dir / part / "sweep.parquet"
            if not table.is_file():
                continue
            by_point: dict[str, list[dict]] = defaultdict(list)
            for row in pq.read_table(table).to_pylist():
                by_point[row["point"]].append(row)
            for point, rows in sorted(by_point.items()):
                rows.sort(key=lambda r: r["round"])
                scored = [r for r in rows if r["eval_metric"] == r["eval_metric"]]  # evaluated rounds (eval.every)
                split, final, point_dir = split_of(rows[0], part), scored[-1]["eval_metric"], variant_dir / part / point
                finals[variant_dir.name][split].append(final)
                if part == "skew":
                    seed_split, label_counts = (split, rows[0]["seed"]), point_dir / "label_counts.parquet"
                    per_seed[seed_split][variant_dir.name] = final
                    if seed_split not in skew_of_seed and label_counts.is_file():
                        skew_of_seed[seed_split] = one_label_clients(label_counts)
                later = rows[1:] or rows
                bytes_per_round[variant_dir.name] += [(r["bytes_up"] + r["bytes_down"]) / r["clients_sampled"] for r in later]
                config = yaml.safe_load((point_dir / "config.yaml").read_text())
                lrs[variant_dir.name] = config["train"]["lr"]
                labels = point_dir / "data" / "eval.parquet"
                if majority is None and labels.is_file():
                    counts = pq.read_table(labels, columns=["label"]).column("label").value_counts().to_pylist()
                    majority = max(c["counts"] for c in counts) / sum(c["counts"] for c in counts)
    return (finals, {v: statistics.fmean(b) for v, b in bytes_per_round.items()}, lrs, majority, per_seed,
            skew_of_seed)


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f} – {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for dataset_dir in sorted(p for p in Path(args.stage2).iterdir() if p.is_dir()):
        finals, bytes_per_round, lrs, majority, per_seed, skew_of_seed = collect(dataset_dir)
        if not finals:
            continue
        print(f"### {dataset_dir.name}\n")
        print("| variant | lr | " + " | ".join(SPLITS) + " | bytes per client a round |")
        print("|---|---|" + "---|" * len(SPLITS) + "---|")
        order = sorted(finals, key=lambda v: -statistics.fmean(finals[v].get("α = 0.5") or [0.0]))  # α = 0.1: where most stall
        for variant in order:
            print(f"| {variant} | {lrs[variant]:g} | " + " | ".join(cell(finals[variant].get(s, [])) for s in SPLITS)
                  + f" | {bytes_per_round[variant] / 1e3:,.1f} kB |")
        if majority is not None:
            print(f"\nMajority class of the evaluation rows: {majority:.3f}.")
        print("\n(Last round's accuracy on the evaluation file; mean ± sd over seeds (ddof 1), min – max.)\n")
        if per_seed:
            print(f"Per seed under the skew (a seed draws the split; one-label clients hold ≥ {ONE_LABEL:.0%} one label):\n")
            print("| split | seed | one-label clients (their share of the rows) | " + " | ".join(order) + " |")
            print("|---|---|---|" + "---|" * len(order))
            for split, seed in sorted(per_seed):
                skew = skew_of_seed.get((split, seed))
                skew_cell = f"{skew[0]} of {skew[1]} ({skew[2]:.0%})" if skew else "—"
                print(f"| {split} | {seed} | {skew_cell} | "
                      + " | ".join(f"{per_seed[split, seed][v]:.3f}" if v in per_seed[split, seed] else "—" for v in order)
                      + " |")
            print()
        figure = Figure(figsize=(8, 4.5))
        axes = figure.subplots()
        width = 0.8 / len(order)
        for i, variant in enumerate(order):
            for j, split in enumerate(SPLITS):
                values = finals[variant].get(split, [])
                if not values:
                    continue
                x = j + (i - (len(order) - 1) / 2) * width
                axes.bar(x, statistics.fmean(values), width * 0.9, color=f"C{i}", alpha=0.5, label=variant if j == 0 else None)
                axes.scatter([x] * len(values), values, color=f"C{i}", s=10, zorder=3)
        if majority is not None:
            axes.axhline(majority, color="grey", linestyle=":", linewidth=1, label="majority class")
        axes.set_xticks(range(len(SPLITS)), SPLITS)
        axes.set(ylabel="accuracy, last round", title=f"{dataset_dir.name}: 10 clients, 8 rounds, each variant at its lr")
        lowest = min(v for variant in order for values in finals[variant].values() for v in values)
        axes.set_ylim(bottom=max(0.0, min((majority or 0.5) - 0.1, lowest - 0.02)))
        axes.legend(fontsize=7)
        figure.savefig(Path(args.out) / f"stage2_{dataset_dir.name}.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
