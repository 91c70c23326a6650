"""The `fedsim` CLI shell: parsing, config resolution, error handling. The runtime is faked: no Ray."""

import re
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fedsim.cli import COMMANDS, main
from fedsim.config import Config, load_config, save_config
from fedsim.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def write_fake_run(config):
    """What a finished run leaves that the closing table reads: config.yaml and a one-round rounds.parquet."""
    folder = Path(config.output_dir)
    save_config(config, folder / "config.yaml")
    pq.write_table(pa.table({"round": [0], "bytes_up": [10], "bytes_down": [20], "agg_error": [0.0], "eval_metric": [0.5],
                             "wall_s": [1.0]}), folder / "rounds.parquet")


@pytest.fixture
def fake_runtime(monkeypatch, tmp_path):
    """Replace fedsim.runtime with a recorder; `calls` holds (name, args, kwargs). Runs happen in tmp_path."""
    monkeypatch.chdir(tmp_path)  # the default output_dir, results/default, is relative
    calls = []
    module = types.ModuleType("fedsim.runtime")
    module.behaviour = None  # an exception to raise from run/run_comparison

    def run(config, resume=None, overwrite=False, **kwargs):
        calls.append(("run", (config,), {"resume": resume, "overwrite": overwrite, **kwargs}))
        if module.behaviour is not None:
            raise module.behaviour
        write_fake_run(config)

    def run_comparison(configs, output_dir, **kwargs):
        calls.append(("run_comparison", (configs, output_dir), kwargs))
        if module.behaviour is not None:
            raise module.behaviour
        for config in configs:
            write_fake_run(config)

    module.run, module.run_comparison, module.calls = run, run_comparison, calls
    monkeypatch.setitem(sys.modules, "fedsim.runtime", module)
    return module


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedsim: error: ")
    assert "Traceback" not in err
    return lines[0]


# --- fedsim config ----------------------------------------------------------------------------


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "train.rounds=3", "method.rank=8"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert data["train"]["rounds"] == 3 and data["method"]["rank"] == 8
    assert Config.from_dict(data) == load_config(None, ["train.rounds=3", "method.rank=8"])


def test_config_with_file_and_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("clients:\n  count: 40\n")
    assert main(["config", str(path), "clients.per_round=30"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["clients"]["count"] == 40 and data["clients"]["per_round"] == 30


def test_config_error_is_one_line(capsys):
    assert main(["config", "train.round=3"]) == 2
    assert "did you mean 'train.rounds'" in one_error_line(capsys)


def test_two_config_files_is_an_error(tmp_path, capsys):
    assert main(["config", "a.yaml", "b.yaml"]) == 2
    assert "expected key=value, got 'b.yaml'" in one_error_line(capsys)


# --- fedsim run: errors before the runtime ----------------------------------------------------


def test_run_invalid_override_returns_2(capsys):
    assert main(["run", "train.rounds=0"]) == 2
    assert "train.rounds" in one_error_line(capsys)


def test_run_missing_file_returns_2(capsys):
    assert main(["run", "missing.yaml"]) == 2
    assert "missing.yaml" in one_error_line(capsys)


def test_run_without_equals_hints_at_overrides(capsys):
    assert main(["run", "rounds"]) == 2
    assert "key=value" in one_error_line(capsys)


def test_usage_mistakes_are_one_line(capsys):
    assert main([]) == 2
    assert "missing command" in one_error_line(capsys)
    assert main(["nope"]) == 2
    one_error_line(capsys)
    assert main(["run", "--bogus"]) == 2
    one_error_line(capsys)
    assert main(["run", "--train.rounds=3"]) == 2
    assert "without dashes: train.rounds=3" in one_error_line(capsys)
    assert main(["run", "--methods"]) == 2
    one_error_line(capsys)


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "config" in out
    for name in COMMANDS:
        assert main([name, "--help"]) == 0
        assert "usage: fedsim " + name in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "fedsim" in capsys.readouterr().out


# --- fedsim run: what reaches the runtime -----------------------------------------------------


def test_run_with_config_calls_run(tmp_path, fake_runtime, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nmethod:\n  name: ffa-lora\n")
    assert main(["run", str(path), "--overwrite", "train.rounds=2"]) == 0
    [(name, args, kwargs)] = fake_runtime.calls
    assert name == "run"
    assert args[0].method.name == "ffa-lora" and args[0].train.rounds == 2
    assert kwargs == {"resume": None, "overwrite": True}
    out = capsys.readouterr().out
    assert "ffa-lora" in out and "0.5000" in out  # the closing table, from the run's rounds.parquet
    assert f"plot:    {tmp_path / 'out' / 'plot.png'}" in out


def test_run_default_compares_fed_sb_and_fedit_at_equal_bytes(tmp_path, fake_runtime, capsys):
    assert main(["run", f"output_dir={tmp_path}", "train.rounds=1"]) == 0
    [(name, (configs, output_dir), kwargs)] = fake_runtime.calls
    assert name == "run_comparison"
    assert [c.method.name for c in configs] == ["fed-sb", "fed-sb", "fedit"]
    assert [c.output_dir for c in configs] == [str(tmp_path / "fed-sb"), str(tmp_path / "fed-sb-init_atclient"), str(tmp_path / "fedit")]
    assert all(c.train.rounds == 1 for c in configs)
    # Fed-SB's two protocols: B and A downloaded (init_at=server) or built by each client from the public sample
    assert [(c.adapters.init_data, c.adapters.init_at) for c in configs[:2]] == [("public", "server"), ("public", "client")]
    # Equal numbers per adapted layer each round: Fed-SB's r² against FedIT's r(d+k), MiniLM's d = k = 384.
    fed_sb, _, fedit = configs
    assert fed_sb.method.rank == 55 and fedit.method.rank == 4
    assert abs(fed_sb.method.rank ** 2 - fedit.method.rank * (384 + 384)) / (fedit.method.rank * 768) < 0.02
    assert output_dir == str(tmp_path)
    assert kwargs == {}
    out = capsys.readouterr().out
    assert f"results: {tmp_path}" in out and f"plot:    {tmp_path / 'comparison.png'}" in out
    assert f"fedsim report {tmp_path}" in out


def test_run_methods_with_their_own_settings(tmp_path, fake_runtime):
    assert main(["run", f"output_dir={tmp_path}", "method.rank=8", "--methods",
                 "fed-sb:rank=64:train.lr=0.02, fedit, fed-sb:rank=16"]) == 0
    [(_, (configs, _), _)] = fake_runtime.calls
    assert [(c.method.name, c.method.rank, c.train.lr) for c in configs] == [
        ("fed-sb", 64, 0.02), ("fedit", 8, configs[1].train.lr), ("fed-sb", 16, configs[1].train.lr)]
    # The method's name is the folder, with its settings where the name occurs twice.
    assert [Path(c.output_dir).name for c in configs] == ["fed-sb-rank64-lr0.02", "fedit", "fed-sb-rank16"]


@pytest.mark.parametrize("spec, message", [
    ("fed-sb:rank", "a method's settings are key=value after a colon"),
    ("fed-sb:rank=0", "method.rank: must be a positive integer, got 0"),
    ("fed-sb:ranc=4", "method.ranc"),
    ("fed-sb:name=fedit", "name cannot be set per method"),
    ("fedx:rank=4", "unknown method 'fedx'"),
    ("fed-sb:rank=4,fed-sb:rank=4", "'fed-sb:rank=4' is listed twice"),
])
def test_run_methods_settings_errors(spec, message, fake_runtime, capsys):
    assert main(["run", "--methods", spec]) == 2
    assert message in one_error_line(capsys)
    assert fake_runtime.calls == []


def test_run_quiet_prints_nothing_and_hides_progress(tmp_path, fake_runtime, capsys):
    assert main(["run", f"output_dir={tmp_path / 'q'}", "--quiet"]) == 0
    [(_, _, kwargs)] = fake_runtime.calls
    assert kwargs == {"progress": False}
    assert main(["run", f"output_dir={tmp_path / 'one'}", "method.name=fedit", "-q"]) == 0
    assert fake_runtime.calls[1][2] == {"resume": None, "overwrite": False, "progress": False}
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_run_default_with_method_override_is_a_single_run(fake_runtime):
    assert main(["run", "method.name=flora"]) == 0
    [(name, (config,), _)] = fake_runtime.calls
    assert name == "run" and config.method.name == "flora"


def test_run_methods_flag(tmp_path, fake_runtime):
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path / 'cmp'}\n")
    assert main(["run", str(path), "--methods", "fed-sb, ffa-lora,fra-lora", "--overwrite"]) == 0
    [(name, (configs, output_dir), kwargs)] = fake_runtime.calls
    assert name == "run_comparison"
    assert [c.method.name for c in configs] == ["fed-sb", "ffa-lora", "fra-lora"]
    assert configs[1].output_dir == str(tmp_path / "cmp" / "ffa-lora")
    assert kwargs == {"overwrite": True}


def test_run_methods_flag_errors(fake_runtime, capsys):
    assert main(["run", "--methods", "fed-sb,fedx"]) == 2
    assert "fedx" in one_error_line(capsys)
    assert main(["run", "--methods", "fed-sb,fed-sb"]) == 2
    one_error_line(capsys)
    assert main(["run", "--methods", "fed-sb", "method.name=fedit"]) == 2
    one_error_line(capsys)
    assert fake_runtime.calls == []


def test_resume_reads_config_from_dir(tmp_path, fake_runtime):
    run_dir = tmp_path / "run"
    save_config(load_config(None, ["method.name=fedit", "train.rounds=3", "output_dir=elsewhere"]), run_dir / "config.yaml")
    assert main(["run", "--resume", str(run_dir), "train.rounds=10"]) == 0
    [(name, (config,), kwargs)] = fake_runtime.calls
    assert name == "run"
    assert config.method.name == "fedit" and config.train.rounds == 10
    assert config.output_dir == str(run_dir)
    assert kwargs == {"resume": str(run_dir), "overwrite": False}


def test_resume_errors(tmp_path, fake_runtime, capsys):
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    one_error_line(capsys)
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "config.yaml" in one_error_line(capsys)
    save_config(Config(), tmp_path / "config.yaml")
    assert main(["run", "--resume", str(tmp_path), "x.yaml"]) == 2
    one_error_line(capsys)
    assert main(["run", "--resume", str(tmp_path), "output_dir=other"]) == 2
    one_error_line(capsys)
    assert fake_runtime.calls == []


def test_usage_error_from_the_runtime_is_one_line(fake_runtime, capsys):
    fake_runtime.behaviour = UsageError("workload.name: unknown workload 'x';\nvalid: bbc-news")
    assert main(["run", "method.name=fed-sb"]) == 2
    assert one_error_line(capsys) == "fedsim: error: workload.name: unknown workload 'x'; valid: bbc-news"


def test_keyboard_interrupt_returns_130(fake_runtime, capsys):
    fake_runtime.behaviour = KeyboardInterrupt()
    assert main(["run", "method.name=fed-sb"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_bugs_propagate(fake_runtime):
    fake_runtime.behaviour = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["run", "method.name=fed-sb"])


# --- as a process -----------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess
def test_module_entry_point_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "config", "method.rank=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["fedsim: error: method.rank: must be a positive integer, got 0"]
    assert proc.stdout == ""


# --- fedsim check -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_passes_check(config, monkeypatch, capsys):
    """`fedsim check` runs what `fedsim run` checks before training; GPU configs' models and /data files are not
    on this machine: check says so in one line and still passes."""
    monkeypatch.chdir(ROOT)  # the CPU configs name ../shared/data relative to the repository
    assert main(["check", f"configs/{config}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"fedsim check: configs/{config} (") and "private-init guard" in out[0]
    assert all(line.startswith(("fedsim check: not checked on this machine: ", "fedsim check: note: ")) for line in out[1:])
    assert sum("not checked" in line for line in out) <= 1  # what it could not check: one line


def test_check_refuses_what_run_refuses(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["check", "configs/bert-base-snli-gpu.yaml", "adapters.init_data=pooled"]) == 2
    assert one_error_line(capsys).startswith("fedsim: error: privacy.init_noise_multiplier: ")
    assert main(["check", "configs/sst2-private.yaml", "privacy.delta=0.01"]) == 2  # 200 records a client: δ ≥ 1/n
    assert one_error_line(capsys).startswith("fedsim: error: privacy.delta: ")
    assert main(["check", "configs/sst2-private.yaml", "privacy.epsilon=0.01"]) == 2
    assert one_error_line(capsys).startswith("fedsim: error: privacy.epsilon: ")


def test_check_does_not_start_ray_or_write(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(ROOT)
    from fedsim.runtime import driver

    started = []  # a session's Ray may already be up: what is watched is whether check asks for one
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: started.append("ray.init"))
    monkeypatch.setattr(driver, "ray_session", lambda *args, **kwargs: started.append("ray_session"))
    out = tmp_path / "never"
    assert main(["check", "configs/sst2-private.yaml", f"output_dir={out}", "workload.train_limit=400"]) == 0
    assert "DP calibration" in capsys.readouterr().out
    assert not out.exists() and not started


def test_check_says_the_calibrated_noise_multiplier(monkeypatch, capsys):
    """The σ a run would train under: more noise for a smaller ε, and a given privacy.noise_multiplier as it is."""
    monkeypatch.chdir(ROOT)
    sigmas = []
    for setting in ("privacy.epsilon=1", "privacy.epsilon=3", "privacy.noise_multiplier=0.7"):
        assert main(["check", "configs/sst2-private.yaml", "workload.train_limit=400", setting]) == 0
        sigmas.append(float(re.search(r"DP calibration \(σ = ([0-9.]+)\)", capsys.readouterr().out).group(1)))
    assert sigmas[0] > sigmas[1] > 0 and sigmas[2] == 0.7


def test_privacy_settings_without_privacy_is_exit_2(capsys):
    assert main(["config", "privacy.noise_multiplier=1.0"]) == 2
    assert one_error_line(capsys).startswith("fedsim: error: privacy.enabled: ")


# --- a real run on a local Ray: the closing table is the run's Parquet -----------------------


def closing_rows(out: str) -> dict[str, list[str]]:
    """The closing table's body rows by run name (whitespace-split cells)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run ") and "final accuracy" in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("results:", "highest", "produced by")):
            break
        rows[line.split()[0]] = line.split()
    return rows


def expected_cells(run_dir: Path) -> list[str]:
    """The cells the table must show, computed here from the run's rounds.parquet, clients.parquet and summary.json."""
    import json
    import math

    from analysis.summary import human_bytes

    rounds = pq.read_table(run_dir / "rounds.parquet").to_pylist()
    clients = sorted(pq.read_table(run_dir / "clients.parquet").to_pylist(), key=lambda r: (r["client_id"], r["round"]))
    first = {(r["client_id"], r["round"]) for i, r in enumerate(clients) if i == 0 or clients[i - 1]["client_id"] != r["client_id"]}
    ups = [r["bytes_up"] for r in clients if r["bytes_up"] > 0]
    returning = [r["bytes_down"] for r in clients if (r["client_id"], r["round"]) not in first and r["bytes_down"] > 0]
    first_down = [r["bytes_down"] for r in clients if (r["client_id"], r["round"]) in first]
    metrics = [r["eval_metric"] for r in rounds if not math.isnan(r["eval_metric"])]
    errors = [r["agg_error"] for r in rounds if not math.isnan(r["agg_error"])]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    wall_s = json.loads((run_dir / "summary.json").read_text())["wall_s"]
    return [str(config["method"]["rank"]), f"{metrics[-1]:.4f}", f"{sum(ups) / len(ups):,.0f}",
            f"{sum(returning) / len(returning):,.0f}", f"{sum(first_down) / len(first_down):,.0f}",
            *human_bytes(sum(r["bytes_up"] for r in rounds)).split(), *human_bytes(sum(r["bytes_down"] for r in rounds)).split(),
            f"{max(errors):.2e}", f"{wall_s:.1f}"]


def test_a_real_run_ends_with_its_table(ray_local, tiny_model_dir, tmp_path, capsys):
    """fedsim run --methods (each method its own rank) and --resume on a tiny BERT: the closing table's numbers are
    the ones in the run's Parquet files, and it says where the results, the plot and the report are."""
    out_dir = tmp_path / "cmp"
    settings = [f"output_dir={out_dir}", f"model.name={tiny_model_dir}", "workload.train_limit=200", "workload.eval_limit=20",
                "workload.max_length=32", "clients.count=6", "clients.per_round=3", "train.rounds=2", "train.local_steps=2",
                "train.batch_size=4", "adapters.init_samples=8", "adapters.init_batch_size=4", "runtime.workers=1"]
    assert main(["run", *settings, "--methods", "fed-sb:rank=6,fedit:rank=2"]) == 0
    out = capsys.readouterr().out
    table = closing_rows(out)
    assert list(table) == ["fed-sb", "fedit"]
    for name, rank in (("fed-sb", "6"), ("fedit", "2")):
        assert table[name][1:] == expected_cells(out_dir / name), name
        assert table[name][1] == rank
    assert f"results: {out_dir}\n" in out and f"plot:    {out_dir / 'comparison.png'}\n" in out
    assert (out_dir / "comparison.png").stat().st_size > 10_000
    assert f"report:  fedsim report {out_dir} " in out

    assert main(["run", "--resume", str(out_dir / "fedit"), "train.rounds=3"]) == 0
    out = capsys.readouterr().out
    table = closing_rows(out)
    assert list(table) == ["fedit"] and table["fedit"][1:] == expected_cells(out_dir / "fedit")
    assert pq.read_table(out_dir / "fedit" / "rounds.parquet").num_rows == 3
    assert f"plot:    {out_dir / 'fedit' / 'plot.png'}\n" in out

    assert main(["run", "--resume", str(out_dir / "fedit"), "train.rounds=4", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
