"""The ClientWorker and the Aggregator as plain objects (no Ray): any client on demand, one model load,
stragglers, corrupt clients, what each client receives."""

import pyarrow as pa
import pytest

from fedsim.config import load_config
from fedsim.adapters.state import nbytes
from fedsim.partition import write_partitioned
from fedsim.prepare import DataPlan
from fedsim.runtime.aggregator import Aggregator
from fedsim.runtime.plan import RunPlan
from fedsim.runtime.worker import ClientWorker


@pytest.fixture()
def data_dir(tmp_path):
    texts = [f"sample text number {i} about {'sport' if i % 2 else 'business'}" for i in range(40)]
    table = pa.table({"text": texts, "text_pair": pa.nulls(40, pa.string()), "label": [i % 2 for i in range(40)]})
    write_partitioned(table, [i % 8 for i in range(40)], str(tmp_path / "train.parquet"))
    write_partitioned(table.slice(0, 10), [0] * 10, str(tmp_path / "eval.parquet"))
    return tmp_path


def make_plan(data_dir, model_dir, **overrides):
    config = load_config(None, [f"model.name={model_dir}", "method.name=fed-sb", "train.local_steps=1",
                                "train.batch_size=2", "workload.max_length=16", "clients.count=8", "clients.per_round=2",
                                *[f"{k}={v}" for k, v in overrides.items()]])
    data = DataPlan(data_dir=str(data_dir), workload="test", num_labels=2, label_names=["a", "b"], train_rows=40,
                    eval_rows=10, client_sizes=[5] * 8, client_eval_sizes=[0] * 8, client_chars=[200] * 8, eval_chunks=1)
    return RunPlan.resolve(config, data)


def test_any_worker_trains_any_client_on_demand_and_loads_the_model_once(data_dir, tiny_model_dir):
    worker = ClientWorker(make_plan(data_dir, tiny_model_dir), 0)
    state = worker.initial_state()
    uploads, rows = worker.train(0, state, [5, 1])
    assert [r["client_id"] for r in rows] == [1, 5] and all(r["status"] == "ok" for r in rows)
    assert [u["client_id"] for u in uploads] == [1, 5]
    assert rows[0]["bytes_up"] == nbytes(uploads[0]["tensors"]) and rows[0]["samples"] == 5
    uploads2, rows2 = worker.train(1, state, [2, 5])  # another round, other clients: read on demand
    assert [r["client_id"] for r in rows2] == [2, 5] and set(worker.cache) >= {1, 2, 5}
    assert worker.model_loads == 1
    result = worker.evaluate(state, [0])[0]
    assert result["count"] == 10 and 0 <= result["correct"] <= 10


def test_a_client_computes_the_same_on_any_worker_in_any_company(data_dir, tiny_model_dir):
    plan = make_plan(data_dir, tiny_model_dir)
    first, second = ClientWorker(plan, 0), ClientWorker(plan, 1)
    state = first.initial_state()
    alone = first.train(0, state, [3])[0][0]["tensors"]
    with_others = second.train(0, state, [1, 3, 7])[0][1]["tensors"]
    assert all((alone[key] == with_others[key]).all() for key in alone)


def test_deadline_turns_late_clients_into_stragglers(data_dir, tiny_model_dir):
    worker = ClientWorker(make_plan(data_dir, tiny_model_dir, **{"runtime.deadline_s": 1e-9}), 0)
    state = worker.initial_state()
    uploads, rows = worker.train(0, state, [1, 3, 5])
    assert [r["status"] for r in rows] == ["straggler"] * 3 and uploads == []
    worker.config.runtime.deadline_s = 3600.0
    uploads, rows = worker.train(0, state, [1, 3, 5])
    assert [r["status"] for r in rows] == ["ok"] * 3 and len(uploads) == 3


def test_corrupt_clients_are_flagged_nonfinite_and_not_uploaded(data_dir, tiny_model_dir):
    plan = make_plan(data_dir, tiny_model_dir, **{"clients.corrupt": "[3]"})
    worker = ClientWorker(plan, 0)
    state = worker.initial_state()
    uploads, rows = worker.train(0, state, [1, 3])
    assert [r["status"] for r in rows] == ["ok", "nonfinite"]
    aggregator = Aggregator(plan)
    aggregator.set_state(state)
    assert aggregator.aggregate(0, [1, 3], uploads)["clients_aggregated"] == 1


def test_first_contact_gets_the_whole_state_then_the_broadcast_then_what_changed(data_dir, tiny_model_dir):
    plan = make_plan(data_dir, tiny_model_dir, **{"method.train_head": "false"})
    worker, aggregator = ClientWorker(plan, 0), Aggregator(plan)
    state = worker.initial_state()
    aggregator.set_state(state)
    r_bytes = sum(v.numel() * 4 + len(k) for k, v in state.items() if k.endswith("lora_R"))
    uploads, _ = worker.train(0, state, [1, 3])
    assert aggregator.aggregate(0, [1, 3], uploads)["bytes_down"] == {1: nbytes(state), 3: nbytes(state)}
    uploads, _ = worker.train(1, aggregator.get_state(), [1, 5])
    assert aggregator.aggregate(1, [1, 5], uploads)["bytes_down"] == {1: r_bytes, 5: nbytes(state)}
    # client 3 last received the state at round 0: since then only R changed (Fed-SB's B and A never do)
    assert aggregator.aggregate(2, [3], [])["bytes_down"] == {3: r_bytes}


@pytest.mark.parametrize("init_samples", [16, 64])
def test_private_init_poisson_samples_each_client_and_books_the_rate_it_used(data_dir, tiny_model_dir, monkeypatch, init_samples,
                                                                            tmp_path):
    import numpy as np
    import torch
    from opacus.accountants import RDPAccountant

    from fedsim.privacy_accounting import epsilon_spent
    from fedsim.privacy_plan import init_rows_per_client
    from fedsim.runtime import worker as worker_module
    from fedsim.runtime.driver import Experiment
    from fedsim.storage import Location
    from fedsim.seeds import rng

    sigma_init, batch_size = 5.0, 2
    plan = make_plan(data_dir, tiny_model_dir, **{
        "privacy.enabled": "true", "privacy.epsilon": 3.0, "privacy.init_noise_multiplier": sigma_init,
        "adapters.init_samples": init_samples, "adapters.init_data": "pooled", "adapters.init_batch_size": batch_size})
    worker, config = ClientWorker(plan, 0), plan.config
    calls = []

    def recording(model, layer_names, batches, max_grad_norm, noise_multiplier, seed):
        calls.append((list(batches), noise_multiplier))
        return {name: torch.zeros(model.get_submodule(name).weight.shape, dtype=torch.float64) for name in layer_names}

    monkeypatch.setattr(worker_module, "private_gradient_sum", recording)
    worker.init_gradients([1, 3, 5])
    rate = min(1.0, init_rows_per_client(config) / 5)
    assert rate == (0.4 if init_samples == 16 else 1.0)  # 2 of each client's 5 records expected, or all
    for client_id, (batches, noise) in zip([1, 3, 5], calls):
        rows = worker.client_rows([client_id])[client_id][0]
        # each record in independently with probability q (Poisson), from the stream (run seed, init-sample, client id)
        chosen = np.flatnonzero(rng(0, "init-sample", client_id).random(len(rows)) < rate)
        expected = [rows.batch(chosen[i : i + batch_size]) for i in range(0, len(chosen), batch_size)]
        assert len(batches) == len(expected) and noise == sigma_init
        assert all(torch.equal(b[k], e[k]) for b, e in zip(batches, expected) for k in e)
        # booked as the sampled Gaussian mechanism at that rate, then the client's DP-SGD steps
        privacy = Experiment(config, Location(str(tmp_path / "run")), resumed=False, progress=False).privacy_plan(plan.data.client_sizes)
        privacy.client_rows[client_id] = [{"noise_multiplier": 1.3, "sample_rate": 0.4, "steps": 3}]
        history = privacy.history(client_id)
        assert history == [(sigma_init, rate, 1), (1.3, 0.4, 3)]
        accountant = RDPAccountant()
        accountant.step(noise_multiplier=sigma_init, sample_rate=rate)
        for _ in range(3):
            accountant.step(noise_multiplier=1.3, sample_rate=0.4)
        assert epsilon_spent(history, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_the_init_reads_any_clients_rows_and_sends_only_the_factors(data_dir, tiny_model_dir):
    """The pooled calibration sample is gathered by one worker, whichever worker it is: the same state from worker 0
    as from worker 1; what comes back is B, R, A (and the head), on the CPU."""
    import torch

    plan = make_plan(data_dir, tiny_model_dir, **{"method.rank": 4, "adapters.init_samples": 6, "adapters.init_batch_size": 2})
    state, again = ClientWorker(plan, 0).initial_state(), ClientWorker(plan, 1).initial_state()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    kinds = {key.rsplit(".", 1)[1] for key in state if not key.startswith("head:")}
    assert kinds == {"lora_A", "lora_B", "lora_R"}
    assert all(v.device.type == "cpu" for v in state.values())
    assert all(v.shape[0] == 4 for k, v in state.items() if k.endswith(("lora_A", "lora_R")))


def test_a_private_cohort_trains_each_client_as_it_trains_alone(data_dir, tiny_model_dir):
    """runtime.cohort_size under privacy.enabled, through the worker as the runtime builds it: the same rows (status,
    steps, Poisson rate, σ) and, up to float32 rounding, the same uploads as one client at a time (model.dropout: 0;
    each client's noise from its own training seed)."""
    import torch

    private = {"privacy.enabled": "true", "privacy.noise_multiplier": 0.5, "adapters.init_data": "public", "model.dropout": 0,
               "method.name": "fedit", "train.local_steps": 3}
    from unittest import mock

    from fedsim.runtime import worker as worker_module

    results, cohorts = {}, []

    def spy(model, method, round_idx, states, *args, privacy=None, **kwargs):
        cohorts.append((len(states), privacy is not None))
        return real(model, method, round_idx, states, *args, privacy=privacy, **kwargs)

    real = worker_module.train_clients
    for cohort_size in (1, 3):
        worker = ClientWorker(make_plan(data_dir, tiny_model_dir, **private, **{"runtime.cohort_size": cohort_size}), 0)
        with mock.patch.object(worker_module, "train_clients", spy):
            uploads, rows = worker.train(0, worker.initial_state(), [1, 3, 5], 0.5)
        results[cohort_size] = uploads, [{k: v for k, v in row.items() if k not in ("train_s", "train_loss")} for row in rows]
    assert cohorts == [(1, True)] * 3 + [(3, True)]  # one engine: three private cohorts of one, then one of three
    (solo, solo_rows), (together, together_rows) = results[1], results[3]
    assert together_rows == solo_rows and all(row["noise_multiplier"] == 0.5 for row in solo_rows)
    for a, b in zip(solo, together):
        assert a["client_id"] == b["client_id"]
        for key in a["tensors"]:
            assert torch.allclose(a["tensors"][key], b["tensors"][key], rtol=1e-4, atol=1e-6), key
