"""How fedsim scales with clients, against the reference loop (one process, a deepcopy of the model per client).

    python bench/scale.py [--quick] [--clients 10,100,1000] [--workers 2]

Fed-SB on the small BERT (tests/tiny_models.py), every client sampled every round, 2 local steps of batch 8,
2 workers × 1 CPU. The data is the same for every client count (SST-2, 16,000 training rows, iid: 16 rows a
client at 1000 clients; bbc-news, all 1,781 rows and batch 1, where SST-2 is absent), so that per-client work is
the same and any growth is the simulator's. For each count:

- fedsim: wall time of round 1 (round 0 is warm-up; the final evaluation is subtracted), Σ train_s, and the peak
  of the summed RSS of every Ray process (raylet, gcs_server, workers, aggregator, agents — sampled every 0.2 s
  in a background thread), alone and with the driver;
- the reference loop (bench/reference_loop.py, a child process): wall time of one round after a one-client
  warm-up, and the peak RSS of its process (sampled the same way, and its own ru_maxrss).

Targets: fedsim's peak memory at the largest count ≤ 1.25 × at the smallest; time per round linear in the
clients (s per client flat); fedsim faster than the reference at 2 workers, and smaller at 1000 clients.
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import (ROOT, BackgroundSampler, SCRATCH, SST2, fedsim_config, instrumented_run, machine_info, sst2_available, table,
                    write_result)

TARGET_MEMORY_RATIO = 1.25
LOCAL_STEPS = 2  # the per-client work is the same at every count; 2 steps keep 1000 clients within the bench's budget


def workload_overrides(clients: int) -> dict:
    if sst2_available():
        return {"workload.name": "sst2", "workload.path": str(SST2), "workload.train_limit": 16000,
                "workload.eval_limit": 64, "train.batch_size": 8}
    print(f"scale: {SST2} absent; using bbc-news (1,781 rows, batch 1 so that every client's batch is full)")
    return {"workload.name": "bbc-news", "workload.train_limit": "null", "workload.eval_limit": 64, "train.batch_size": 1}


def overrides_for(clients: int, workers: int) -> dict:
    # at 1000 clients round 0's warm-up (first kernels) is spread over 500 clients a worker: one round is enough
    return {"method.name": "fed-sb", "clients.count": clients, "clients.per_round": clients, "clients.partition": "iid",
            "train.local_steps": LOCAL_STEPS, "train.rounds": 1 if clients >= 1000 else 2, "runtime.workers": workers,
            "method.rank": 8,
            **workload_overrides(clients)}


def run_fedsim(clients: int, workers: int) -> dict:
    config = fedsim_config(str(SCRATCH / "scale" / f"fedsim-{clients}"), **overrides_for(clients, workers))
    run = instrumented_run(config)
    row = run["rounds"][-1]
    eval_s = row.get("eval_s", 0.0)
    wall = row["wall_s"] - eval_s
    return {
        "clients": clients, "workers": workers, "round_wall_s": wall, "eval_s_subtracted": eval_s,
        "train_s_sum": row["train_s_sum"], "s_per_client": wall / clients, "round_timed": row["round"],
        "train_ms_per_client": row["train_s_sum"] / clients * 1e3,
        "overhead_ms_per_client": (wall * workers - row["train_s_sum"]) / clients * 1e3,
        "efficiency": row["train_s_sum"] / (wall * workers),
        "total_run_s": run["total_s"], "phases_s": run["phases_s"], "memory": run["memory"],
    }


class ProcessTreeSampler(BackgroundSampler):
    """Peak of the summed RSS of a process and its descendants, every ``interval`` s, in a background thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        super().__init__(interval)
        self.psutil, self.pid = psutil, pid
        self.peak = 0

    def sample(self) -> None:
        psutil = self.psutil
        try:
            root = psutil.Process(self.pid)
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
        except psutil.NoSuchProcess:
            pass


def run_reference(clients: int, workers: int, threads: int) -> dict:
    overrides = {k: v for k, v in overrides_for(clients, workers).items() if not k.startswith("runtime.")}
    command = [sys.executable, str(ROOT / "bench" / "reference_loop.py"), "--overrides", json.dumps(overrides),
               "--rounds", "1", "--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT / "bench", env=env)
    with ProcessTreeSampler(process.pid) as sampler:
        out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"reference loop failed ({process.returncode}):\n{err[-3000:]}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("REFERENCE "))[len("REFERENCE "):])
    wall = result["round_s"][-1]
    return {"clients": clients, "threads": result["torch_threads"], "round_wall_s": wall, "s_per_client": wall / clients,
            "train_s_sum": result["train_s_sum"][-1], "deepcopy_s_sum": result["deepcopy_s_sum"][-1],
            "deepcopy_ms_per_client": result["deepcopy_s_sum"][-1] / clients * 1e3, "setup_s": result["setup_s"],
            "peak_rss_mib_sampled": round(sampler.peak / 2**20, 1), "peak_rss_mib_self": round(result["peak_rss_mib_self"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients (about 3 minutes)")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 10,100,1000; --quick 10,100)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference-threads", type=int, default=1,
                        help="torch threads of the reference loop (default 1: on a model this small, intra-op threads only "
                             "add synchronisation, and under CPU contention they are several times slower; 0 = torch's default)")
    parser.add_argument("--reference-threads-also", type=int, default=1,
                        help="1: also run the reference with torch's default threads (every core) at the smallest count; 0: not")
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in (args.clients or ("10,100" if args.quick else "10,100,1000")).split(",")]
    info = machine_info()
    fedsim, reference = [], []
    for clients in counts:
        print(f"scale: fedsim, {clients} clients ...", flush=True)
        fedsim.append(run_fedsim(clients, args.workers))
        if not args.no_reference:
            print(f"scale: reference loop, {clients} clients ...", flush=True)
            reference.append(run_reference(clients, args.workers, args.reference_threads))
    reference_default_threads = None
    if not args.no_reference and args.reference_threads_also:
        print(f"scale: reference loop, {counts[0]} clients, torch's default threads ...", flush=True)
        reference_default_threads = run_reference(counts[0], args.workers, 0)
    smallest, largest = fedsim[0], fedsim[-1]
    memory_ratio = largest["memory"]["peak_ray_rss_mib"] / smallest["memory"]["peak_ray_rss_mib"]
    time_per_client_ratio = largest["s_per_client"] / smallest["s_per_client"]
    overhead_ratio = largest["overhead_ms_per_client"] / max(1e-9, smallest["overhead_ms_per_client"])
    rows = []
    for i, f in enumerate(fedsim):
        row = {"clients": f["clients"], "fedsim s/round": f["round_wall_s"], "fedsim ms/client": f["s_per_client"] * 1e3,
               "train ms/client": f["train_ms_per_client"], "overhead ms/client": f["overhead_ms_per_client"],
               "efficiency": f["efficiency"], "load avg": f["memory"].get("mean_load_average"), "Ray RSS MiB": f["memory"]["peak_ray_rss_mib"],
               "Ray PSS MiB": f["memory"]["peak_ray_pss_mib"], "Ray+driver RSS MiB": f["memory"]["peak_ray_plus_driver_rss_mib"]}
        if reference:
            r = reference[i]
            row.update({"reference s/round": r["round_wall_s"], "reference ms/client": r["s_per_client"] * 1e3,
                        "deepcopy ms/client": r["deepcopy_ms_per_client"], "reference RSS MiB": r["peak_rss_mib_sampled"],
                        "speed-up": r["round_wall_s"] / f["round_wall_s"]})
        rows.append(row)
    text = table(rows, list(rows[0]), f"Scale (Fed-SB, tiny BERT, {args.workers} workers; memory = peak of the summed RSS)")
    verdict = {
        "memory_ratio_largest_over_smallest": memory_ratio, "memory_target": TARGET_MEMORY_RATIO,
        "meets_memory_target": memory_ratio <= TARGET_MEMORY_RATIO,
        "s_per_client_ratio_largest_over_smallest": time_per_client_ratio,
        "overhead_ms_per_client_ratio_largest_over_smallest": overhead_ratio,
        # train_s itself varies with CPU contention from other jobs: the simulator's part is the overhead per client
        "linear_or_better": overhead_ratio <= 1.25,
    }
    if reference:
        verdict.update({
            "faster_than_reference_at_every_count": all(r["round_wall_s"] > f["round_wall_s"] for f, r in zip(fedsim, reference)),
            "less_memory_than_reference_at_largest (Ray+driver vs reference)":
                largest["memory"]["peak_ray_plus_driver_rss_mib"] < reference[-1]["peak_rss_mib_sampled"],
        })
    verdict_text = "\n".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in verdict.items())
    print(verdict_text)
    text += "\n" + verdict_text
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result("scale", {"machine": info, "quick": args.quick, "workload": overrides_for(counts[0], args.workers),
                           "fedsim": fedsim, "reference": reference,
                           "reference_default_threads": reference_default_threads, "verdict": verdict, "table": text})


if __name__ == "__main__":
    main()
