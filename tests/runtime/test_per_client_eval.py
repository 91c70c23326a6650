"""eval.per_client: each client's own held-out share, scored per client and round with the client's own model (the global
model, with what a personalised client keeps over it)."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from fedsim.config import load_config
from fedsim.partition import HELD_OUT, hold_out_per_client


def test_hold_out_takes_a_seeded_share_of_every_client_and_never_all():
    client_ids = np.array([0] * 10 + [1] * 4 + [2] * 1 + [3] * 2)
    held = hold_out_per_client(client_ids, 0.25, seed=3)
    assert [int(held[client_ids == c].sum()) for c in range(4)] == [2, 1, 0, 1]  # round(2.5)=2, 1, never the only row, ≥ 1
    assert np.array_equal(held, hold_out_per_client(client_ids, 0.25, seed=3))
    assert not np.array_equal(held, hold_out_per_client(client_ids, 0.25, seed=4))
    assert not hold_out_per_client(client_ids, 0.0).any()


@pytest.mark.parametrize("method_name", ["fedit", "fedsa-lora"])  # fedsa-lora: each client's own model (its own B and head)
def test_each_client_is_scored_on_its_own_held_out_rows(ray_local, tiny_model_dir, tmp_path, method_name):
    from fedsim.client_state import ClientStore
    from fedsim.data import make_rows
    from fedsim.methods import build_method
    from fedsim.modeling import load_model, load_tokenizer
    from fedsim.runtime import run

    config = load_config(None, [f"{k}={v}" for k, v in {
        "output_dir": str(tmp_path / "run"), "model.name": tiny_model_dir, "workload.name": "bbc-news",
        "workload.train_limit": 150, "workload.eval_limit": 20, "workload.max_length": 32, "clients.count": 3,
        "clients.per_round": 3, "clients.partition": "dirichlet", "clients.alpha": 0.5, "train.rounds": 2,
        "train.local_steps": 3, "train.batch_size": 8, "train.lr": 0.01, "runtime.workers": 2, "method.name": method_name,
        "method.rank": 4, "eval.per_client": 0.2,
    }.items()])
    run(config, progress=False)
    out = Path(config.output_dir)
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert len(clients) == 6 and all(0.0 <= row["eval_metric"] <= 1.0 and row["eval_loss"] > 0 for row in clients)
    meta = json.loads((out / "data" / "meta.json").read_text())
    train = pq.read_table(out / "data" / "train.parquet")
    for row in clients:  # a client trains on its rows minus its held-out share
        mine = train.filter(pq.filters_to_expression([("client_id", "=", row["client_id"])]))
        held = mine.column(HELD_OUT).to_numpy(zero_copy_only=False)
        assert row["samples"] == (~held).sum() == meta["client_sizes"][row["client_id"]]
        assert held.sum() == meta["client_eval_sizes"][row["client_id"]] == round(0.2 * mine.num_rows)

    # Recompute the last round's per-client accuracy independently: the final state on each client's held-out rows.
    state = load_file(sorted((out / "checkpoints").glob("*.safetensors"))[-1])
    model = load_model(config, meta["num_labels"]).eval()
    method = build_method(config.method, config.clients, config.seed)
    method.prepare(model, config.model.target_modules)
    tokenizer = load_tokenizer(config)
    store = ClientStore(out / "client_state")
    for row in [r for r in clients if r["round"] == 1]:
        method.load_state(model, method.client_state(state, store.read(row["client_id"], 1)))
        mine = train.filter(pq.filters_to_expression([("client_id", "=", row["client_id"]), (HELD_OUT, "=", True)]))
        batch = make_rows(mine, tokenizer, config).batch(list(range(mine.num_rows)))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
        assert row["eval_metric"] == pytest.approx(accuracy, abs=1e-6), row["client_id"]

    # The round's score: the global model on the evaluation set, or, where every client keeps its own B and head and no
    # global model exists, the clients' own scores pooled over their held-out rows.
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    sizes = meta["client_eval_sizes"]
    for round_row in rounds:
        mine = [r for r in clients if r["round"] == round_row["round"]]
        pooled = sum(r["eval_metric"] * sizes[r["client_id"]] for r in mine) / sum(sizes[r["client_id"]] for r in mine)
        if method_name == "fedsa-lora":
            assert round_row["eval_metric"] == pytest.approx(pooled, abs=1e-9)
        else:
            assert 0.0 <= round_row["eval_metric"] <= 1.0 and round_row["eval_loss"] > 0
