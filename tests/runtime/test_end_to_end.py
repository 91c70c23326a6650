"""End to end on a real local Ray (one session-scoped instance): actors, results, determinism, resume, faults."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from fedsim.config import load_config
from fedsim.runtime import run, run_comparison


def make_config(tmp_path, model_dir, name="run", **overrides):
    base = {
        "output_dir": str(tmp_path / name), "model.name": model_dir, "workload.name": "bbc-news",
        "workload.train_limit": 400, "workload.eval_limit": 40, "workload.max_length": 32,
        "clients.count": 20, "clients.per_round": 6, "clients.partition": "dirichlet", "clients.alpha": 1.0,
        "train.rounds": 3, "train.local_steps": 2, "train.batch_size": 4, "train.lr": 0.01,
        "runtime.workers": 2, "adapters.init_samples": 16, "adapters.init_batch_size": 8, "method.rank": 4,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def final_state(run_dir):
    checkpoints = sorted(Path(run_dir, "checkpoints").glob("round_*.safetensors"))
    return load_file(checkpoints[-1])


def rows(run_dir, name, drop):
    """The rows of a results table without the timing columns, NaN read as None (so that equal rows compare equal)."""
    table = pq.read_table(Path(run_dir, name)).drop_columns(drop)
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in table.to_pylist()]


def assert_same_run(a, b):
    state_a, state_b = final_state(a), final_state(b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    timings = ["wall_s", "train_s_max", "aggregate_s", "eval_s", "overhead_s"]
    assert rows(a, "rounds.parquet", timings) == rows(b, "rounds.parquet", timings)
    # which worker trained a client follows the measured times; what the client computed does not
    assert rows(a, "clients.parquet", ["train_s", "worker_id"]) == rows(b, "clients.parquet", ["train_s", "worker_id"])


def test_200_clients_two_methods_two_workers(ray_local, tiny_model_dir, tmp_path):
    configs = [
        make_config(tmp_path, tiny_model_dir, f"cmp/{method}", **{
            "method.name": method, "clients.count": 200, "clients.per_round": 20, "clients.partition": "iid",
            "workload.train_limit": 1000, "train.rounds": 2, "method.rank": 24, "method.train_head": "false",
        })
        for method in ("fed-sb", "fedit")
    ]
    run_comparison(configs, str(tmp_path / "cmp"), progress=False)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
    layers = 4  # 2 BERT layers × (query, value)
    for config in configs:
        out = Path(config.output_dir)
        clients = pq.read_table(out / "clients.parquet").to_pylist()
        assert [sum(1 for r in clients if r["round"] == k) for k in range(2)] == [20, 20]
        assert {r["worker_id"] for r in clients} == {0, 1}
        for k in range(2):  # each round's clients are shared out over both workers, whoever they are
            assert {r["worker_id"] for r in clients if r["round"] == k} == {0, 1}
        assert all(r["status"] == "ok" for r in clients)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model_loads"] == 2  # once per worker, not once per client
        assert sorted(w["worker_id"] for w in summary["workers"]) == [0, 1]
        rounds = pq.read_table(out / "rounds.parquet").to_pylist()
        assert len(rounds) == 2 and all(r["clients_ok"] == 20 for r in rounds)
        assert all(0.0 <= r["eval_metric"] <= 1.0 for r in rounds)
        for name in ("config.yaml", "label_counts.parquet", "plot.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
            assert (out / name).exists(), name
        if config.method.name == "fed-sb":
            analytic = 4 * layers * 24**2  # float32 R per adapted layer
            assert all(abs(r["bytes_up"] - analytic) / analytic < 0.05 for r in clients)
            assert all(r["agg_error"] < 1e-5 for r in rounds)
        else:
            assert all(r["agg_error"] > 0 for r in rounds)
            assert all(r["bytes_up"] > 4 * layers * 24**2 * 2 for r in clients)


def test_same_config_same_numbers_and_resume(ray_local, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Same config, same numbers; a run stopped after round 0 and resumed gives the uninterrupted run's numbers, and
    says in one line which library version differs from its first start (here a monkeypatched transformers)."""
    from fedsim import provenance

    whole = make_config(tmp_path, tiny_model_dir, "whole")
    run(whole, progress=False)
    again = make_config(tmp_path, tiny_model_dir, "again")
    run(again, progress=False)
    assert_same_run(tmp_path / "whole", tmp_path / "again")

    stopped = make_config(tmp_path, tiny_model_dir, "stopped", **{"train.rounds": 1})
    run(stopped, progress=False)
    assert "resuming" not in capsys.readouterr().out
    installed = provenance.versions()
    monkeypatch.setattr(provenance, "versions", lambda: {**installed, "transformers": "9.9.9"})
    resumed = load_config(str(tmp_path / "stopped" / "config.yaml"), ["train.rounds=3"])
    run(resumed, resume=str(tmp_path / "stopped"), progress=False)
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")
    [line] = [line for line in capsys.readouterr().out.splitlines() if "resuming" in line]
    assert f"transformers {installed['transformers']} → 9.9.9" in line and "from round 1" in line
    starts = json.loads((tmp_path / "stopped" / "provenance.json").read_text())
    assert [s["start_round"] for s in starts] == [0, 1]
    assert [s["versions"]["transformers"] for s in starts] == [installed["transformers"], "9.9.9"]
    assert {**json.loads((tmp_path / "stopped" / "summary.json").read_text())["provenance"], "start_round": 1} == starts[-1]


def test_a_run_records_what_produced_it_and_local_epochs_alone_mean_epochs(ray_local, tiny_model_dir, tmp_path, capsys):
    """Through `fedsim run`: ``train.local_epochs=1`` alone (``train.local_steps`` keeps its default) trains each client
    ⌈n_i / batch_size⌉ steps; summary.json records the versions, the git revision, the devices, torch's threads and the
    seed, and the closing table's footer says them."""
    from fedsim.cli import main
    from fedsim.provenance import PACKAGES

    out = tmp_path / "epochs"
    args = [f"output_dir={out}", f"model.name={tiny_model_dir}", "method.name=fed-sb", "workload.train_limit=150",
            "workload.eval_limit=20", "clients.count=5", "clients.per_round=5", "clients.partition=iid", "train.rounds=1",
            "train.local_epochs=1", "train.batch_size=8", "runtime.workers=1", "adapters.init_samples=8", "seed=7"]
    assert main(["run", *args]) == 0
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert len(clients) == 5 and len({r["samples"] for r in clients}) >= 1
    assert [r["steps"] for r in clients] == [-(-r["samples"] // 8) for r in clients]  # ⌈n_i / 8⌉ × 1 epoch
    record = json.loads((out / "summary.json").read_text())["provenance"]
    assert set(record["versions"]) == {"python", *PACKAGES} and record["versions"]["torch"] == torch.__version__
    assert record["seed"] == 7 and record["torch_threads"] == [1] and record["devices"][0].startswith("cpu (")
    assert record["git"] is None or (len(record["git"]["revision"]) == 40 and isinstance(record["git"]["dirty"], bool))
    footer = capsys.readouterr().out
    assert f"torch {torch.__version__}" in footer and "seed 7" in footer


def test_a_killed_worker_is_restarted_and_changes_nothing(ray_local, tiny_model_dir, tmp_path):
    plain = make_config(tmp_path, tiny_model_dir, "plain", **{"method.name": "fedex-lora", "train.rounds": 2})
    run(plain, progress=False)
    killed = make_config(tmp_path, tiny_model_dir, "killed", **{"method.name": "fedex-lora", "train.rounds": 2, "runtime.kill_worker_round": 1})
    run(killed, progress=False)
    workers = json.loads((tmp_path / "killed" / "summary.json").read_text())["workers"]
    assert [w["restarted"] for w in sorted(workers, key=lambda w: w["worker_id"])] == [True, False]
    assert_same_run(tmp_path / "plain", tmp_path / "killed")


def test_nonfinite_and_dropped_clients_are_left_out(ray_local, tiny_model_dir, tmp_path):
    config = make_config(tmp_path, tiny_model_dir, "faulty", **{
        "clients.per_round": 20, "clients.corrupt": "[3,8]", "clients.dropout": 0.3, "train.rounds": 2, "method.name": "fedit"})
    run(config, progress=False)
    clients = pq.read_table(tmp_path / "faulty" / "clients.parquet").to_pylist()
    assert {r["client_id"] for r in clients if r["status"] == "nonfinite"} <= {3, 8}
    assert any(r["status"] == "nonfinite" for r in clients)
    assert any(r["status"] == "dropped" for r in clients)
    for r in pq.read_table(tmp_path / "faulty" / "rounds.parquet").to_pylist():
        in_round = [c for c in clients if c["round"] == r["round"]]
        assert r["clients_ok"] == sum(c["status"] == "ok" for c in in_round)
        assert r["agg_error"] == r["agg_error"] and r["eval_metric"] == r["eval_metric"]  # finite, not NaN
    state = final_state(tmp_path / "faulty")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_personalised_clients_resume_bit_identical_with_their_own_tensors(ray_local, tiny_model_dir, tmp_path):
    """FedSA-LoRA: B (and the head) stay with each client in the per-client store; stopping after round 1 and resuming
    gives the same global state, the same rows and the same tensors in every client's store as the run that never
    stopped — and only A crosses the wire."""
    from fedsim.client_state import ClientStore

    overrides = {"method.name": "fedsa-lora", "train.rounds": 3, "clients.per_round": 8, "eval.per_client": 0.2}
    whole = make_config(tmp_path, tiny_model_dir, "fedsa-whole", **overrides)
    run(whole, progress=False)
    stopped = make_config(tmp_path, tiny_model_dir, "fedsa-stopped", **{**overrides, "train.rounds": 1})
    run(stopped, progress=False)
    resumed = load_config(str(tmp_path / "fedsa-stopped" / "config.yaml"), ["train.rounds=3"])
    run(resumed, resume=str(tmp_path / "fedsa-stopped"), progress=False)
    assert_same_run(tmp_path / "fedsa-whole", tmp_path / "fedsa-stopped")
    a, b = ClientStore(tmp_path / "fedsa-whole" / "client_state"), ClientStore(tmp_path / "fedsa-stopped" / "client_state")
    kept = 0
    for client_id in range(20):
        own_a, own_b = a.read(client_id, 2), b.read(client_id, 2)
        assert own_a.keys() == own_b.keys() and all(torch.equal(own_a[k], own_b[k]) for k in own_a)
        kept += bool(own_a)
        assert all(key.endswith(".lora_B") or key.startswith("head:") for key in own_a)
    assert kept >= 8  # every client that trained keeps its own B and head
    state = final_state(tmp_path / "fedsa-whole")
    clients = pq.read_table(tmp_path / "fedsa-whole" / "clients.parquet").to_pylist()
    a_bytes = sum(v.numel() * 4 + len(k) for k, v in state.items() if k.endswith(".lora_A"))
    assert {r["bytes_up"] for r in clients if r["status"] == "ok"} == {a_bytes}  # A alone goes up
    assert all(0.0 <= r["eval_metric"] <= 1.0 for r in clients if r["status"] == "ok")


def test_presummed_uploads_give_the_same_run_to_rounding(ray_local, tiny_model_dir, tmp_path):
    """runtime.presum: each worker sends one weighted sum; the state matches the unsummed run to float rounding, the bytes
    on the wire are still each client's, and FedIT's error comes with its standard error."""
    plain = make_config(tmp_path, tiny_model_dir, "sums-plain", **{"method.name": "fedit", "train.rounds": 2, "clients.ranks": "[2,4]"})
    summed = make_config(tmp_path, tiny_model_dir, "sums-presum", **{"method.name": "fedit", "train.rounds": 2, "clients.ranks": "[2,4]",
                                                                     "runtime.presum": "true"})
    run(plain, progress=False)
    run(summed, progress=False)
    a, b = final_state(tmp_path / "sums-plain"), final_state(tmp_path / "sums-presum")
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-6 * a[key].norm().clamp_min(1e-12), key
    rows_a, rows_b = (pq.read_table(tmp_path / n / "rounds.parquet").to_pylist() for n in ("sums-plain", "sums-presum"))
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows_a] == [(r["bytes_up"], r["bytes_down"]) for r in rows_b]
    assert all(r["agg_error_se"] == 0.0 for r in rows_a)
    for exact, estimate in zip(rows_a, rows_b):
        assert estimate["agg_error_se"] > 0 and abs(estimate["agg_error"] - exact["agg_error"]) <= 4 * estimate["agg_error_se"]
