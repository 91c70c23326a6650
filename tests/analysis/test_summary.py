"""The closing table (analysis/summary.py) on run folders written with pyarrow: every number from the run's files."""

import json
import math
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from analysis.summary import SUMMARY_COLUMNS, format_summary, summary_rows, summary_table, verdict


def write_run(folder, method, rank, *, epsilon=None, wall_s=12.5):
    """Three rounds; clients 0 and 1 in round 0, 0 and 2 in round 1, 1 and 2 in round 2 (client 2 drops out there)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method, "rank": rank}}))
    first, again = 5000 + rank, 100 + rank  # whole state at first contact, the broadcast after
    clients = [  # round, client, bytes_up, bytes_down
        (0, 0, 100, first), (0, 1, 100, first),
        (1, 0, 100, again), (1, 2, 100, first),
        (2, 1, 100, again), (2, 2, 0, again),
    ]
    pq.write_table(pa.table({
        "round": [c[0] for c in clients], "client_id": [c[1] for c in clients],
        "bytes_up": [c[2] for c in clients], "bytes_down": [c[3] for c in clients],
        "status": ["ok"] * 5 + ["dropped"],
    }), folder / "clients.parquet")
    rounds = {
        "round": [0, 1, 2], "bytes_up": [200, 200, 100], "bytes_down": [2 * first, again + first, 2 * again],
        "agg_error": [0.25, float("nan"), 0.5], "eval_metric": [0.5, 0.75, float("nan")], "wall_s": [1.0, 2.0, 3.0],
    }
    if epsilon is not None:
        rounds["epsilon_max"] = epsilon
    pq.write_table(pa.table(rounds), folder / "rounds.parquet")
    if wall_s is not None:
        (folder / "summary.json").write_text(json.dumps({"wall_s": wall_s}))
    return folder


def test_summary_rows_from_the_files(tmp_path):
    write_run(tmp_path / "a", "fed-sb", 55)
    write_run(tmp_path / "b", "fedit", 4, wall_s=None)
    a, b = summary_rows(tmp_path)
    assert a == {"run": "fed-sb", "method": "fed-sb", "rank": 55, "rounds": 3, "final_metric": 0.75,
                 "up_per_client_round": 100.0, "down_per_client_round": 155.0, "down_first_contact": 5055.0,
                 "bytes_up": 500, "bytes_down": 2 * 5055 + 155 + 5055 + 2 * 155, "max_agg_error": 0.5, "wall_s": 12.5,
                 "epsilon": a["epsilon"], "init_s": a["init_s"], "produced_by": None}
    assert math.isnan(a["epsilon"]) and math.isnan(a["init_s"])
    assert b["wall_s"] == 6.0  # no summary.json: the rounds' wall_s summed
    assert b["down_per_client_round"] == 104.0 and b["down_first_contact"] == 5004.0


def test_format_summary_and_verdict(tmp_path):
    write_run(tmp_path / "a", "fed-sb", 55)
    write_run(tmp_path / "b", "fedit", 4)
    rows = summary_rows(tmp_path)
    rows[1]["final_metric"], rows[1]["up_per_client_round"] = 0.8, 200.0
    text = format_summary(rows)
    header, rule, *lines = text.splitlines()
    assert "final accuracy" in header and "ε" not in header
    assert lines[0].split() == ["fed-sb", "55", "0.7500", "100", "155", "5,055", "500", "B", "15.6", "kB", "5.00e-01", "12.5"]
    assert verdict(rows) == "highest final accuracy: fedit 0.8000 (then fed-sb 0.7500); least sent up per client per round: fed-sb (then fedit 2.00×)."


def test_private_runs_get_an_epsilon_column(tmp_path):
    write_run(tmp_path / "p", "fed-sb", 8, epsilon=[1.5, 2.25, 3.0])
    [row] = summary_rows(tmp_path / "p")
    assert row["epsilon"] == 3.0
    assert format_summary([row]).splitlines()[2].split()[-1] == "3.00"


def test_summary_table_frame_or_arrow(tmp_path, monkeypatch):
    write_run(tmp_path / "a", "fed-sb", 55)
    arrow = summary_table(tmp_path, as_arrow=True)
    assert isinstance(arrow, pa.Table) and arrow.column_names == SUMMARY_COLUMNS
    pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install -e '.[notebooks]')")
    frame = summary_table(tmp_path)
    assert isinstance(frame, pd.DataFrame) and frame["down_first_contact"].tolist() == [5055.0]
    monkeypatch.setitem(sys.modules, "pandas", None)
    assert isinstance(summary_table(tmp_path), pa.Table)


def test_first_contact_is_by_round_not_row_order(tmp_path):
    folder = write_run(tmp_path / "a", "fed-sb", 4)
    table = pq.read_table(folder / "clients.parquet")
    pq.write_table(table.take(np.arange(table.num_rows)[::-1].copy()), folder / "clients.parquet")
    [row] = summary_rows(folder)
    assert row["down_first_contact"] == 5004.0 and row["down_per_client_round"] == 104.0


def test_the_footer_says_what_produced_the_runs(tmp_path):
    """summary.json's provenance as one line under the table: once where every run shares it, else one line a run."""
    from test_results_plots import provenance_record

    for name, method, transformers in (("a", "fed-sb", "5.25.0"), ("b", "fedit", "5.25.0")):
        folder = write_run(tmp_path / name, method, 4)
        (folder / "summary.json").write_text(json.dumps({"wall_s": 1.0, "provenance": provenance_record(transformers)}))
    footer = format_summary(summary_rows(tmp_path)).splitlines()[4:]
    assert footer == ["produced by: fedsim 0.1.0 (git aaaaaaa, dirty) · python 3.11.7 · torch 2.13.0 · transformers 5.25.0 · "
                      "peft 0.21.2 · opacus 1.6.0 · ray 2.60.0 · pyarrow 26.0.1 · numpy 2.4.6 · cpu (AMD EPYC, 2 cores), "
                      "1 torch thread(s) a worker · seed 3"]
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"wall_s": 1.0, "provenance": provenance_record("5.24.0")}))
    footer = format_summary(summary_rows(tmp_path)).splitlines()[4:]
    assert [line.split(":")[0] for line in footer] == ["produced by (fed-sb)", "produced by (fedit)"]
    assert "transformers 5.24.0" in footer[1] and "transformers 5.25.0" in footer[0]
