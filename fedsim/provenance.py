"""What produced a run: the versions of the libraries that compute its numbers, the revision of fedsim's code, the
devices and threads that trained, and the seed.

A run writes one record per start to ``provenance.json`` (the first start, then each ``--resume``), and the record of
the start that finished to ``summary.json``; ``fedsim run --resume`` says in one line which versions differ from the
run's first start. ``analysis.results`` turns a run's record into columns (``provenance_columns``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from fedsim.storage import Location

PACKAGES = ("fedsim", "torch", "transformers", "peft", "opacus", "ray", "pyarrow", "numpy")
PROVENANCE_FILE = "provenance.json"
REVISION_FILE = "fedsim-revision.json"  # written beside the packages by `fedsim submit`, where the job has no git


def versions() -> dict[str, str | None]:
    """``{"python": "3.11.7", "torch": "2.13.0+cpu", ...}``: this process's Python and ``PACKAGES`` (None: not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def code_root() -> Path:
    """The folder that holds the ``fedsim`` package (a checkout's root, or site-packages)."""
    return Path(__file__).resolve().parent.parent


def git_revision(root: Path | None = None) -> dict | None:
    """``{"revision": sha, "dirty": bool}`` of the git checkout fedsim runs from (dirty: tracked files changed); in a
    submitted job, what ``fedsim submit`` recorded; None for an installed package."""
    root = root or code_root()
    recorded = root / REVISION_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())
    try:
        revision = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if revision.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"revision": revision.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_name(device: str) -> str:
    """``cuda`` → ``cuda (NVIDIA H100 80GB HBM3)``; ``cpu`` → ``cpu (AMD EPYC 7B13, 2 cores)``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({_cpu_model()}, {os.cpu_count()} cores)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def worker_record(device: str) -> dict:
    """What a worker reports of itself: its device, its torch threads, and its library versions (a cluster's nodes can
    run other versions than the driver)."""
    import torch

    return {"device": device_name(device), "torch_threads": torch.get_num_threads(), "versions": versions()}


def collect(seed: int, workers: list[dict]) -> dict:
    """This start's record: the driver's versions and code revision, the platform, the seed, and each worker's device,
    threads and (where they differ from the driver's) versions."""
    driver = versions()
    return {
        "versions": driver,
        "git": git_revision(),
        "platform": f"{platform.system()} {platform.machine()}",
        "seed": seed,
        "devices": sorted({w["device"] for w in workers}),
        "torch_threads": sorted({w["torch_threads"] for w in workers}),
        "worker_versions_differ": sorted({f"{name} {w['versions'].get(name)} on a worker" for w in workers
                                          for name in driver if w["versions"].get(name) != driver[name]}),
    }


def differences(first: dict, now: dict) -> list[str]:
    """``["transformers 5.24.0 → 5.25.0", "git abc1234 → def5678"]``: what differs between two starts' records."""
    changed = [f"{name} {first['versions'].get(name)} → {value}" for name, value in now["versions"].items()
               if first["versions"].get(name) != value]
    old, new = first.get("git") or {}, now.get("git") or {}
    if old.get("revision") != new.get("revision"):
        changed.append(f"git {str(old.get('revision'))[:12]} → {str(new.get('revision'))[:12]}")
    if first.get("devices") != now.get("devices"):
        changed.append(f"devices {', '.join(first.get('devices', []))} → {', '.join(now.get('devices', []))}")
    return changed


def record_start(output_dir: Location, record: dict, start_round: int) -> str | None:
    """Append this start's ``record`` to the run's ``provenance.json``; for a resumed run, return the line that says
    what differs from its first start (None when nothing does)."""
    path = output_dir / PROVENANCE_FILE
    starts = json.loads(path.read_text()) if start_round > 0 and path.is_file() else []
    starts.append({"start_round": start_round, **record})
    path.write_text(json.dumps(starts, indent=2))
    changed = differences(starts[0], record) if len(starts) > 1 else []
    if not changed:
        return None
    return (f"fedsim: resuming {output_dir} from round {start_round} with {'; '.join(changed)} (its first start's in "
            f"{PROVENANCE_FILE}): the rounds from here may not match an uninterrupted run")


def one_line(record: dict) -> str:
    """The closing table's footer: ``fedsim 0.1.0 (git 89cf3f4, dirty) · torch 2.13.0+cpu · … · cpu (…) × 1 thread · seed 0``."""
    v = record["versions"]
    git = record.get("git")
    code = f"fedsim {v.get('fedsim')}" + (f" (git {git['revision'][:7]}{', dirty' if git['dirty'] else ''})" if git else "")
    libraries = " · ".join(f"{name} {v.get(name)}" for name in PACKAGES[1:] if v.get(name))
    threads = "/".join(str(t) for t in record.get("torch_threads", []))
    devices = ", ".join(record.get("devices", []))
    return f"{code} · python {v.get('python')} · {libraries} · {devices}, {threads} torch thread(s) a worker · seed {record.get('seed')}"
