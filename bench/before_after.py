"""One benchmark, two checkouts, in one run: today's code against an earlier revision, alternated so that both see the
same machine load.

    python bench/before_after.py --before /path/to/old/checkout [--repeats 3] [--name cohort] -- <bench/cohort.py's arguments>

Runs ``bench/cohort.py`` (with the given arguments) in the old checkout and in this one, ``--repeats`` times each, old
and new in turn, each with its own tree on PYTHONPATH; reads each run's ``bench/results/cohort[-private].json`` and
writes ``bench/results/before-after-<name>.json``: every measurement, and per (method, K) the median examples/s of each
and their ratio (new / old; above 1 is faster). Make the old checkout with ``git worktree add --detach DIR REV``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine_info, table, write_result

HERE = Path(__file__).resolve().parents[1]


def run_once(checkout: Path, arguments: list[str]) -> list[dict]:
    """One run of bench/cohort.py in ``checkout``: its results; the checkout's own results file is left as it was."""
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    name = "cohort-private" if "--private" in arguments else "cohort"
    path = checkout / "bench" / "results" / f"{name}.json"
    kept = path.read_bytes() if path.exists() else None
    try:
        subprocess.run([sys.executable, "bench/cohort.py", *arguments], cwd=checkout, env=environment, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(path.read_text())["results"]
    finally:
        if kept is not None:
            path.write_bytes(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="the old checkout (a git worktree at the old revision)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="cohort")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="after --: bench/cohort.py's arguments")
    args = parser.parse_args()
    arguments = [a for a in args.arguments if a != "--"]
    revisions = {side: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()
                 for side, path in (("before", args.before), ("after", HERE))}
    measured = {"before": [], "after": []}
    for repeat in range(args.repeats):
        for side, checkout in (("before", args.before.resolve()), ("after", HERE)):
            print(f"before/after: {side} ({revisions[side]}), repeat {repeat + 1} ...", flush=True)
            measured[side] += run_once(checkout, arguments)
    summary = []
    for method, size in sorted({(r["method"], r["cohort_size"]) for r in measured["after"]}):
        def median(side):
            return statistics.median(r["examples_per_s"] for r in measured[side] if (r["method"], r["cohort_size"]) == (method, size))
        summary.append({"method": method, "cohort_size": size, "before_examples_per_s": median("before"),
                        "after_examples_per_s": median("after"), "after_over_before": median("after") / median("before")})
    text = table(summary, ["method", "cohort_size", "before_examples_per_s", "after_examples_per_s", "after_over_before"],
                 f"bench/cohort.py {' '.join(arguments)}: {revisions['before']} → {revisions['after']}, median of {args.repeats}")
    info = machine_info()
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result(f"before-after-{args.name}", {"machine": info, "arguments": arguments, "revisions": revisions,
                                               "repeats": args.repeats, "summary": summary, "measured": measured, "table": text})
    print(text)


if __name__ == "__main__":
    main()
