"""experiments/: every sweep that run.sh starts resolves to valid configs, and seeds.py's mean and spread. No Ray."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from analysis.sweep import gather, parse_grid, sweep_configs

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "experiments" / "run.sh"


# experiment 2b's seeds loop reads each method's tuned line (name rank lr); its first line stands in for all
# experiment 7's second stage (and its BBC follow-up) sweeps each variant's best.yaml from its tune: the config it was
# tuned from stands in
LOOP_VALUES = {"$tuning/$name/best.yaml": "experiments/label-skew/sst2.yaml",
               "$d/bbc-tuning/$name/best.yaml": "experiments/label-skew/bbc.yaml",
               "$d/bbc-tuning/fed-sb/best.yaml": "experiments/label-skew/bbc.yaml",
               "$longer": "experiments/results/label-skew/bbc-alpha-0.1-longer", "$dataset": "sst2", "$seed_list": "0,1,2",
               "$d/stage2": "experiments/results/label-skew/stage2", "$seeds": "experiments/results/private-sst2/seeds/fed-sb-r32", "$name": "fed-sb", "$rank": "32", "$lr": "0.01"}


def sweep_commands() -> list[list[str]]:
    """The arguments of every `fedsim sweep` in run.sh (continuation lines joined, $out expanded, the σ that
    experiment 2b's tuning trials read from `fedsim check` at run time given as a number, a loop's variables given
    their first value, redirections dropped)."""
    text = RUN_SH.read_text().replace("\\\n", " ").replace("$out", "experiments/results")
    text = re.sub(r'"\$\(sigma[^)]*\)"', "0.9", text)
    for variable, value in LOOP_VALUES.items():
        text = text.replace(variable, value)
    text = re.sub(r"\s<\s*/dev/null", "", text)
    return [shlex.split(line.strip())[2:] for line in text.splitlines() if line.strip().startswith("fedsim sweep ")]


def test_run_sh_starts_a_sweep_for_each_experiment():
    configs = {args[0] for args in sweep_commands()}
    assert configs == {"experiments/matched-comm/sst2.yaml", "experiments/private-snli/snli.yaml",
                       "experiments/fra-study/balanced.yaml", "experiments/fra-study/imbalanced.yaml",
                       "experiments/rank-het/sst2.yaml", "experiments/personal/sst2.yaml",
                       "experiments/private-sst2/sst2.yaml", "experiments/label-skew/sst2.yaml",
                       "experiments/label-skew/bbc.yaml"}


@pytest.mark.parametrize("args", sweep_commands(), ids=lambda args: " ".join(args[1:3]))
def test_every_sweep_point_is_a_valid_config(args):
    grid_at = args.index("--grid")
    config_path, overrides, grid = args[0], args[1:grid_at], parse_grid(args[grid_at + 1:])
    _, points = sweep_configs(str(ROOT / config_path), grid, overrides)
    assert points and all(str(config.output_dir).startswith("experiments/results/") for _, _, config in points)


def test_matched_comm_gives_fed_sb_about_fedits_upload():
    """Experiment 1's equal-communication rank: Fed-SB's r² a layer within 2% of FedIT's 2·8·384 at rank 8."""
    equal_comm = next(args for args in sweep_commands() if "equal-comm" in " ".join(args))
    rank = int(next(a for a in equal_comm if a.startswith("method.rank=")).split("=")[1])
    hidden = 384  # MiniLM-L6's query and value are 384×384
    assert abs(rank ** 2 - 2 * 8 * hidden) / (2 * 8 * hidden) < 0.02


@pytest.mark.slow  # a subprocess
def test_seeds_table_gives_mean_and_spread_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    points = []
    for seed, final in ((0, 0.70), (1, 0.80), (2, 0.90)):
        name = f"seed-{seed}"
        (sweep / name).mkdir(parents=True)
        (sweep / name / "config.yaml").write_text(yaml.safe_dump({"method": {"rank": 8}}))
        rounds = pa.table({"round": [0, 1], "method": ["fedit"] * 2, "clients_sampled": [2, 2], "clients_ok": [2, 2],
                           "bytes_up": [200, 200], "bytes_down": [100, 300], "agg_error": [0.1, 0.3],
                           "train_loss": [0.6, 0.5], "eval_metric": [0.5, final], "eval_loss": [0.7, 0.6],
                           "wall_s": [1.0, 1.0], "epsilon_max": [float("nan")] * 2})
        pq.write_table(rounds, sweep / name / "rounds.parquet")
        points.append(({"seed": seed}, name))
    gather(sweep, points)
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "seeds.py"), str(sweep), "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| fedit r=8"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # 3 seeds; mean 0.80, sample sd 0.10; the last (here both) rounds' means 0.60, 0.65, 0.70; (200+100)/2 and
    # (200+300)/2 bytes per client → 200 a round, 400 a run
    assert cells[1:8] == ["3", "0.800 ± 0.100", "0.700 – 0.900", "0.650 ± 0.050", "200", "400", "3.00e-01"]
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0


@pytest.mark.slow  # a subprocess
def test_stage2_table_gives_each_variant_its_spread_per_split(tmp_path):
    """experiment 7's stage2.py: the last evaluated round (eval.every skips some) per seed, mean ± sd per split, the IID
    run as one seed, bytes per client a round after the first, the lr from the runs' config; per skewed seed, the clients
    holding ≥ 90% one label."""
    def sweep(folder, grid_rows):
        points = []
        for grid, final in grid_rows:
            name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in grid.items())
            (folder / name / "data").mkdir(parents=True)
            (folder / name / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.016}}))
            pq.write_table(pa.table({"label": [0, 0, 0, 1]}), folder / name / "data" / "eval.parquet")
            if "clients.alpha" in grid:  # client 0 holds one label (9 of 10 rows), client 1 two: 1 of 2, 10 of 30 rows
                pq.write_table(pa.table({"client_id": [0, 0, 1, 1], "label": [0, 1, 0, 1], "count": [9, 1, 10, 10]}),
                               folder / name / "label_counts.parquet")
            pq.write_table(pa.table({
                "round": [0, 1, 2], "method": ["fed-sb"] * 3, "clients_sampled": [2] * 3, "clients_ok": [2] * 3,
                "bytes_up": [900, 200, 200], "bytes_down": [900, 100, 100], "agg_error": [0.0] * 3, "train_loss": [0.6] * 3,
                "eval_metric": [0.5, final, float("nan")], "eval_loss": [0.7] * 3, "wall_s": [1.0] * 3,
                "epsilon_max": [float("nan")] * 3}), folder / name / "rounds.parquet")
            points.append((grid, name))
        gather(folder, points)

    variant = tmp_path / "stage2" / "sst2" / "fedavgm"
    sweep(variant / "skew", [({"clients.alpha": alpha, "seed": seed}, final) for alpha, seed, final in
                             ((0.1, 0, 0.6), (0.1, 1, 0.7), (0.1, 2, 0.8), (0.5, 0, 0.9), (0.5, 1, 0.9), (0.5, 2, 0.9))])
    sweep(variant / "iid", [({"seed": 0}, 0.85)])
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "label-skew" / "stage2.py"), str(tmp_path / "stage2"),
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    cells = [c.strip() for c in next(line for line in out.splitlines() if line.startswith("| fedavgm")).strip("|").split("|")]
    assert cells == ["fedavgm", "0.016", "0.700 ± 0.100 (0.600 – 0.800)", "0.900 ± 0.000 (0.900 – 0.900)",
                     "0.850 (1 seed)", "0.1 kB"]  # (200 + 100) / 2 clients = 150 bytes a round after the first
    assert "Majority class of the evaluation rows: 0.750." in out
    assert "| α = 0.1 | 1 | 1 of 2 (33%) | 0.700 |" in out  # each seed's split beside its accuracy; IID has no row
    assert sum(line.startswith("| α = ") for line in out.splitlines()) == 6
    assert (tmp_path / "stage2_sst2.png").stat().st_size > 0


@pytest.mark.slow  # a subprocess
def test_seeds_refuses_a_folder_without_a_sweep(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "seeds.py"), str(tmp_path), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no sweep.parquet" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # a subprocess
def test_per_client_table_gives_each_clients_label_prior_and_a_mean_over_seeds(tmp_path):
    """per_client.py: a client's label prior is its dominant label's share (what answering that label alone scores),
    beside the clients' mean accuracy; runs that differ only in seed are summarised together."""
    for seed, accuracies in ((0, [0.9, 0.7]), (1, [0.8, 0.6])):
        run = tmp_path / "split" / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": {"name": "fedsa-lora", "rank": 8}}))
        pq.write_table(pa.table({"round": [0], "method": ["fedsa-lora"], "eval_metric": [0.8], "agg_error": [float("nan")]}),
                       run / "rounds.parquet")
        pq.write_table(pa.table({"round": [0, 0], "client_id": [0, 1], "eval_metric": accuracies}), run / "clients.parquet")
        pq.write_table(pa.table({"client_id": [0, 0, 1, 1], "label": [0, 1, 0, 1], "count": [30, 10, 5, 15]}),
                       run / "label_counts.parquet")
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "per_client.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if "seed 0" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["0.900, 0.700", "0.800", "0.750"]  # per client, their mean, the priors' mean (0.75, 0.75)
    summary = next(line for line in out.splitlines() if line.startswith("| split | fedsa-lora r=8 | 2 |"))
    assert "0.750 ± 0.071" in summary and "0.700 – 0.800" in summary  # means 0.8 and 0.7 over the two seeds
    assert (tmp_path / "per_client.png").stat().st_size > 0


def tune_variants() -> list[tuple[str, list[str]]]:
    """Experiment 7's tunes: run.sh's `tune` function's `fedsim tune` command, once for each variant of the screen on
    SST-2 and for each variant of the second stage on BBC News (folder, arguments)."""
    text = RUN_SH.read_text().replace("\\\n", " ")
    command = next(line.strip() for line in text.splitlines() if line.strip().startswith("fedsim tune "))
    variants = dict(line.partition(" ")[::2] for line in
                    re.search(r"<<'VARIANTS'\n(.*?)\nVARIANTS", text, re.S).group(1).splitlines())
    stage2 = re.search(r"stage2=\((.*?)\)", text).group(1).split()
    assert set(stage2) <= set(variants)
    out = []
    for dataset, folder, names in (("sst2", "screen", list(variants)), ("bbc", "bbc-tuning", stage2)):
        for name in names:
            place = f"experiments/results/label-skew/{folder}/{name}"
            filled = command.replace("$config", f"experiments/label-skew/{dataset}.yaml").replace("$folder", place)
            filled = filled.replace('"$@"', variants[name])
            out.append((place, shlex.split(re.sub(r"\s<\s*/dev/null", "", filled))[1:]))
    return out


@pytest.mark.parametrize("place, args", tune_variants(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_tune_of_experiment_7_is_a_valid_search(place, args, capsys):
    from fedsim.cli import main

    assert main([*args, "--dry-run"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert said.startswith("3 trials into ") and f"{place}/<trial>/" in said
