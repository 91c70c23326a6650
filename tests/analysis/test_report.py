"""`fedsim report` (figures + Markdown, measured vs predicted flagged) and `fedsim sweep` (grid, gather)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.report import pareto_front, write_demo_runs, write_report
from analysis.sweep import expand_grid, gather, parse_grid, point_name, run_sweep, split_values
from fedsim.cli import main
from fedsim.errors import UsageError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_runs(root, methods=("fed-sb", "fedit", "flora"), rounds=4, rank=4)
    return root


def test_report_writes_figures_and_summary(demo, tmp_path):
    report = write_report([demo], tmp_path / "out")
    text = report.read_text()
    for name in ("accuracy_vs_comm", "comm_vs_clients", "metrics", "agg_error"):
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000, name
        assert f"]({name}.png)" in text
    assert not (tmp_path / "out" / "privacy.png").exists()  # no run has epsilon_max
    assert text.count("| ok |") == 3 and "⚠" not in text


def test_mismatch_is_flagged_and_privacy_plotted(demo, tmp_path):
    import shutil

    run = tmp_path / "runs" / "fedit"
    shutil.copytree(demo / "fedit", run)
    rounds = pq.read_table(run / "rounds.parquet")
    up = rounds["bytes_up"].to_numpy().copy()
    up[2] = int(up[2] * 1.1)  # round 2 claims 10% more bytes up than were sent
    rounds = rounds.set_column(rounds.column_names.index("bytes_up"), "bytes_up", pa.array(up))
    rounds = rounds.append_column("epsilon_max", pa.array(np.linspace(0.5, 3.0, rounds.num_rows)))
    pq.write_table(rounds, run / "rounds.parquet")
    text = write_report([demo / "fed-sb", run], tmp_path / "out").read_text()
    assert "⚠ 1 round(s)" in text and "round 2" in text
    assert (tmp_path / "out" / "privacy.png").read_bytes()[:8] == PNG


def test_pareto_front():
    points = [(1.0, 0.8), (2.0, 0.9), (3.0, 0.85), (0.5, 0.5), (2.0, 0.7), (float("nan"), 1.0)]
    assert pareto_front(points) == [3, 0, 1]


def test_report_cli(demo, tmp_path, capsys):
    assert main(["report", str(demo), "--out", str(tmp_path / "r"), "--clients", "10,100"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    out = capsys.readouterr().out.splitlines()
    assert "final accuracy" in out[0] and out[-1] == str(tmp_path / "r" / "report.md")  # the closing table, then the path
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(demo), "--clients", "0"]) == 2
    assert "fedsim: error:" in capsys.readouterr().err


def test_grid_parsing():
    assert split_values("a,[x,y],b") == ["a", "[x,y]", "b"]
    grid = parse_grid(["method.name=fed-sb,fedit", "clients.count=10,100", "model.target_modules=[query,value],[query]"])
    assert grid["clients.count"] == [10, 100] and grid["model.target_modules"] == [["query", "value"], ["query"]]
    points = expand_grid(grid)
    assert len(points) == 8 and points[1] == {"method.name": "fed-sb", "clients.count": 10, "model.target_modules": ["query"]}
    assert point_name(points[0]) == "name-fed-sb_count-10_target_modules-query,value"
    for bad in (["method.name"], ["=a,b"], ["a=1", "a=2"], ["output_dir=x,y"], []):
        with pytest.raises(UsageError, match="--grid"):
            parse_grid(bad)


def test_sweep_runs_every_point_once_and_gathers(tmp_path, monkeypatch):
    """The orchestration, with the runtime replaced by a stub that writes a rounds table per run."""
    import fedsim.runtime

    calls = []

    def fake_run_comparison(configs, output_dir, overwrite=False, progress=True):
        calls.append([c.output_dir for c in configs])
        for c in configs:
            out = tmp_path / "sw" / c.output_dir.rsplit("/", 1)[-1]
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"round": [0, 1], "eval_metric": [0.5, c.method.rank / 10]}), out / "rounds.parquet")
            (out / "summary.json").write_text("{}")

    monkeypatch.setattr(fedsim.runtime, "run_comparison", fake_run_comparison)
    grid = parse_grid(["method.name=fed-sb,fedit", "method.rank=2,4"])
    path = run_sweep(None, grid, ["train.rounds=2"], output_dir=str(tmp_path / "sw"), progress=False)
    table = pq.read_table(path)
    assert table.num_rows == 8 and set(table["method.rank"].to_pylist()) == {2, 4}
    assert sorted(set(table["point"].to_pylist())) == ["name-fed-sb_rank-2", "name-fed-sb_rank-4", "name-fedit_rank-2", "name-fedit_rank-4"]
    run_sweep(None, grid, ["train.rounds=2"], output_dir=str(tmp_path / "sw"), progress=False)
    assert len(calls) == 1  # the second time every point is finished: nothing runs again
    assert gather(tmp_path / "sw").is_file()


def test_sweep_cli_dry_run_and_bad_input(tmp_path, capsys):
    assert main(["sweep", f"output_dir={tmp_path}/s", "--grid", "method.name=fed-sb,fedit", "clients.count=10,20", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("(run)") == 4 and "name-fedit_count-20" in out
    assert main(["sweep", "--grid", "method.name=fed-sb,nope", "--dry-run"]) == 2
    assert main(["sweep", "--grid", "clients.count=10,x", "--dry-run"]) == 2
    assert main(["sweep", "--grid", "no_such.key=1,2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("fedsim: error:") == 3
