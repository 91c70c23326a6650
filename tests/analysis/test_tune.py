"""`fedsim tune` (analysis/tune.py): the search space, the checks before Ray, and, on the session's Ray, a search that
ASHA prunes, writes one Parquet table and the best config, and a stopped search that resumes without repeating a trial."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from analysis.tune import Dimension, concurrent_trials, parse_space, trial_folder, trial_resources
from fedsim.cli import main
from fedsim.config import load_config


def test_space_lists_values_and_draws_ranges():
    space = parse_space(["method.name=fed-sb,fedit", "train.lr=loguniform(1e-4,1e-1)", "method.rank=choice(4,8)",
                         "train.batch_size=uniform(8,32)"])
    assert space["method.name"] == Dimension("grid", ("fed-sb", "fedit"))
    assert space["train.lr"] == Dimension("loguniform", (1e-4, 0.1))  # YAML reads 1e-4 as text: a bound is a number
    assert space["method.rank"] == Dimension("choice", (4, 8))
    assert space["train.batch_size"].ends() == [8.0, 32.0]


@pytest.mark.parametrize("item, says", [
    ("train.lr=lognormal(1,2)", "unknown distribution 'lognormal'"),
    ("train.lr=loguniform(0,1)", "low > 0"),
    ("train.lr=uniform(0.1,0.01)", "low < high"),
    ("train.lr=uniform(a,1)", "two numbers"),
    ("seed=1,2", "--seeds"),
    ("train.lr", "expected key=v1,v2"),
])
def test_a_bad_space_is_one_line_naming_it(item, says):
    with pytest.raises(Exception) as error:
        parse_space([item])
    assert says in str(error.value) and "\n" not in str(error.value)


def test_trials_fit_the_cluster_and_name_their_folders():
    config = load_config(None, ["runtime.workers=2", "runtime.cpus_per_worker=3"])
    assert trial_resources(config) == {"CPU": 6, "GPU": 0}
    assert concurrent_trials({"CPU": 16.0}, {"CPU": 6, "GPU": 0}) == 2
    assert concurrent_trials({"CPU": 4.0}, {"CPU": 6, "GPU": 0}) == 1  # one waits for an autoscaler rather than none
    assert concurrent_trials({"CPU": 64.0, "GPU": 3.0}, {"CPU": 4, "GPU": 1}) == 3
    assert trial_folder("6f2a1_00003", {"method.name": "fedit", "train.lr": 0.0031622776}) == "00003_name-fedit_lr-0.00316"


@pytest.mark.parametrize("args, says", [
    (["--space", "train.lr=0.001,0.01"], "workload.validation: fedsim tune scores trials on rows carved out"),
    (["workload.validation=100", "--space", "method.name=fed-sb,nope"], "--space method.name=nope"),
    (["workload.validation=100", "--space", "train.lr=0.001,0.01", "--best-per", "method.name"], "--best-per: method.name"),
    (["workload.validation=100", "--space", "train.lr=0.001,0.01", "--asha", "--seeds", "0,1"], "--asha"),
    (["workload.validation=100", "--space", "train.lr=0.001,0.01", "--metric", "accuracy"], "--metric"),
    (["workload.validation=100", "--space", "train.lr=0.001,0.01", "--samples", "0"], "--samples"),
])
def test_tune_refuses_bad_input_in_one_line_before_anything_runs(tmp_path, capsys, args, says):
    assert main(["tune", f"output_dir={tmp_path}/t", *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_a_trial_folder_names_its_index_where_tune_gave_one():
    from analysis.tune import trial_index

    assert trial_index(trial_folder("run_trial_5b7b8_00003", {"train.lr": 0.01})) == 3
    assert trial_index("32e58f2a_lr-0.064") is None  # an id without Tune's index (a restarted trial): no number, no crash


def test_dry_run_counts_the_trials(tmp_path, capsys):
    assert main(["tune", f"output_dir={tmp_path}/t", "workload.validation=100", "--space", "method.name=fed-sb,fedit",
                 "train.lr=loguniform(1e-4,1e-2)", "--samples", "3", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("6 trials")


def small(tiny_model_dir, out, rounds):
    return [f"output_dir={out}", f"model.name={tiny_model_dir}", "workload.train_limit=60", "workload.validation=20",
            "workload.eval_limit=null", "clients.count=2", "clients.per_round=2", f"train.rounds={rounds}",
            "train.local_steps=1", "train.batch_size=4", "runtime.workers=1", "method.name=fedit"]


def test_asha_stops_the_poor_trial_and_the_best_config_is_written(ray_local, tiny_model_dir, tmp_path, capsys):
    """Three lrs one after another, scored by validation loss: 1e-4 and 1e-5 barely move it (1.6214 and 1.6213 after a
    round), 0.1 raises it at once (1.78), so ASHA (rungs at rounds 1 and 2 of 3, the better half goes on) stops that
    trial at its first rung. The first trial has nothing to lose to and runs all its rounds. (Whether 1e-5 goes on rests
    on a 1e-4 difference, so the test leaves it open.)"""
    out = tmp_path / "t"
    assert main(["tune", *small(tiny_model_dir, out, 3), "--space", "train.lr=0.0001,0.00001,0.1", "--asha",
                 "--metric", "eval_loss", "--concurrent", "1"]) == 0
    table = pq.read_table(out / "tune.parquet").to_pylist()
    rounds = {(row["train.lr"], row["finished"]): [] for row in table}
    for row in table:
        rounds[(row["train.lr"], row["finished"])].append(row["round"])
    assert rounds[(1e-4, True)] == [0, 1, 2] and rounds[(0.1, False)] == [0] and (0.1, True) not in rounds
    assert rounds.get((1e-5, True)) == [0, 1, 2] or rounds.get((1e-5, False)) in ([0], [0, 1])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] in (1e-5, 1e-4) and best["workload"]["validation"] is None
    assert best["output_dir"] == str(out / "best")
    assert "by validation eval_loss" in (out / "best.yaml").read_text().splitlines()[0]
    assert not live_groups(f"fedsim:{out}")  # the stopped trial's workers' placement group went with it


def live_groups(prefix: str) -> list[str]:
    from ray.util import placement_group_table

    return sorted(g["name"] for g in placement_group_table().values() if g["state"] != "REMOVED" and g["name"].startswith(prefix))


def test_a_trial_tune_is_done_with_gives_back_its_runs_placement_groups(ray_local, tmp_path):
    """Tune kills a stopped trial's actor; the placement group its run made is the job's and outlives it. The callback
    removes the groups named after the trial's folder (one run, or one a seed below it) and no other trial's."""
    from types import SimpleNamespace

    from ray.util import placement_group

    from analysis.tune import free_stopped_trials
    from fedsim.runtime.driver import group_name

    root = str(tmp_path / "t")
    values = {"train.lr": 0.01}
    mine = os.path.join(root, trial_folder("run_trial_ab12_00001", values))
    other = os.path.join(root, trial_folder("run_trial_ab12_00011", values))  # another trial of the same search
    groups = [placement_group([{"CPU": 0.01}], name=group_name(name))
              for name in (mine, os.path.join(mine, "seed-1"), other)]
    for group in groups:
        group.wait(timeout_seconds=30)
    free_stopped_trials(root).on_trial_complete(0, [], SimpleNamespace(trial_id="run_trial_ab12_00001", config=values))
    assert live_groups(f"fedsim:{root}") == [group_name(other)]
    free_stopped_trials(root).on_trial_error(0, [], SimpleNamespace(trial_id="run_trial_ab12_00011", config=values))
    assert live_groups(f"fedsim:{root}") == []


def test_a_stopped_tune_resumes_without_repeating_a_finished_run(ray_local, tiny_model_dir, tmp_path):
    """Two lrs, each at seeds 0 and 1. Ctrl-C once the first run ends (a subprocess on the session's Ray): exit 130. The
    same command again runs only the rest; each trial is scored by the mean of its seeds' last-round loss."""
    import ray

    out = tmp_path / "t"
    args = ["tune", *small(tiny_model_dir, out, 2), "--space", "train.lr=0.001,0.03", "--seeds", "0,1", "--concurrent", "1",
            "--metric", "eval_loss"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen([sys.executable, "-m", "fedsim.cli", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("00000_*/seed-0/summary.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    said = first.communicate(timeout=120)[0]
    assert first.returncode == 130, said
    assert "run the same command again to resume" in said
    ended = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("0000*/seed-*/summary.json")}
    assert "00000_lr-0.001/seed-0/summary.json" in ended and len(ended) < 4

    assert main(args) == 0
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in ended.items())  # read back, not run again
    table = pq.read_table(out / "tune.parquet").to_pylist()
    assert len(table) == 8 and {(r["point"], r["seed"]) for r in table} == {
        (p, s) for p in ("00000_lr-0.001", "00001_lr-0.03") for s in (0, 1)} and all(r["finished"] for r in table)
    means = {p: sum(r["eval_loss"] for r in table if r["point"] == p and r["round"] == 1) / 2 for p in ("00000_lr-0.001", "00001_lr-0.03")}
    best = min(means, key=means.get)
    header = (out / "best.yaml").read_text().splitlines()[0]
    assert f"eval_loss {means[best]:.4f} (trial {best})" in header


def test_a_trial_reads_the_configs_relative_paths_from_where_the_tune_was_started(ray_local, tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """Tune starts a trial in a folder of its own; `workload.path=sst2` (relative) is still the driver's ./sst2."""
    folder = tmp_path / "sst2"
    folder.mkdir()
    rows = [f"phrase number {i} is {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(60)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:10]) + "\n")
    monkeypatch.chdir(tmp_path)
    settings = [s for s in small(tiny_model_dir, "t", 1) if not s.startswith("output_dir=")]
    assert main(["tune", "output_dir=t", *settings, "workload.name=sst2", "workload.path=sst2", "--space",
                 "train.lr=0.001"]) == 0
    table = pq.read_table(tmp_path / "t" / "tune.parquet").to_pylist()
    assert len(table) == 1 and table[0]["finished"]
