"""What every bench script shares: machine info, a fresh local Ray, fedsim configs, a memory sampler, JSON out.

Each script (``python bench/<name>.py [--quick]``) writes ``bench/results/<name>.json`` and prints a table.
Runs go to a temporary folder; only the JSON is kept.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

RESULTS = Path(os.environ.get("FEDSIM_BENCH_RESULTS", ROOT / "bench" / "results"))
SST2 = ROOT.parent / "shared" / "data" / "sst2"
SCRATCH = Path(os.environ.get("FEDSIM_BENCH_SCRATCH", Path(tempfile.gettempdir()) / "fedsim-bench"))


# -- machine ---------------------------------------------------------------------------------
def machine_info() -> dict:
    """Where a number was taken. Ray and psutil are optional (bench/gpu.py runs where only torch, transformers and
    peft are installed)."""
    import torch
    import transformers

    try:
        import ray
    except ImportError:
        ray = None

    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    gpu = None
    if torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__ if ray is not None else None,
        "transformers": transformers.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_revision(),
    }


def git_revision() -> str:
    """HEAD, and '+dirty' where the working tree differs from it (the bench measures the working tree)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fedsim", "workloads"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """A plain fixed-width table (also valid Markdown)."""

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [f"| {' | '.join(c.ljust(w) for c, w in zip(columns, widths))} |",
             f"|{'|'.join('-' * (w + 2) for w in widths)}|"]
    lines += [f"| {' | '.join(v.rjust(w) for v, w in zip(r, widths))} |" for r in cells]
    text = (f"\n{title}\n" if title else "\n") + "\n".join(lines)
    print(text)
    return text


# -- models and data ---------------------------------------------------------------------------
def tiny_model_dir() -> str:
    """tests/tiny_models.py's small BERT (hidden 64, 2 layers, MiniLM's tokenizer), written once."""
    path = SCRATCH / "tiny-bert"
    if not (path / "config.json").exists():
        from tiny_models import tiny_bert_with_tokenizer

        path.mkdir(parents=True, exist_ok=True)
        tiny_bert_with_tokenizer(path)
    return str(path)


def model_dir(name: str) -> str:
    return tiny_model_dir() if name == "tiny-bert" else name


def sst2_available() -> bool:
    return SST2.exists() and any(SST2.iterdir())


# -- Ray -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_ray(num_cpus: int | None = None):
    """A fresh local Ray for one measurement (so no idle worker of an earlier run is counted), on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="error", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}})
    try:
        yield ray
    finally:
        ray.shutdown()
        time.sleep(1.0)  # let the raylet's children exit before the next measurement


def fedsim_config(output_dir: str, model: str = "tiny-bert", **overrides):
    """A config for the bench: Fed-SB on bbc-news, iid, eval only after the last round, 2 workers × 1 CPU."""
    from fedsim.config import load_config

    base = {
        "output_dir": output_dir, "model.name": model_dir(model), "workload.name": "bbc-news",
        "workload.train_limit": "null", "workload.eval_limit": 64, "workload.max_length": 64,
        "clients.count": 100, "clients.per_round": 100, "clients.partition": "iid",
        "train.rounds": 3, "train.local_steps": 5, "train.batch_size": 16,
        "runtime.workers": 2, "runtime.cpus_per_worker": 1, "eval.every": 1000,
        "adapters.init_samples": 64, "method.rank": 8, "method.name": "fed-sb",
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def bytes_config(output_dir: str, method: str, count: int):
    """The bytes measurement's run: ``count`` clients all sampled, 2 rounds × 1 local step, rank 8 (the bytes do not
    depend on training); real SST-2 where it is, else bbc-news; fra-then-ffa switches at round 1."""
    data = ({"workload.name": "sst2", "workload.path": str(SST2), "workload.train_limit": max(2000, 2 * count)}
            if sst2_available() else {"workload.name": "bbc-news", "workload.train_limit": "null"})
    return fedsim_config(output_dir, **{
        "method.name": method, "clients.count": count, "clients.per_round": count, "train.rounds": 2,
        "train.local_steps": 1, "train.batch_size": 2, "workload.eval_limit": 16, "method.switch_round": 1,
        "method.rank": 8, **data})


def read_run(output_dir) -> tuple[list[dict], list[dict], dict]:
    import pyarrow.parquet as pq

    out = Path(output_dir)
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    summary = json.loads((out / "summary.json").read_text())
    return rounds, clients, summary


# -- memory ------------------------------------------------------------------------------------------
class BackgroundSampler:
    """Calls ``sample()`` every ``interval`` s in a background thread while used as a context manager (and once at exit)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


class MemorySampler(BackgroundSampler):
    """Every ``interval`` s in a background thread: the RSS (and PSS) of every Ray process this process started.

    Ray's processes are the descendants of this (driver) process whose command line mentions ray, raylet,
    gcs_server or a worker (``ray::…``, ``default_worker.py``); only descendants, so a Ray that another
    user runs on the same machine is not counted. The driver's own RSS is recorded apart.
    """

    KEYS = ("ray", "raylet", "gcs_server", "default_worker", "ClientWorker", "Aggregator")

    def __init__(self, interval: float = 0.2, include_self: bool = False, pss: bool = True):
        import psutil

        super().__init__(interval)
        self.psutil = psutil
        self.include_self = include_self
        self.pss = pss
        self.me = psutil.Process()
        self.peak_rss = self.peak_pss = self.peak_driver_rss = self.peak_total_rss = 0
        self.peak_processes: list[dict] = []
        self.samples = 0
        self.load_sum = 0.0

    def _is_ray(self, proc) -> bool:
        try:
            text = " ".join(proc.cmdline()) + " " + proc.name()
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
            return False
        return any(key in text for key in self.KEYS)

    def sample(self) -> None:
        psutil = self.psutil
        rss = pss = 0
        procs = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = self.me.children(recursive=True)
        for proc in children:
            if not self._is_ray(proc):
                continue
            try:
                if self.pss:
                    info = proc.memory_full_info()
                    proc_rss, proc_pss = info.rss, info.pss
                else:
                    proc_rss = proc_pss = proc.memory_info().rss
                name = (proc.cmdline() or [proc.name()])[0]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += proc_rss
            pss += proc_pss
            procs.append({"pid": proc.pid, "name": name[:60], "rss_mib": round(proc_rss / 2**20, 1)})
        driver = self.me.memory_info().rss
        self.samples += 1
        self.load_sum += os.getloadavg()[0]
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_processes = sorted(procs, key=lambda p: -p["rss_mib"])
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_driver_rss = max(self.peak_driver_rss, driver)
        self.peak_total_rss = max(self.peak_total_rss, rss + driver)

    def result(self) -> dict:
        mib = 2**20
        return {
            "peak_ray_rss_mib": round(self.peak_rss / mib, 1),
            "peak_ray_pss_mib": round(self.peak_pss / mib, 1),
            "peak_driver_rss_mib": round(self.peak_driver_rss / mib, 1),
            "peak_ray_plus_driver_rss_mib": round(self.peak_total_rss / mib, 1),
            "ray_processes_at_peak": self.peak_processes,
            "samples": self.samples,
            # other jobs on the machine slow training down: the mean 1-minute load average during the run
            "mean_load_average": round(self.load_sum / max(1, self.samples), 2),
        }


def peak_rss_of_self() -> float:
    """Peak RSS of this process so far (MiB), from the kernel's high-water mark."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady(rows: list[dict], skip_first: int = 1, skip_last: int = 0) -> list[dict]:
    """The rounds used for timing: round 0 is warm-up; the last round also evaluates when asked to skip it."""
    end = len(rows) - skip_last if skip_last else len(rows)
    chosen = rows[skip_first:end]
    return chosen or rows[-1:]


# -- an instrumented fedsim run ------------------------------------------------------------------------
class DriverTimer:
    """Times, from outside fedsim, where the driver's round goes: it wraps ``Experiment`` methods and ``ray.get``/``ray.wait``.

    Nothing in fedsim is changed; the wrappers are installed on the classes and the ``ray`` module of this
    process for the duration of a ``with`` block. A ``ray.get``/``ray.wait`` called from ``Experiment.run_round``
    is labelled by the source line that called it (downlink accounting, waiting for the workers, aggregation,
    checkpoint); ``Experiment.evaluate`` and ``Experiment.write_tables`` are timed as a whole.
    """

    # (a name used on the calling line, label); the names come from the running bytecode, not the source file,
    # so an edit of driver.py after it was imported cannot shift the labels
    LINE_LABELS = (("downlink_bytes", "downlink_s"), ("aggregate", "aggregate_s"), ("checkpoint", "checkpoint_s"),
                   ("rows_ref", "wait_workers_s"), ("wait", "wait_workers_s"))
    PHASES = ("prepare", "start_actors", "initial_state", "finish", "stop_actors")

    def __init__(self):
        self.rounds: dict[int, dict] = {}
        self.phases: dict[str, float] = {}
        self.current: int | None = None
        self._saved: list[tuple] = []

    def _add(self, label: str, seconds: float) -> None:
        if self.current is not None:
            entry = self.rounds[self.current]
            entry[label] = entry.get(label, 0.0) + seconds

    @staticmethod
    def _names_by_line(code) -> dict[int, set[str]]:
        import dis

        names: dict[int, set[str]] = {}
        for ins in dis.get_instructions(code):
            line = ins.positions.lineno if ins.positions else None
            if line is not None and isinstance(ins.argval, str):
                names.setdefault(line, set()).add(ins.argval)
        return names

    def __enter__(self):
        import ray

        from fedsim.runtime import driver

        timer = self
        experiment = driver.Experiment

        def patch(owner, name, new):
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)

        original_run_round = experiment.run_round

        def run_round(exp, round_idx, bar):
            timer.current = round_idx
            timer.rounds[round_idx] = {"start_unix": time.time()}
            start = time.perf_counter()
            try:
                return original_run_round(exp, round_idx, bar)
            finally:
                timer.rounds[round_idx]["run_round_s"] = time.perf_counter() - start
                timer.rounds[round_idx]["end_unix"] = time.time()
                timer.current = None

        patch(experiment, "run_round", run_round)

        for name, label in (("evaluate", "eval_s"), ("sample", "sample_s")):
            original = getattr(experiment, name)

            def timed(exp, *args, _original=original, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(exp, *args, **kwargs)
                finally:
                    timer._add(_label, time.perf_counter() - start)

            patch(experiment, name, timed)

        for name in self.PHASES:
            original = getattr(experiment, name)

            def phase(exp, *args, _original=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(exp, *args, **kwargs)
                finally:
                    timer.phases[_name] = timer.phases.get(_name, 0.0) + time.perf_counter() - start

            patch(experiment, name, phase)

        names_cache: dict = {}
        for name in ("get", "wait"):
            original = getattr(ray, name)

            def traced(*args, _original=original, **kwargs):
                frame = sys._getframe(1)
                if timer.current is None or frame.f_code.co_name != "run_round":
                    return _original(*args, **kwargs)
                code = frame.f_code
                if code not in names_cache:
                    names_cache[code] = timer._names_by_line(code)
                line_names = names_cache[code].get(frame.f_lineno, set())
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    label = next((lab for key, lab in timer.LINE_LABELS if key in line_names), "other_ray_s")
                    timer._add(label, time.perf_counter() - start)

            patch(ray, name, traced)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def actor_spans(round_windows: dict[int, dict]) -> dict[int, dict]:
    """Actor-side execution time of each round's calls, from ``ray.timeline()`` (Ray's task events)."""
    import ray

    events = [e for e in ray.timeline() if e.get("ph") == "X" and str(e.get("cat", "")).startswith("task::")]
    spans: dict[int, dict] = {}
    for round_idx, window in round_windows.items():
        lo, hi = window["start_unix"] * 1e6, window["end_unix"] * 1e6
        inside = [e for e in events if lo <= e["ts"] <= hi]
        cohorts = {e["tid"]: e["dur"] / 1e6 for e in inside if e["name"] == "run_cohort"}
        spans[round_idx] = {
            "run_cohort_s_per_worker": sorted(cohorts.values()),
            **{f"actor_{name}_s": sum(e["dur"] for e in inside if e["name"] == name) / 1e6
               for name in ("downlink_bytes", "get_state", "aggregate", "checkpoint", "evaluate")},
        }
    return spans


def instrumented_run(config, memory: bool = True, timeline: bool = True) -> dict:
    """Run one fedsim experiment on a fresh local Ray; return its rows, timings, actor spans and peak memory."""
    import shutil

    from fedsim.runtime import run

    shutil.rmtree(config.output_dir, ignore_errors=True)
    sampler = MemorySampler() if memory else contextlib.nullcontext()
    start = time.perf_counter()
    with local_ray(max(os.cpu_count() or 1, config.runtime.workers)):
        with sampler, DriverTimer() as timer:
            run(config, progress=False)
        total_s = time.perf_counter() - start
        spans = actor_spans(timer.rounds) if timeline else {}
    rounds, clients, summary = read_run(config.output_dir)
    for row in rounds:
        k = row["round"]
        ok = [c for c in clients if c["round"] == k and c["status"] == "ok"]
        row["train_s_sum"] = sum(c["train_s"] for c in ok)
        row["clients_trained"] = len(ok)
        row.update({key: value for key, value in timer.rounds.get(k, {}).items() if not key.endswith("_unix")})
        row.update(spans.get(k, {}))
        per_worker = {}
        for c in ok:
            per_worker[c["worker_id"]] = per_worker.get(c["worker_id"], 0.0) + c["train_s"]
        row["train_s_per_worker"] = [per_worker[w] for w in sorted(per_worker)]
    result = {"total_s": total_s, "phases_s": timer.phases, "rounds": rounds, "clients": clients, "summary": summary}
    if memory:
        result["memory"] = sampler.result()
    return result


def round_metrics(row: dict, workers: int) -> dict:
    """Efficiency and per-client overhead of one round, with the round's breakdown (seconds)."""
    wall, train, clients = row["wall_s"], row["train_s_sum"], max(1, row["clients_trained"])
    eval_s = row.get("eval_s", 0.0)
    known = sum(row.get(k, 0.0) for k in ("downlink_s", "wait_workers_s", "aggregate_s", "checkpoint_s", "eval_s", "parquet_s", "sample_s", "other_ray_s"))
    cohorts = row.get("run_cohort_s_per_worker") or []
    out = {
        "round": row["round"], "clients": row["clients_trained"], "wall_s": wall, "train_s_sum": train,
        "efficiency": train / (wall * workers),
        "efficiency_excl_eval": train / ((wall - eval_s) * workers),
        "overhead_ms_per_client": (wall * workers - train) / clients * 1e3,
        "overhead_ms_per_client_excl_eval": ((wall - eval_s) * workers - train) / clients * 1e3,
        "breakdown_s": {
            "downlink_accounting": row.get("downlink_s", 0.0),
            "dispatch_and_training (ray.wait + get rows)": row.get("wait_workers_s", 0.0),
            "aggregation": row.get("aggregate_s", 0.0),
            "eval": eval_s,
            "checkpoint": row.get("checkpoint_s", 0.0),
            "parquet_writes": row.get("parquet_s", 0.0),
            "sampling": row.get("sample_s", 0.0),
            "rest_of_run_round": wall - known,
        },
    }
    if cohorts:
        per_worker_train = row.get("train_s_per_worker") or []
        worker_side = sum(cohorts) - sum(per_worker_train)
        out["worker_side"] = {
            "run_cohort_s_per_worker": cohorts,
            "train_s_per_worker": per_worker_train,
            # inside run_cohort but outside train_local: load_state, trainable_parameters, upload, isfinite, batch setup
            "outside_train_local_ms_per_client": worker_side / clients * 1e3,
            # the driver waits longer than the slowest worker computes: Ray scheduling, argument and result transfer
            "driver_wait_minus_slowest_cohort_s": row.get("wait_workers_s", 0.0) - max(cohorts),
            # the fastest worker idles until the slowest finishes (load imbalance)
            "imbalance_idle_s": max(cohorts) - min(cohorts),
            "actor_aggregate_s": row.get("actor_aggregate_s"),
            "actor_checkpoint_s": row.get("actor_checkpoint_s"),
            "actor_downlink_bytes_s": row.get("actor_downlink_bytes_s"),
        }
    return out
