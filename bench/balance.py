"""Balance and overhead of a round, before and after a change, measured side by side in one run.

    python bench/balance.py --before /path/to/old/checkout [--quick]

Two workloads, each run once with the code of this checkout ("after") and once with the code at ``--before``
("before", e.g. a ``git worktree`` of the previous commit), alternately, in subprocesses that import the one or the
other (the config keys and result columns used exist in both):

- ``sst2-iid``: SST-2, 100 IID clients of 40 phrases, 20 a round, 5 local steps of batch 8, LoRA r = 8, α = 16 on
  query/value, FedIT, 3 rounds, 2 workers × 1 CPU, evaluation on one row only (the workload the issue compared with
  Flower's simulation engine): the rounds' wall time;
- ``sst2-dirichlet-10`` and ``-20``: MiniLM on SST-2, 40 Dirichlet(0.5) clients, 10 or 20 a round, the same
  training: efficiency = Σ train_s ÷ (Σ round wall × workers), and its limit Σ train_s ÷ workers.

Round 0 (warm-up) is left out of the timings. Targets: efficiency ≥ 0.9 at 10 and 20 clients a round; the SST-2
workload's rounds ≤ 0.85× the before's wall. Writes bench/results/balance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import ROOT, SCRATCH, SST2, machine_info, sst2_available, table, write_result

WORKLOADS = {
    "sst2-iid": {"clients.count": 100, "clients.per_round": 20, "clients.partition": "iid", "workload.train_limit": 4000},
    "sst2-dirichlet-10": {"clients.count": 40, "clients.per_round": 10, "clients.partition": "dirichlet",
                          "clients.alpha": 0.5, "workload.train_limit": 4000},
    "sst2-dirichlet-20": {"clients.count": 40, "clients.per_round": 20, "clients.partition": "dirichlet",
                          "clients.alpha": 0.5, "workload.train_limit": 4000},
}
COMMON = {"model.name": "minilm", "workload.name": "sst2", "workload.eval_limit": 1, "workload.max_length": 64,
          "method.name": "fedit", "method.rank": 8, "method.alpha": 16, "model.target_modules": "[query,value]",
          "train.local_steps": 5, "train.batch_size": 8, "runtime.workers": 2, "runtime.cpus_per_worker": 1}

CHILD = r"""
import json, sys, time
import pyarrow.parquet as pq
from fedsim.config import load_config
from fedsim.runtime import run
config = load_config(None, sys.argv[2:])
start = time.perf_counter()
run(config, overwrite=True, progress=False)
rounds = pq.read_table(config.output_dir + "/rounds.parquet").to_pylist()
clients = pq.read_table(config.output_dir + "/clients.parquet").to_pylist()
print("RESULT " + json.dumps({"run_s": time.perf_counter() - start, "rounds": rounds,
      "clients": [{k: c[k] for k in ("round", "client_id", "worker_id", "train_s", "status")} for c in clients]}))
"""


def run_one(code: Path, name: str, overrides: dict, rounds: int, tag: str) -> dict:
    items = {**COMMON, **overrides, "workload.path": str(SST2), "train.rounds": rounds,
             "output_dir": str(SCRATCH / "balance" / f"{tag}-{name}")}
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", CHILD, "x", *[f"{k}={v}" for k, v in items.items()]], cwd=code, env=env,
                          capture_output=True, text=True, timeout=3600)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{tag} {name} failed:\n{done.stderr[-3000:]}")
    data = json.loads(line.removeprefix("RESULT "))
    timed = [r for r in data["rounds"] if r["round"] >= 1]
    wall = sum(r["wall_s"] for r in timed)
    train = sum(c["train_s"] for c in data["clients"] if c["round"] >= 1)
    workers = COMMON["runtime.workers"]
    per_worker = {}
    for c in data["clients"]:
        if c["round"] >= 1:
            key = (c["round"], c["worker_id"])
            per_worker[key] = per_worker.get(key, 0.0) + c["train_s"]
    return {"code": tag, "workload": name, "rounds_timed": len(timed), "rounds_wall_s": round(wall, 2),
            "train_s_sum": round(train, 2), "efficiency": round(train / (wall * workers), 3),
            "limit_s": round(train / workers, 2), "within_limit": round((train / workers) / wall, 3),
            "slowest_worker_s": round(sum(max(v for (r, _), v in per_worker.items() if r == t) for t in {r for r, _ in per_worker}), 2),
            "phases": {k: round(sum(r.get(k, 0.0) or 0.0 for r in timed), 3)
                       for k in ("train_s_max", "aggregate_s", "eval_s", "overhead_s") if k in timed[0]},
            "run_s": round(data["run_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout of the code to compare with (e.g. a git worktree of main)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, one workload each (a smoke test)")
    parser.add_argument("--repeats", type=int, default=1, help="before/after pairs of each workload")
    args = parser.parse_args()
    if not sst2_available():
        raise SystemExit(f"bench/balance.py needs SST-2 at {SST2} (see shared/data/README.md)")
    rounds = 2 if args.quick else 3
    names = ["sst2-dirichlet-10"] if args.quick else list(WORKLOADS)
    rows = []
    for name in names:
        for _ in range(args.repeats):
            for tag, code in (("before", Path(args.before).resolve()), ("after", ROOT)):
                rows.append(run_one(code, name, WORKLOADS[name], rounds, tag))
                print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    for name in names:
        before = [r["rounds_wall_s"] for r in rows if r["workload"] == name and r["code"] == "before"]
        after = [r["rounds_wall_s"] for r in rows if r["workload"] == name and r["code"] == "after"]
        ratios[name] = round(sum(after) / sum(before), 3)
    result = {"machine": machine_info(), "before": str(Path(args.before).resolve()), "rows": rows,
              "after_over_before_wall": ratios,
              "table": table(rows, ["code", "workload", "rounds_wall_s", "train_s_sum", "efficiency", "within_limit", "run_s"])}
    print(result["table"])
    print("after / before rounds wall:", ratios)
    write_result("balance_quick" if args.quick else "balance", result)


if __name__ == "__main__":
    main()
