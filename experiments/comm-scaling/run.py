"""Experiment 4, communication scaling: bytes per client against the number of clients, measured vs analytic.

    python experiments/comm-scaling/run.py [--clients 10,100,1000] [--out experiments/results/comm-scaling]

The claim (Fed-SB, Singhal et al., arXiv:2502.15436): Fed-SB's per-client bytes are r² a layer whatever
the number of clients (only the r×r matrix R moves, and the average of the R's is exact, so the server
sends one r×r back); FLoRA's downlink grows with the number of clients (it sends every client's A and B,
stacked); FedIT, FFA-LoRA and the rest are constant per client, at r(d+k) (or r·d) a layer.

Every method (central: one client by definition) on the tiny BERT of bench/common.py (hidden 64,
2 layers), rank 8 on query and value, the head trained and averaged; every client sampled every round,
2 rounds × 1 local step (bytes do not depend on training); real SST-2 where ../shared/data/sst2 is,
else bbc-news. All runs under one local Ray. Per (method, clients), from each run's clients.parquet:
a client's upload in round 1, what it receives at first contact (round 0: the whole global state) and
when it returns (round 1: round 0's broadcast); beside them the same three quantities from
analysis/comm.py, and analysis.comm.predict_run's replay of the whole run (every round, all clients).
fra-then-ffa switches to FFA at round 1: its round-1 upload is FFA's, its round-1 download FRA's.
Writes bytes.parquet, bytes.png and bytes.md under --out; the run folders are deleted once read.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.comm import MessageReplay, predict_run, run_shapes  # noqa: E402
from common import bytes_config, local_ray, machine_info, read_run, sst2_available  # noqa: E402  (bench/common.py)
from fedsim.adapters.state import nbytes  # noqa: E402
from fedsim.methods import METHODS  # noqa: E402

QUANTITIES = ("up", "down_first", "down_returning")


def mean_of(clients, round_idx, key):
    return statistics.fmean(c[key] for c in clients if c["round"] == round_idx and c["status"] == "ok")


def analytic(shapes, method, aggregated):
    """Per client: upload in round 1, the whole state at first contact, round 0's broadcast of `aggregated` clients
    (the method's own messages on meta tensors: analysis.comm.MessageReplay)."""
    replay = MessageReplay(method, shapes)
    first = nbytes(replay.down(0, method.rank, 0))
    replay.aggregate(0, {cid: method.rank for cid in range(aggregated)})
    return {"up": nbytes(replay.up(1, method.rank)), "down_first": first, "down_returning": nbytes(replay.down(0, method.rank, 1))}


def measure(method, count, scratch):
    config = bytes_config(str(scratch / f"{method}-{count}"), method, count)
    from fedsim.runtime import run

    shutil.rmtree(config.output_dir, ignore_errors=True)
    start = time.perf_counter()
    run(config, progress=False)
    seconds = time.perf_counter() - start
    _, clients, _ = read_run(config.output_dir)
    shapes, spec = run_shapes(config.output_dir)
    aggregated = sum(c["round"] == 0 and c["status"] == "ok" for c in clients)
    row = {"method": method, "clients": len({c["client_id"] for c in clients}), "run_s": round(seconds, 1),
           "measured_up": mean_of(clients, 1, "bytes_up"), "measured_down_first": mean_of(clients, 0, "bytes_down"),
           "measured_down_returning": mean_of(clients, 1, "bytes_down"),
           **{f"analytic_{k}": v for k, v in analytic(shapes, spec, aggregated).items()},
           "replay_max_rel_err": predict_run(config.output_dir).max_rel_err()}
    for k in QUANTITIES:
        row[f"rel_diff_{k}"] = abs(row[f"measured_{k}"] - row[f"analytic_{k}"]) / row[f"analytic_{k}"]
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return row, (shapes, spec)


def plot(rows, models, path):
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    markers = "osD^v<>P"
    xs = sorted({int(x) for x in np.geomspace(1, max(r["clients"] for r in rows), 40).round()})
    for i, method in enumerate(METHODS):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        shapes, spec = models[method]
        line_x = [1] if method == "central" else [x for x in xs if x >= min(r["clients"] for r in mine)]
        lines = [analytic(shapes, spec, x) for x in line_x]
        for ax, key in zip(axes, ("up", "down_returning")):
            ax.plot(line_x, [a[key] for a in lines], color=f"C{i}", marker="_" if len(line_x) == 1 else None,
                    markersize=20, alpha=0.6, label=f"{method} (analytic)")
            ax.plot([r["clients"] for r in mine], [r[f"measured_{key}"] for r in mine], linestyle="none",
                    marker=markers[i], color=f"C{i}", markersize=8 - i * 0.6, fillstyle="none", label=f"{method} (measured)")
    for ax, title in zip(axes, ("up: a client's upload (round 1)", "down: a returning client's download (round 1)")):
        ax.set(xscale="log", yscale="log", title=title, xlabel="clients per round", ylabel="bytes per client")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize="x-small", ncol=2, loc="upper left")
    fig.suptitle("Per-client bytes against the number of clients: tiny BERT, rank 8, query+value, head averaged")
    fig.savefig(path, dpi=110)


def write(rows, models, out, header, done):
    pq.write_table(pa.Table.from_pylist(rows), out / "bytes.parquet")
    plot(rows, models, out / "bytes.png")
    f = lambda v: f"{v:,.0f}"  # noqa: E731
    lines = [*header, "", "| method | clients | measured up | measured down (first) | measured down (returning) | analytic up | "
             "analytic down (first) | analytic down (returning) | max rel. difference | replay of the run |", "|---" * 10 + "|"]
    for r in rows:
        rel = max(r[f"rel_diff_{k}"] for k in QUANTITIES)
        lines.append(f"| {r['method']} | {r['clients']:,} | " + " | ".join(f(r[f"measured_{k}"]) for k in QUANTITIES) + " | "
                     + " | ".join(f(r[f"analytic_{k}"]) for k in QUANTITIES) + f" | {rel:.2%} | {r['replay_max_rel_err']:.2%} |")
    by = {(r["method"], r["clients"]): r for r in rows}
    counts = sorted({r["clients"] for r in rows if r["method"] != "central"})
    sb = {(by[m, n]["measured_up"], by[m, n]["measured_down_returning"]) for m, n in by if m == "fed-sb"}
    lines += ["", "Bytes per client (tensor data plus keys). Up: round 1; down (first): round 0, the whole state; down "
              "(returning): round 1, round 0's broadcast. Max rel. difference: measured against analysis/comm.py over the "
              "three; replay: analysis.comm.predict_run over every round of the run, all clients.", ""]
    if counts:
        lines.append(f"- Fed-SB flat in the number of clients ({', '.join(map(str, counts))}): {'yes' if len(sb) == 1 else 'no'}")
    if len(counts) > 1 and ("flora", counts[0]) in by and ("flora", counts[-1]) in by:
        lo, hi = by["flora", counts[0]], by["flora", counts[-1]]
        lines.append(f"- FLoRA's download per client, {counts[-1]} vs {counts[0]} clients: "
                     f"{hi['measured_down_returning'] / lo['measured_down_returning']:.1f}× for {counts[-1] / counts[0]:.0f}× "
                     "the clients: grows linearly")
    if counts and ("fed-sb", counts[0]) in by and ("fedit", counts[0]) in by:
        sb_row, it_row = by["fed-sb", counts[0]], by["fedit", counts[0]]
        lines.append(f"- FedIT's upload per client over Fed-SB's: {it_row['measured_up'] / sb_row['measured_up']:.1f}×")
    worst = max(max(r[f"rel_diff_{k}"] for k in QUANTITIES) for r in rows)
    lines.append(f"- Measured equals analytic: {'yes' if worst == 0 else 'no'} (largest relative difference {worst:.2%})")
    lines.append("" if done else "\n**Partial**: the run is still going (or stopped).")
    (out / "bytes.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated client counts (default 10,100,1000)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "comm-scaling"), help="output folder")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="comm-scaling-"))
    info = machine_info()
    machine = (f"{info['cpu_count']} CPU cores ({info['cpu_model']}), {info['ram_gib']} GiB, "
               f"{'GPU ' + ', '.join(info['gpu']) if info['gpu'] else 'no GPU'}, Python {info['python']}, "
               f"torch {info['torch']}, Ray {info['ray']}; load average at start {info['load_average_at_start'][0]:.2f}")
    data = "SST-2 (../shared/data/sst2)" if sst2_available() else "bbc-news (packaged)"
    plan = [("central", 1)] + [(m, n) for n in counts for m in METHODS if m != "central"]
    rows, models = [], {}
    start = time.perf_counter()
    try:
        with local_ray():  # one Ray session for every run
            for method, count in plan:
                print(f"comm-scaling: {method}, {count} clients ...", flush=True)
                row, models[method] = measure(method, count, scratch)
                rows.append(row)
                wall = time.perf_counter() - start
                header = ["# Experiment 4: communication scaling, measured against analysis/comm.py", "",
                          f"`python experiments/comm-scaling/run.py --clients {args.clients}`: {len(rows)} runs, "
                          f"wall time {wall / 60:.1f} min, one local Ray. Data: {data}. Machine: {machine}.", "",
                          "Tiny BERT (hidden 64, 2 layers), rank 8 on query and value (4 adapted layers, d = k = 64), the "
                          "classification head trained and averaged; every client sampled every round; 2 rounds × 1 local step; "
                          "central has one client. fra-then-ffa switches to FFA at round 1: its round-1 upload is FFA's "
                          "(B only), while a returning client's round-1 download is round 0's FRA-LoRA broadcast (A and B)."]
                write(rows, models, out, header, done=len(rows) == len(plan))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print((out / "bytes.md").read_text())


if __name__ == "__main__":
    main()
