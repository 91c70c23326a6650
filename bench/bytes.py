"""Bytes on the wire per client, per method, against the number of clients — from real runs' clients.parquet.

    python bench/bytes.py [--quick] [--clients 10,100,1000] [--methods fed-sb,fedit,...]

Every method (fed-sb, fedit, fedex-lora, ffa-lora, flora, fra-lora, fra-then-ffa, central — central has one
client by definition) on the small BERT, rank 8, adapters on query and value, the head trained and averaged,
every client sampled every round, 2 rounds (1 local step: the bytes do not depend on training). Per client:
what it sends up, and what it receives down the first time it takes part (round 0: the whole global state) and
when it returns (round 1: the round's broadcast). fra-then-ffa switches to FFA at round 1, so both its phases
show. Expected: Fed-SB's bytes flat in the number of clients; FLoRA's downlink growing with it (the stacked
adapters of every client). Writes bench/results/bytes.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics

from common import SCRATCH, bytes_config, local_ray, machine_info, read_run, table, write_result

from fedsim.methods import METHODS


def per_client(clients: list[dict], round_idx: int, key: str) -> float | None:
    values = [c[key] for c in clients if c["round"] == round_idx and c["status"] == "ok"]
    return statistics.fmean(values) if values else None


def measure(method: str, count: int) -> dict:
    from fedsim.runtime import run

    config = bytes_config(str(SCRATCH / "bytes" / f"{method}-{count}"), method, count)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    run(config, progress=False)
    rounds, clients, summary = read_run(config.output_dir)
    result = {
        "method": method, "clients": len({c["client_id"] for c in clients}), "clients_per_round": rounds[0]["clients_sampled"],
        "up_bytes_per_client": per_client(clients, 1, "bytes_up"),
        "down_bytes_first_contact": per_client(clients, 0, "bytes_down"),
        "down_bytes_returning": per_client(clients, 1, "bytes_down"),
        "up_bytes_round0": per_client(clients, 0, "bytes_up"),
        "round_bytes_up": [r["bytes_up"] for r in rounds], "round_bytes_down": [r["bytes_down"] for r in rounds],
        "agg_error": [r["agg_error"] for r in rounds],
    }
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 50 clients (about 3 minutes)")
    parser.add_argument("--clients", default=None, help="comma-separated (default 10,100,1000; --quick 10,50)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    counts = [int(c) for c in (args.clients or ("10,50" if args.quick else "10,100,1000")).split(",")]
    methods = args.methods.split(",")
    info = machine_info()
    results = []
    # by client count, then method: the smaller counts of every method first; the JSON is rewritten after every
    # run, so a bench stopped early still leaves what it measured
    plan = [("central", 1)] * ("central" in methods) + [(m, n) for n in counts for m in methods if m != "central"]
    with local_ray():  # one Ray for every run: bytes do not depend on it, and it saves a start per run
        for method, count in plan:
            print(f"bytes: {method}, {count} clients ...", flush=True)
            results.append(measure(method, count))
            write_result("bytes", {"machine": info, "quick": args.quick, "partial": True, "results": results})
    rows = [{"method": r["method"], "clients": r["clients"], "up B/client": r["up_bytes_per_client"],
             "down B/client (first)": r["down_bytes_first_contact"], "down B/client (returning)": r["down_bytes_returning"],
             "up round 0": r["up_bytes_round0"]} for r in results]
    text = table(rows, list(rows[0]), "Bytes per client (tiny BERT, rank 8, query+value, head averaged; round 1 unless said)")
    fed_sb = [r for r in results if r["method"] == "fed-sb"]
    verdict = {"fed_sb_flat": len({(r["up_bytes_per_client"], r["down_bytes_returning"]) for r in fed_sb}) == 1}
    print(f"  fed-sb bytes per client flat across {counts}: {verdict['fed_sb_flat']}")
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result("bytes", {"machine": info, "quick": args.quick, "partial": False, "model": "tiny-bert (hidden 64, 2 layers)", "rank": 8,
                           "results": results, "verdict": verdict, "table": text})


if __name__ == "__main__":
    main()
