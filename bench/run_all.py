"""Run every bench script in turn, each in its own process: ``python bench/run_all.py [--quick]``.

Full: about 25 minutes on 2 CPU cores plus llm_scale's (longer when other jobs share the machine); --quick: about 10.
Each script writes bench/results/<name>.json; gpu.py writes a 'not run' record where no GPU exists.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("overhead", "scale", "bytes", "cohort", "gpu", "llm_scale")


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for name in SCRIPTS:
        start = time.perf_counter()
        print(f"=== bench/{name}.py{' --quick' if quick else ''}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if quick else [])], cwd=HERE)
        print(f"=== bench/{name}.py: exit {code}, {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
