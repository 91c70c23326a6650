"""Bad input: one line naming the field and what is valid, exit code 2, nothing already written lost."""

import subprocess
import sys

import pytest

from fedsim.cli import main
from fedsim.errors import UsageError

pytestmark = pytest.mark.slow  # runs subprocesses


def fedsim(*args):
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True, text=True, timeout=300)


def run_args(tmp_path, model_dir, *extra):
    return ["run", "method.name=fed-sb", f"output_dir={tmp_path / 'out'}", f"model.name={model_dir}",
            "workload.train_limit=100", "workload.eval_limit=20", "clients.count=10", "clients.per_round=2", *extra]


@pytest.mark.parametrize("override,field", [
    ("clients.count=500", "clients.count"),          # more clients than examples
    ("clients.alpha=0", "clients.alpha"),
    ("method.rank=0", "method.rank"),
    ("method.name=fedx", "method.name"),
    ("train.round=3", "train.round"),                # unknown key
    ("workload.name=sst3", "workload.name"),
    ("workload.name=sst2", "workload.path"),         # sst2 needs a path
    ("model.name=/no/such/model", "model.name"),
    ("model.target_modules=[q_proj]", "model.target_modules"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_model_dir, override, field):
    result = fedsim(*run_args(tmp_path, tiny_model_dir, override))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ") and field in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_output_dir_is_never_overwritten_without_flag(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    result = fedsim(*run_args(tmp_path, tiny_model_dir))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "config.yaml").read_text() == "precious: true\n"


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    assert main(["run", "--resume", str(tmp_path / "run")]) == 2


def test_more_gpus_than_the_cluster_has(ray_local, tiny_model_dir, tmp_path):
    from fedsim.config import load_config
    from fedsim.runtime import run

    config = load_config(None, run_args(tmp_path, tiny_model_dir, "runtime.gpus_per_worker=1")[1:])
    with pytest.raises(UsageError, match="runtime.gpus_per_worker"):
        run(config, progress=False)


def test_an_aggregator_gpu_the_drivers_node_lacks(ray_local, tiny_model_dir, tmp_path):
    from fedsim.config import load_config
    from fedsim.runtime import run

    if ray_local.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this node has a GPU: the aggregator would get it")
    config = load_config(None, run_args(tmp_path, tiny_model_dir, "runtime.aggregator_gpus=1")[1:])
    with pytest.raises(UsageError, match="runtime.aggregator_gpus"):
        run(config, progress=False)
