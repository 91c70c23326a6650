"""fedsim as a Ray job: ``fedsim submit``, ``fedsim status``, ``fedsim logs`` (the Ray Jobs API).

``submit`` resolves and validates the config here, on the user's machine, then ships it with the
project's code as the job's ``working_dir`` and the project's requirements as its ``pip`` list; on
the cluster the job runs ``python -m fedsim.cli run fedsim-job.yaml``, which connects to the cluster
through the ``RAY_ADDRESS`` the job supervisor sets. Results go to ``output_dir``, which must be
shared storage (an absolute path every node mounts, or a URI such as ``s3://bucket/run``): the job's
working directory is a temporary folder on the head node.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedsim.config import Config, config_to_yaml
from fedsim.errors import UsageError
from fedsim.storage import is_uri

JOB_CONFIG = "fedsim-job.yaml"
PACKAGES = ("fedsim", "workloads", "analysis", "cluster")  # the project's top-level packages, shipped as the working_dir
PIP_EXTRAS = ("demo",)  # the embedded default's model and corpus, so that `fedsim submit` alone runs the demo
LOCK_FILE = "constraints.txt"  # the project's lock (`bash .ci/lock` refreshes it), beside the packages in a checkout
CLUSTER_OWN = ("ray", "torch")  # left as the cluster installed them: a job runs the cluster's Ray, and its nodes' torch build
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120  # how long a just-started cluster may take to accept jobs


def job_client(address: str | None):
    """Ray's ``JobSubmissionClient`` for ``address`` (else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``), or a one-line error."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("--address: give the Ray dashboard's address, e.g. --address http://HEAD:8265 (or set RAY_ADDRESS)")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"--address: cannot reach the Ray Jobs API at {address} ({_first_line(error)}); "
                         "is the cluster up, and is this its dashboard address (port 8265)?") from None


def project_requirements(extras: tuple[str, ...] = PIP_EXTRAS, lock: Path | None = None) -> list[str]:
    """What the cluster's nodes need, as pip lines: fedsim's requirements (and those of ``extras``) and everything they
    require in turn, each pinned to the version of the project's lock (``constraints.txt``), so that the job runs the
    versions the test suite ran. Two stay as the cluster has them, unpinned: ``ray`` (a job must run the cluster's Ray)
    and ``torch`` (the nodes' own accelerator build), and so does what only they need."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = importlib.metadata.requires("fedsim") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("--pip project: fedsim is not installed as a package here, so its requirements are unknown; "
                         "install it (pip install -e .) or pass --pip none") from None
    pins = locked_versions(lock)
    direct = [Requirement(line) for line in requires]
    direct = [r for r in direct if r.marker is None or any(r.marker.evaluate({"extra": extra}) for extra in extras)]
    lines, seen = [], set()
    pending = [r for r in direct if canonicalize_name(r.name) not in CLUSTER_OWN]
    while pending:
        requirement = pending.pop(0)
        name = canonicalize_name(requirement.name)
        if name in seen or name in CLUSTER_OWN:
            continue
        seen.add(name)
        extras_part = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        lines.append(f"{requirement.name}{extras_part}=={pins[name]}" if name in pins else str(requirement).split(";")[0].strip())
        try:
            needs = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in needs:
            need = Requirement(line)
            if need.marker is None or need.marker.evaluate({"extra": ""}):
                pending.append(need)
    return lines + [str(r).split(";")[0].strip() for r in direct if canonicalize_name(r.name) in CLUSTER_OWN]


def locked_versions(lock: Path | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of the project's lock (``constraints.txt`` beside the packages), or a one-line error."""
    from packaging.utils import canonicalize_name

    from fedsim.provenance import code_root

    lock = lock or code_root() / LOCK_FILE
    if not lock.is_file():
        raise UsageError(f"--pip project: no lock at {lock} (fedsim is installed as a package, not run from its checkout); "
                         "pass --pip FILE with your own pinned requirements, or --pip none")
    pins = {}
    for line in lock.read_text().splitlines():
        name, equals, version = line.split("#")[0].strip().partition("==")
        if equals:
            pins[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    return pins


def stage_working_dir(config: Config, destination: Path) -> Path:
    """A folder with the project's packages and the resolved config: the job's ``working_dir``."""
    from fedsim.provenance import REVISION_FILE, code_root, git_revision

    root = code_root()
    for package in PACKAGES:
        source = root / package
        if source.is_dir():
            shutil.copytree(source, destination / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    revision = git_revision(root)
    if revision:  # the job's copy has no .git: its runs record the revision submitted
        (destination / REVISION_FILE).write_text(json.dumps(revision))
    (destination / JOB_CONFIG).write_text("# resolved by fedsim submit\n" + config_to_yaml(config), encoding="utf-8")
    return destination


def check_shared_output(config: Config) -> None:
    """A job writes where every node and the user can read: an absolute path on shared storage, or a URI."""
    if not is_uri(config.output_dir) and not os.path.isabs(config.output_dir):
        raise UsageError(f"output_dir: {config.output_dir!r} is relative, and a submitted job runs in a temporary folder on "
                         "the cluster; give an absolute path on storage every node mounts, or a URI such as s3://bucket/run")


def runtime_env(working_dir: Path, pip: str) -> dict:
    """The job's runtime_env: the staged working_dir, and the pip requirements (``project``, ``none`` or a requirements file)."""
    env: dict = {"working_dir": str(working_dir)}
    if pip == "project":
        env["pip"] = project_requirements()
    elif pip != "none":
        if not os.path.isfile(pip):
            raise UsageError(f"--pip: {pip!r} is neither 'project', 'none' nor a requirements file")
        env["pip"] = [line.strip() for line in Path(pip).read_text().splitlines() if line.strip() and not line.startswith("#")]
    return env


def submit(config: Config, address: str | None, *, methods: list[str] | None = None, pip: str = "project",
           overwrite: bool = False, submission_id: str | None = None, entrypoint_num_cpus: float | None = None) -> tuple[object, str]:
    """Submit ``config`` as a Ray job; return (the client, the job id)."""
    check_shared_output(config)
    client = job_client(address)
    entrypoint = (f"python -m fedsim.cli run {JOB_CONFIG}" + (f" --methods {','.join(methods)}" if methods else "")
                  + (" --overwrite" if overwrite else ""))
    with tempfile.TemporaryDirectory(prefix="fedsim-job-") as staging:
        env = runtime_env(stage_working_dir(config, Path(staging)), pip)
        metadata = {"fedsim.method": ",".join(methods) if methods else config.method.name, "fedsim.output_dir": config.output_dir}
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                                           entrypoint_num_cpus=entrypoint_num_cpus, metadata=metadata)
                return client, job_id
            except (RuntimeError, ValueError, ConnectionError) as error:
                # a cluster that has just started takes a few seconds to register the agent that runs jobs
                if "No available agent" in str(error) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise UsageError(f"submit: the cluster refused the job ({_first_line(error)})") from None


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        raise UsageError(f"JOB: no job {job_id!r} on this cluster ({_first_line(error)}); list them with `ray job list`") from None


def exit_status(info) -> int:
    """The job's exit status: its driver's exit code where Ray knows it, else 0 for SUCCEEDED and 1 otherwise."""
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    return 0 if status_name(info) == "SUCCEEDED" else 1


def status_name(info) -> str:
    return getattr(info.status, "value", str(info.status))


def follow(client, job_id: str, out=None) -> int:
    """Stream the job's logs until it ends; return its exit status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    info = job_info(client, job_id)
    while status_name(info) not in ENDED:  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        info = job_info(client, job_id)
    return exit_status(info)


def describe(info) -> str:
    """A few lines for ``fedsim status``."""
    import datetime

    def when(ms):
        return datetime.datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds") if ms else "—"

    lines = [f"job:        {info.submission_id or info.job_id}", f"status:     {status_name(info)}",
             f"entrypoint: {info.entrypoint}", f"started:    {when(info.start_time)}", f"ended:      {when(info.end_time)}"]
    if getattr(info, "driver_exit_code", None) is not None:
        lines.append(f"exit code:  {info.driver_exit_code}")
    if info.metadata:
        lines += [f"{key}: {value}" for key, value in sorted(info.metadata.items()) if key.startswith("fedsim.")]
    if info.message:
        lines.append(f"message:    {_first_line(info.message)}")
    return "\n".join(lines)


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
