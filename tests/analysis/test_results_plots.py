"""Readers of a run's results folder and its plots, on fake run folders written with pyarrow."""

import json
import math
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from analysis.plots import main, plot_label_counts, plot_runs, write_run_plots
from analysis.results import Run, clients_table, find_runs, load_run, runs_table
from fedsim.errors import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUNDS = 6


def make_run(folder, method, *, exact, num_clients=4, num_labels=2, label_counts=True, bytes_up=1000, config=True):
    folder.mkdir(parents=True)
    if config:
        cfg = {
            "seed": 0,
            "output_dir": str(folder),
            "method": {"name": method, "rank": 4},
            "clients": {"count": num_clients, "per_round": 2},
            "workload": {"name": "sst2-tiny"},
            "model": {"name": "tiny-bert"},
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    rounds = np.arange(ROUNDS)
    evals = np.where(rounds % 2 == 1, 0.5 + 0.05 * rounds, np.nan)  # eval on odd rounds only
    pq.write_table(
        pa.table(
            {
                "round": pa.array(rounds, pa.int64()),
                "method": [method] * ROUNDS,
                "clients_sampled": pa.array([2] * ROUNDS, pa.int64()),
                "clients_ok": pa.array([2] * ROUNDS, pa.int64()),
                "bytes_up": pa.array(bytes_up * (rounds + 1), pa.int64()),
                "bytes_down": pa.array([500] * ROUNDS, pa.int64()),
                "agg_error": np.zeros(ROUNDS) if exact else 0.1 / (rounds + 1),
                "train_loss": 1.0 / (rounds + 1),
                "eval_metric": evals,
                "eval_loss": np.where(np.isnan(evals), np.nan, 1 - evals),
                "wall_s": np.full(ROUNDS, 0.25),
            }
        ),
        folder / "rounds.parquet",
    )
    n = ROUNDS * 2
    pq.write_table(
        pa.table(
            {
                "round": pa.array(np.repeat(rounds, 2), pa.int64()),
                "client_id": pa.array(np.tile([0, 1], ROUNDS), pa.int64()),
                "worker_id": pa.array(np.zeros(n, np.int64)),
                "rank": pa.array(np.full(n, 4, np.int64)),
                "samples": pa.array(np.full(n, 8, np.int64)),
                "steps": pa.array(np.full(n, 2, np.int64)),
                "train_loss": np.full(n, 0.5),
                "bytes_up": pa.array(np.full(n, 100, np.int64)),
                "bytes_down": pa.array(np.full(n, 100, np.int64)),
                "train_s": np.full(n, 0.1),
                "status": ["ok"] * n,
            }
        ),
        folder / "clients.parquet",
    )
    (folder / "summary.json").write_text(json.dumps({"method": method, "final_eval_metric": 0.75}))
    if label_counts:
        rng = np.random.default_rng(0)
        pq.write_table(
            pa.table(
                {
                    "client_id": pa.array(np.repeat(np.arange(num_clients), num_labels), pa.int64()),
                    "label": pa.array(np.tile(np.arange(num_labels), num_clients), pa.int64()),
                    "count": pa.array(rng.integers(0, 50, num_clients * num_labels), pa.int64()),
                }
            ),
            folder / "label_counts.parquet",
        )
    return folder


@pytest.fixture
def comparison(tmp_path):
    root = tmp_path / "default"
    make_run(root / "fedit", "fedit", exact=False, bytes_up=4000)
    make_run(root / "fed-sb", "fed-sb", exact=True)
    (root / "notes").mkdir()  # a subfolder that is not a run
    return root


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))


def test_find_runs_single_and_comparison(comparison):
    assert find_runs(comparison) == [comparison / "fed-sb", comparison / "fedit"]
    assert find_runs(comparison / "fedit") == [comparison / "fedit"]
    assert find_runs(str(comparison / "fedit" / "rounds.parquet")) == [comparison / "fedit"]


def test_bad_paths_raise_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no rounds.parquet"):
        find_runs(tmp_path)
    with pytest.raises(UsageError, match="not a folder"):
        find_runs(tmp_path / "missing")
    with pytest.raises(UsageError, match="no rounds.parquet"):
        load_run(tmp_path)
    with pytest.raises(UsageError, match="not a folder"):
        load_run(tmp_path / "missing")
    with pytest.raises(UsageError):
        write_run_plots(tmp_path)
    # The message is one line and names the path.
    with pytest.raises(UsageError) as info:
        find_runs(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_load_run(comparison):
    run = load_run(comparison / "fed-sb")
    assert isinstance(run, Run)
    assert run.name == "fed-sb"
    assert run.config["method"]["rank"] == 4
    assert run.rounds.num_rows == ROUNDS
    assert run.clients is not None and run.clients.num_rows == 2 * ROUNDS
    assert run.summary["final_eval_metric"] == 0.75


def test_load_run_falls_back_to_folder_name_and_tolerates_missing_files(tmp_path):
    folder = make_run(tmp_path / "my-run", "x", exact=True, config=False)
    (folder / "clients.parquet").unlink()
    (folder / "summary.json").unlink()
    run = load_run(folder)
    assert run.name == "my-run"
    assert run.config == {} and run.summary == {} and run.clients is None


def test_runs_table_stacks_runs_with_cumulative_bytes(comparison):
    table = runs_table(comparison, as_arrow=True)
    assert table.column_names[0] == "run"
    assert table.num_rows == 2 * ROUNDS
    assert table["run"].to_pylist() == ["fed-sb"] * ROUNDS + ["fedit"] * ROUNDS
    fedit = table.filter(pa.compute.equal(table["run"], "fedit"))
    expected_up = np.cumsum(4000 * (np.arange(ROUNDS) + 1))
    assert fedit["bytes_up_cum"].to_pylist() == expected_up.tolist()
    assert fedit["bytes_down_cum"].to_pylist() == (500 * (np.arange(ROUNDS) + 1)).tolist()
    # Run objects and lists of folders work too; NaN evals survive.
    same = runs_table([load_run(comparison / "fed-sb"), comparison / "fedit"], as_arrow=True)
    assert same["bytes_up_cum"].to_pylist() == table["bytes_up_cum"].to_pylist()
    assert math.isnan(same["eval_metric"][0].as_py())


def test_runs_table_sorts_rounds_and_disambiguates_names(tmp_path):
    a = make_run(tmp_path / "a", "fed-sb", exact=True)
    make_run(tmp_path / "b", "fed-sb", exact=True)
    shuffled = pq.read_table(a / "rounds.parquet").take([3, 0, 5, 1, 4, 2])
    pq.write_table(shuffled, a / "rounds.parquet")
    table = runs_table(tmp_path, as_arrow=True)
    assert sorted(set(table["run"].to_pylist())) == ["fed-sb (a)", "fed-sb (b)"]
    first = table.slice(0, ROUNDS)
    assert first["round"].to_pylist() == list(range(ROUNDS))
    assert first["bytes_up_cum"].to_pylist() == np.cumsum(1000 * (np.arange(ROUNDS) + 1)).tolist()


def test_tables_are_dataframes_where_pandas_is_installed(comparison):
    pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install -e '.[notebooks]')")
    frame = runs_table(comparison)
    assert isinstance(frame, pd.DataFrame)
    arrow = runs_table(comparison, as_arrow=True)
    assert list(frame.columns) == arrow.column_names
    assert frame["bytes_up_cum"].tolist() == arrow["bytes_up_cum"].to_pylist()
    assert frame["run"].tolist() == ["fed-sb"] * ROUNDS + ["fedit"] * ROUNDS
    clients = clients_table(comparison)
    assert isinstance(clients, pd.DataFrame) and len(clients) == 2 * 2 * ROUNDS
    assert clients.columns[0] == "run" and clients["client_id"].tolist()[:2] == [0, 1]


def test_tables_are_arrow_where_pandas_is_absent(comparison, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    with pytest.raises(ImportError):
        import pandas  # noqa: F401
    table = runs_table(comparison)
    arrow = runs_table(comparison, as_arrow=True)
    assert isinstance(table, pa.Table) and table.schema == arrow.schema
    assert table["bytes_up_cum"].to_pylist() == arrow["bytes_up_cum"].to_pylist()
    clients = clients_table(comparison)
    assert isinstance(clients, pa.Table) and clients.num_rows == 2 * 2 * ROUNDS
    assert clients.column_names[0] == "run"


def test_clients_table_needs_a_clients_file(tmp_path):
    folder = make_run(tmp_path / "r", "fed-sb", exact=True)
    (folder / "clients.parquet").unlink()
    with pytest.raises(UsageError, match="no clients.parquet"):
        clients_table(folder)


def test_plot_runs_comparison_and_single(comparison, tmp_path):
    runs = [load_run(p) for p in find_runs(comparison)]
    assert_png(plot_runs(runs, tmp_path / "out" / "both.png"))
    assert_png(plot_runs(runs[:1], tmp_path / "one.png"))


def test_plot_runs_without_any_eval(tmp_path):
    folder = make_run(tmp_path / "r", "fedit", exact=False)
    t = pq.read_table(folder / "rounds.parquet")
    t = t.set_column(t.column_names.index("eval_metric"), "eval_metric", pa.array([math.nan] * ROUNDS))
    pq.write_table(t, folder / "rounds.parquet")
    assert_png(plot_runs(folder, tmp_path / "p.png"))


def test_plot_label_counts_many_clients(tmp_path):
    folder = make_run(tmp_path / "big", "fed-sb", exact=True, num_clients=1000, num_labels=3)
    assert_png(plot_label_counts(load_run(folder), tmp_path / "labels.png"))
    with pytest.raises(UsageError, match="label_counts"):
        plot_label_counts(make_run(tmp_path / "nolabels", "x", exact=True, label_counts=False), tmp_path / "x.png")


def test_write_run_plots_run_folder(comparison):
    run_dir = comparison / "fed-sb"
    written = write_run_plots(run_dir)
    assert written == [run_dir / "plot.png", run_dir / "label_counts.png"]
    for p in written:
        assert_png(p)


def test_write_run_plots_comparison_folder(comparison):
    written = write_run_plots(comparison)
    assert written[0] == comparison / "comparison.png"
    assert set(written[1:]) == {
        comparison / name / f for name in ("fed-sb", "fedit") for f in ("plot.png", "label_counts.png")
    }
    for p in written:
        assert_png(p)


def test_main(tmp_path, capsys):
    folder = make_run(tmp_path / "r", "fed-sb", exact=True, label_counts=False)
    assert main([str(folder)]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "plot.png")]
    assert main([str(tmp_path / "missing")]) == 2
    assert "error: results:" in capsys.readouterr().err


def test_write_run_plots_to_out_dir(comparison, tmp_path):
    out = tmp_path / "figs"
    written = write_run_plots([load_run(p) for p in find_runs(comparison)], out_dir=out)
    assert all(p.parent == out for p in written)
    assert {p.name for p in written} == {
        "comparison.png",
        "fed-sb-plot.png",
        "fed-sb-label_counts.png",
        "fedit-plot.png",
        "fedit-label_counts.png",
    }


def provenance_record(transformers: str, seed: int = 3) -> dict:
    versions = {"python": "3.11.7", "fedsim": "0.1.0", "torch": "2.13.0", "transformers": transformers, "peft": "0.21.2",
                "opacus": "1.6.0", "ray": "2.60.0", "pyarrow": "26.0.1", "numpy": "2.4.6"}
    return {"versions": versions, "git": {"revision": "a" * 40, "dirty": True}, "platform": "Linux x86_64", "seed": seed,
            "devices": ["cpu (AMD EPYC, 2 cores)"], "torch_threads": [1], "worker_versions_differ": []}


def test_tables_carry_each_runs_provenance_as_columns(comparison):
    """A notebook groups runs by what produced them: summary.json's record, or (a run not finished) the last start's in
    provenance.json; a run that recorded none gets nulls."""
    summary = comparison / "fed-sb" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "provenance": provenance_record("5.24.0")}))
    (comparison / "fedit" / "summary.json").unlink()
    starts = [{"start_round": 0, **provenance_record("5.24.0", seed=5)}, {"start_round": 2, **provenance_record("5.25.0", seed=5)}]
    (comparison / "fedit" / "provenance.json").write_text(json.dumps(starts))
    for table in (runs_table(comparison, as_arrow=True), clients_table(comparison, as_arrow=True)):
        by_run = {run: table.filter(pa.compute.equal(table["run"], run)) for run in ("fed-sb", "fedit")}
        assert set(by_run["fed-sb"]["transformers"].to_pylist()) == {"5.24.0"}
        assert set(by_run["fedit"]["transformers"].to_pylist()) == {"5.25.0"}  # the last start's
        assert set(by_run["fedit"]["seed"].to_pylist()) == {5} and set(by_run["fed-sb"]["seed"].to_pylist()) == {3}
        assert set(table["git_revision"].to_pylist()) == {"a" * 40} and set(table["git_dirty"].to_pylist()) == {True}
        assert set(table["devices"].to_pylist()) == {"cpu (AMD EPYC, 2 cores)"} and set(table["torch_threads"].to_pylist()) == {"1"}
    make_run(comparison / "old", "flora", exact=True)  # written before runs recorded provenance
    old = runs_table(comparison / "old", as_arrow=True)
    assert set(old["transformers"].to_pylist()) == {None} and set(old["seed"].to_pylist()) == {None}
