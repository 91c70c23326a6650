"""Stateful virtual clients: a worker's memory against the number of clients that keep tensors (FedSA-LoRA).

    python bench/client_state.py [--quick] [--clients 10,1000]

FedSA-LoRA keeps each client's B and head on the client: in fedsim, in the per-client store under
``output_dir/client_state`` (one safetensors file a client and round), read by whichever worker trains the client
and written back after. On the small BERT (tests/tiny_models.py), every client sampled in each of 2 rounds, 1 local
step of batch 4, 2 workers × 1 CPU: the peak RSS of each ClientWorker process (sampled every 0.2 s), the store's
size on disk, and the round's wall time, at each client count. Target: the workers' peak memory at 1000 clients
≤ 1.25 × at 10. Writes bench/results/client_state.json.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from common import SCRATCH, BackgroundSampler, fedsim_config, local_ray, machine_info, read_run, table, write_result

TARGET_RATIO = 1.25


class WorkerMemory(BackgroundSampler):
    """The peak RSS of every ClientWorker process this (driver) process started, by pid."""

    def __init__(self, interval: float = 0.2):
        import psutil

        super().__init__(interval)
        self.psutil, self.me, self.peaks = psutil, psutil.Process(), {}

    def sample(self) -> None:
        with contextlib.suppress(self.psutil.NoSuchProcess):
            for proc in self.me.children(recursive=True):
                with contextlib.suppress(self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    if "ClientWorker" in " ".join(proc.cmdline()):
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)


def measure(clients: int, rows_per_client: int) -> dict:
    import shutil
    from pathlib import Path

    from fedsim.runtime import run

    config = fedsim_config(str(SCRATCH / "client_state" / f"fedsa-{clients}"), **{
        "method.name": "fedsa-lora", "clients.count": clients, "clients.per_round": clients, "clients.partition": "iid",
        "workload.name": "bbc-news", "workload.train_limit": clients * rows_per_client, "workload.eval_limit": 16,
        "train.rounds": 2, "train.local_steps": 1, "train.batch_size": 4, "method.rank": 8, "eval.every": 1000})
    shutil.rmtree(config.output_dir, ignore_errors=True)
    sampler = WorkerMemory()
    start = time.perf_counter()
    with local_ray(max(2, config.runtime.workers)), sampler:
        run(config, progress=False)
    total = time.perf_counter() - start
    rounds, client_rows, _ = read_run(config.output_dir)
    store = Path(config.output_dir) / "client_state"
    files = [p for p in store.rglob("*.safetensors")]
    peaks = sorted(sampler.peaks.values())
    return {"clients": clients, "workers": len(peaks), "peak_worker_rss_mib": round(max(peaks) / 2**20, 1),
            "worker_rss_mib": [round(p / 2**20, 1) for p in peaks], "store_files": len(files),
            "store_mib": round(sum(p.stat().st_size for p in files) / 2**20, 2),
            "clients_trained": sum(r["status"] == "ok" for r in client_rows), "round_1_wall_s": round(rounds[-1]["wall_s"], 2),
            "run_s": round(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients (a smoke test)")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 10,1000)")
    args = parser.parse_args()
    counts = [int(c) for c in (args.clients or ("10,100" if args.quick else "10,1000")).split(",")]
    rows = [measure(count, rows_per_client=2) for count in counts]
    ratio = rows[-1]["peak_worker_rss_mib"] / rows[0]["peak_worker_rss_mib"]
    result = {"machine": machine_info(), "rows": rows, "memory_ratio": round(ratio, 3), "target_ratio": TARGET_RATIO,
              "meets_target": ratio <= TARGET_RATIO,
              "table": table(rows, ["clients", "peak_worker_rss_mib", "store_files", "store_mib", "clients_trained",
                                    "round_1_wall_s", "run_s"])}
    print(result["table"])
    print(f"worker memory, {counts[-1]} vs {counts[0]} clients: {ratio:.3f}× (target ≤ {TARGET_RATIO})")
    write_result("client_state_quick" if args.quick else "client_state", result)


if __name__ == "__main__":
    main()
