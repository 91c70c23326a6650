"""What the simulator costs beyond the training itself: efficiency and per-client overhead of a round.

    python bench/overhead.py [--quick] [--models tiny-bert,minilm] [--clients 100]

For Fed-SB and FedIT, 100 clients a round (all sampled), 5 local steps of batch 16, 2 workers × 1 CPU,
eval only after the last round. Per round (round 0 is warm-up, the last round also evaluates; both are
left out of the means):

- efficiency = Σ train_s (measured inside the workers, clients.parquet) ÷ (wall_s (rounds.parquet) × workers)
- overhead per client (ms) = (wall_s × workers − Σ train_s) ÷ clients of the round
- the round broken down, timed from outside fedsim (bench/common.py: DriverTimer wraps Experiment's methods and
  ray.get/ray.wait; ray.timeline() gives what the actors themselves spent)

Targets: efficiency ≥ 0.85, overhead ≤ 20 ms a client (CPU). Writes bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import statistics

from common import SCRATCH, fedsim_config, instrumented_run, machine_info, round_metrics, steady, table, write_result

TARGET_EFFICIENCY = 0.85
TARGET_OVERHEAD_MS = 20.0


def mean_dict(dicts: list[dict]) -> dict:
    return {key: statistics.fmean(d[key] for d in dicts) for key in dicts[0]}


def measure(model: str, method: str, clients: int, rounds: int, workers: int) -> dict:
    config = fedsim_config(str(SCRATCH / "overhead" / f"{model}-{method}"), model=model, **{
        "method.name": method, "clients.count": clients, "clients.per_round": clients, "train.rounds": rounds,
        "runtime.workers": workers,
    })
    run = instrumented_run(config)
    metrics = [round_metrics(row, workers) for row in run["rounds"]]
    timed = steady(metrics, skip_first=1, skip_last=1)
    summary = {
        "model": model, "method": method, "clients_per_round": clients, "workers": workers,
        "local_steps": config.train.local_steps, "batch_size": config.train.batch_size, "rank": config.method.rank,
        "rounds_timed": [m["round"] for m in timed],
        "wall_s": statistics.fmean(m["wall_s"] for m in timed),
        "train_s_sum": statistics.fmean(m["train_s_sum"] for m in timed),
        "train_ms_per_client": statistics.fmean(m["train_s_sum"] for m in timed) / clients * 1e3,
        "efficiency": statistics.fmean(m["efficiency"] for m in timed),
        "overhead_ms_per_client": statistics.fmean(m["overhead_ms_per_client"] for m in timed),
        "breakdown_s": mean_dict([m["breakdown_s"] for m in timed]),
        "eval_s_last_round": metrics[-1]["breakdown_s"]["eval"],
        "fixed_costs_s": {**run["phases_s"], "total_run_s": run["total_s"], "rounds_s": sum(m["wall_s"] for m in metrics)},
        "peak_memory": {k: v for k, v in run["memory"].items() if k != "ray_processes_at_peak"},
        "per_round": metrics,
    }
    if all("worker_side" in m for m in timed):
        sides = [m["worker_side"] for m in timed]
        summary["worker_side"] = {
            "outside_train_local_ms_per_client": statistics.fmean(s["outside_train_local_ms_per_client"] for s in sides),
            "driver_wait_minus_slowest_cohort_s": statistics.fmean(s["driver_wait_minus_slowest_cohort_s"] for s in sides),
            "imbalance_idle_s": statistics.fmean(s["imbalance_idle_s"] for s in sides),
            "imbalance_ms_per_client": statistics.fmean(s["imbalance_idle_s"] for s in sides) / clients * 1e3,
        }
    summary["meets_efficiency_target"] = summary["efficiency"] >= TARGET_EFFICIENCY
    summary["meets_overhead_target"] = summary["overhead_ms_per_client"] <= TARGET_OVERHEAD_MS
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer clients and rounds (about 2 minutes)")
    parser.add_argument("--models", default="tiny-bert",
                        help="comma-separated: tiny-bert, minilm (the real MiniLM-L6: about 10× the work a client; not in the default budget)")
    parser.add_argument("--methods", default="fed-sb,fedit")
    parser.add_argument("--clients", type=int, default=None, help="clients a round (default 100; --quick 40)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 4; --quick 3); round 0 and the last (eval) are not timed")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    models = args.models.split(",")
    clients = args.clients or (40 if args.quick else 100)
    rounds = args.rounds or (3 if args.quick else 4)
    info = machine_info()
    results = []
    for model in models:
        for method in args.methods.split(","):
            # MiniLM is ~10x the tiny model's work a client: 3 rounds keep the full bench within its budget
            model_rounds = min(rounds, 3) if model == "minilm" else rounds
            print(f"overhead: {model} {method}, {clients} clients a round, {model_rounds} rounds ...", flush=True)
            results.append(measure(model, method, clients, model_rounds, args.workers))
    rows = [{
        "model": r["model"], "method": r["method"], "clients": r["clients_per_round"], "wall s/round": r["wall_s"],
        "Σ train s": r["train_s_sum"], "train ms/client": r["train_ms_per_client"], "efficiency": r["efficiency"],
        "overhead ms/client": r["overhead_ms_per_client"],
        "outside train_local ms/client": r.get("worker_side", {}).get("outside_train_local_ms_per_client"),
        "imbalance ms/client": r.get("worker_side", {}).get("imbalance_ms_per_client"),
    } for r in results]
    text = table(rows, list(rows[0]), f"Overhead (targets: efficiency ≥ {TARGET_EFFICIENCY}, overhead ≤ {TARGET_OVERHEAD_MS:g} ms/client)")
    breakdown = [{"model": r["model"], "method": r["method"], **{k.split(" ")[0]: v for k, v in r["breakdown_s"].items()},
                  "eval (last round)": r["eval_s_last_round"]} for r in results]
    text += table(breakdown, list(breakdown[0]), "Round breakdown (seconds, mean of the timed rounds)")
    fixed = [{"model": r["model"], "method": r["method"], **{k: v for k, v in r["fixed_costs_s"].items()}} for r in results]
    text += table(fixed, list(fixed[0]), "Fixed costs of a run (seconds)")
    info["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    write_result("overhead", {"machine": info, "quick": args.quick, "targets": {"efficiency": TARGET_EFFICIENCY,
                 "overhead_ms_per_client": TARGET_OVERHEAD_MS}, "definitions": {
                     "efficiency": "Σ train_s ÷ (wall_s × workers), rounds 1..n-2",
                     "overhead_ms_per_client": "(wall_s × workers − Σ train_s) ÷ clients a round",
                     "outside_train_local_ms_per_client": "(Σ run_cohort actor time − Σ train_s) ÷ clients: load_state, trainable_parameters, optimizer, upload, isfinite",
                     "imbalance_ms_per_client": "(slowest − fastest worker's run_cohort) ÷ clients: the idle worker's wait"},
                 "results": results, "table": text})


if __name__ == "__main__":
    main()
