"""Experiment 7's screen: each variant's `fedsim tune` (one seed, lr grid, ASHA) as one Markdown table and two plots,
after the diagnosis (diagnose.py's rounds) summed up in one table.

    python experiments/label-skew/screen.py experiments/results/label-skew/screen --out experiments/results/label-skew

The diagnosis table reads ``<out>/diagnose.txt`` (run.sh step 0): per run, the means over its rounds of the clients'
pairwise cosine, ‖mean ΔW‖/mean ‖ΔW_k‖, ‖mean ΔW‖ and the head's ‖mean‖/mean; the validation loss the rounds took off,
of the global model and of each half of a round's change alone (its new adapters with the old head, its old adapters
with the new head); and the global model after the last round.

Reads ``<screen>/<variant>/tune.parquet`` (every trial's rounds on the validation phrases) and ``<screen>/wall_s.txt``
(``<variant> <seconds>`` per tune, written by run.sh). Per variant: the lrs tried and which ASHA stopped, the chosen
lr (the best finished trial's last-round validation accuracy), that trial's accuracy at its last round and the mean of its
last three, bytes per client a round (up + down, the mean over rounds after the first contact), the tune's wall time.
``screen.png``: validation accuracy per round of each variant at its chosen lr; ``screen_vs_bytes.png``: the last-round
accuracy against bytes per client a round.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from matplotlib.figure import Figure


def variant_rows(screen: Path) -> list[dict]:
    walls = {}
    if (screen / "wall_s.txt").is_file():
        for line in (screen / "wall_s.txt").read_text().splitlines():
            name, seconds = line.split()
            walls[name] = walls.get(name, 0.0) + float(seconds)  # a tune resumed (an errored trial rerun) adds its time
    rows = []
    for folder in sorted(p for p in screen.iterdir() if (p / "tune.parquet").is_file()):
        table = pq.read_table(folder / "tune.parquet").to_pylist()
        trials: dict[str, list[dict]] = {}
        for row in table:
            trials.setdefault(row["point"], []).append(row)
        finished = {point: sorted(rs, key=lambda r: r["round"]) for point, rs in trials.items() if rs[0]["finished"]}
        best_point = max(finished, key=lambda p: finished[p][-1]["eval_metric"])
        best = finished[best_point]
        later = best[1:] or best
        rows.append({
            "variant": folder.name, "method": best[0]["method"], "run_dir": folder / best_point,
            "local_head": yaml.safe_load((folder / best_point / "config.yaml").read_text())["method"].get("local_head", False),
            "lrs": ", ".join(f"{rs[0]['train.lr']:g}{'' if rs[0]['finished'] else ' (stopped at round ' + str(len(rs)) + ')'}"
                             for _, rs in sorted(trials.items(), key=lambda item: item[1][0]["train.lr"])),
            "lr": best[0]["train.lr"], "final": best[-1]["eval_metric"],
            "last3": statistics.fmean(r["eval_metric"] for r in best[-3:]),
            "bytes": statistics.fmean((r["bytes_up"] + r["bytes_down"]) / r["clients_sampled"] for r in later),
            "curve": [r["eval_metric"] for r in best], "wall_s": walls.get(folder.name, float("nan")),
            "rounds_run": sum(len(rs) for rs in trials.values()),
        })
    return rows


def own_rows_scores(run_dir: Path) -> dict | None:
    """A run with ``eval.per_client``: its last round's accuracy on the clients' own held-out rows, pooled over them (each
    client's model: the global one, with what it keeps over it), and what predicting each client's majority training label
    would score on the same rows. None where the run kept no data folder (it is not committed)."""
    meta, train = run_dir / "data" / "meta.json", run_dir / "data" / "train.parquet"
    if not (meta.is_file() and train.is_file()):
        return None
    import json

    sizes = json.loads(meta.read_text())["client_eval_sizes"]
    clients = pq.read_table(run_dir / "clients.parquet").to_pylist()
    last = max(row["round"] for row in clients)
    mine = [row for row in clients if row["round"] == last and sizes[row["client_id"]] > 0]
    pooled = sum(row["eval_metric"] * sizes[row["client_id"]] for row in mine) / sum(sizes[row["client_id"]] for row in mine)
    rows = pq.read_table(train, columns=["client_id", "label", "held_out"]).to_pylist()
    correct = total = 0
    for client_id in {row["client_id"] for row in rows}:
        labels = [row["label"] for row in rows if row["client_id"] == client_id and not row["held_out"]]
        held = [row["label"] for row in rows if row["client_id"] == client_id and row["held_out"]]
        if labels and held:
            majority = max(set(labels), key=labels.count)
            correct += sum(label == majority for label in held)
            total += len(held)
    return {"pooled": pooled, "majority": correct / total, "rows": total, "lr": yaml_lr(run_dir)}


def yaml_lr(run_dir: Path) -> float:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"]


def diagnosis_rows(text: str) -> list[dict]:
    """One dict per ``## run`` of diagnose.py's output: the means over its rounds, and its last round's global model."""
    def mean_of(pattern: str, lines: list[str]) -> float:
        found = [float(m.group(1)) for m in (re.search(pattern, line) for line in lines) if m]
        return statistics.fmean(found) if found else math.nan

    rows = []
    for part in text.split("## ")[1:]:
        lines = part.splitlines()
        adapters = [line.split(";")[0] for line in lines if line.startswith("round ") and "ΔW" in line]
        heads = [line.split(";")[1] for line in lines if line.startswith("round ") and "head Δ" in line]
        last = [line for line in lines if line.strip().startswith("global:")][-1]
        # each round's loss drop, of the global model and of each half of the round's change alone, summed over rounds
        loss = lambda pattern, line: float(re.search(pattern, line).group(1))  # noqa: E731
        before = loss(r"loss ([0-9.]+)", next(line for line in lines if line.startswith("round 0 model")))
        drops = [0.0, 0.0, 0.0]
        for global_line, split_line in zip([line for line in lines if line.strip().startswith("global:")],
                                           [line for line in lines if "new adapters, old head" in line]):
            after = loss(r"loss ([0-9.]+)", global_line)
            drops[0] += before - after
            drops[1] += before - loss(r"old head: accuracy [0-9.]+, loss ([0-9.]+)", split_line)
            drops[2] += before - loss(r"new head: accuracy [0-9.]+, loss ([0-9.]+)", split_line)
            before = after
        rows.append({"run": lines[0].strip(), "setting": lines[1].strip(), "rounds": len(adapters),
                     "cosine": mean_of(r"cosine ([-+0-9.]+)", adapters),
                     "kept": mean_of(r"‖mean‖/mean‖·‖ ([0-9.]+)", adapters),
                     "step": mean_of(r"‖mean‖ ([0-9.e+-]+)$", adapters),
                     "head_cosine": mean_of(r"cosine ([-+0-9.]+)", heads),
                     "head_kept": mean_of(r"‖mean‖/mean‖·‖ ([0-9.]+)", heads),
                     "drop": drops[0], "drop_adapters": drops[1], "drop_head": drops[2],
                     "accuracy": float(re.search(r"accuracy ([0-9.]+)", last).group(1)),
                     "loss": float(re.search(r"loss ([0-9.]+)", last).group(1))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("screen")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    diagnosis = Path(args.out) / "diagnose.txt"
    if diagnosis.is_file():
        print("| run | clients' ΔW: mean pairwise cosine | ‖mean ΔW‖ / mean ‖ΔW_k‖ | ‖mean ΔW‖ a round | "
              "head Δ: cosine | head Δ: ‖mean‖ / mean | loss drop over the rounds: global (adapters alone, head alone) | "
              "validation accuracy, loss after the last round |")
        print("|---|---|---|---|---|---|---|---|")
        for r in diagnosis_rows(diagnosis.read_text()):
            print(f"| {r['setting']} | {r['cosine']:+.3f} | {r['kept']:.3f} | {r['step']:.3f} | {r['head_cosine']:+.3f} | "
                  f"{r['head_kept']:.3f} | {r['drop']:.4f} ({r['drop_adapters']:.4f}, {r['drop_head']:.4f}) | "
                  f"{r['accuracy']:.3f}, {r['loss']:.3f} |")
        print("\n(Means over the rounds; diagnose.py, one client-by-client FedAvg of the uploads a round, no Ray.)\n")
    rows = variant_rows(Path(args.screen))
    print("| variant | method | lrs tried (ASHA) | chosen lr | validation accuracy, last round | mean of last 3 | "
          "bytes per client a round | rounds run in the tune | tune wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["final"]):
        print(f"| {r['variant']}{' †' if r['local_head'] else ''} | {r['method']} | {r['lrs']} | {r['lr']:g} | {r['final']:.3f} | {r['last3']:.3f} | "
              f"{r['bytes'] / 1e3:,.1f} kB | {r['rounds_run']} | {r['wall_s'] / 60:.1f} min |")
    total = sum(r["wall_s"] for r in rows)
    print(f"\nThe screen's tuning: {sum(r['rounds_run'] for r in rows)} rounds in {total / 60:.1f} min on this machine.")
    local = next((r for r in rows if r["local_head"]), None)
    averaged = Path(args.screen).parent / "screen-per-client" / "fed-sb"
    if local is not None:
        print(f"\n† {local['variant']} keeps a head on each client, so no global model exists: its score above is each client's own "
              "model on its own held-out rows (eval.per_client: 10% of each client's phrases), pooled over them, not the "
              "400 validation phrases. On the same rows:\n")
        print("| run | lr | accuracy on the clients' own rows | each client's majority training label on them |")
        print("|---|---|---|---|")
        for name, run_dir in ((f"{local['variant']} (each client's own head)", local["run_dir"]),
                              ("fed-sb (the averaged head)", averaged)):
            scores = own_rows_scores(run_dir) if run_dir.is_dir() else None
            if scores is None:
                print(f"| {name} | | (no data folder: run run.sh's step 1 here) | |")
            else:
                print(f"| {name} | {scores['lr']:g} | {scores['pooled']:.3f} | {scores['majority']:.3f} ({scores['rows']} rows) |")
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for r in rows:
        axes.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", markersize=3, label=f"{r['variant']} (lr {r['lr']:g})")
    axes.set(xlabel="round", ylabel="validation accuracy", title="Label skew (Dirichlet 0.5, 10 clients): the screen")
    axes.legend(fontsize=7)
    figure.savefig(Path(args.out) / "screen.png", dpi=120, bbox_inches="tight")
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for r in rows:
        axes.scatter(r["bytes"], r["final"])
        axes.annotate(r["variant"], (r["bytes"], r["final"]), fontsize=7)
    axes.set(xscale="log", xlabel="bytes per client a round (up + down)", ylabel="validation accuracy, last round")
    figure.savefig(Path(args.out) / "screen_vs_bytes.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
