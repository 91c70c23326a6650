"""Each method's learning rate, chosen on the validation split: the tuning sweeps' table, and the choice per method.

    python experiments/private-sst2/tuned.py TUNING_SWEEP [TUNING_SWEEP ...] --table tuning.md > chosen.txt

Reads each sweep's ``sweep.parquet`` (``fedsim sweep … workload.validation=N --grid train.lr=…``, scored on the
validation rows carved from the training data, never on the dev file the experiment reports). A setting is a method at a
rank; its chosen lr is the one with the highest final validation accuracy (a tie: the lower validation loss). Prints one
line per setting, ``<method> <rank> <lr>``, for experiments/run.sh to read; writes the whole grid as Markdown.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import yaml


def trials(sweeps: list[str]) -> dict[tuple[str, int], dict[float, dict]]:
    """``{(method, rank): {lr: the trial's last round}}``."""
    found: dict[tuple[str, int], dict[float, dict]] = defaultdict(dict)
    for folder in sweeps:
        rows = pq.read_table(Path(folder) / "sweep.parquet").to_pylist()
        last: dict[str, dict] = {}
        for row in rows:
            if row["point"] not in last or row["round"] > last[row["point"]]["round"]:
                last[row["point"]] = row
        for point, row in last.items():
            config = yaml.safe_load((Path(folder) / point / "config.yaml").read_text())
            if not config["workload"].get("validation"):
                raise SystemExit(f"{folder}/{point}: not scored on a validation split (workload.validation is not set)")
            found[(config["method"]["name"], int(config["method"]["rank"]))][float(config["train"]["lr"])] = row
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="tuning sweep folders (each with sweep.parquet)")
    parser.add_argument("--table", required=True, help="Markdown file for the whole grid")
    args = parser.parse_args()
    found = trials(args.sweeps)
    lrs = sorted({lr for grid in found.values() for lr in grid})
    lines = ["| method | rank | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen | trial wall s |",
             "|---|---|" + "---|" * len(lrs) + "---|---|"]
    chosen = []
    for (method, rank), grid in sorted(found.items()):
        best = max(grid, key=lambda lr: (grid[lr]["eval_metric"], -grid[lr]["eval_loss"]))
        chosen.append(f"{method} {rank} {best:g}")
        cells = [(f"**{grid[lr]['eval_metric']:.3f}**" if lr == best else f"{grid[lr]['eval_metric']:.3f}") if lr in grid else "–"
                 for lr in lrs]
        wall = sum(row["wall_s"] for row in grid.values()) / len(grid)
        lines.append(f"| {method} | {rank} | " + " | ".join(cells) + f" | {best:g} | {wall:.0f} |")
    Path(args.table).write_text("Validation accuracy (final round) of each tuning trial; the chosen lr in bold.\n\n"
                                + "\n".join(lines) + "\n")
    print("\n".join(chosen))


if __name__ == "__main__":
    main()
