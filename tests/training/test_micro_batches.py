"""``train.micro_batch_size`` through the engine: each client's batch cut into micro-batches, in cohorts of any K and
under DP, gives the step of the whole batch. float64, ``FLOAT64`` (the engine's tolerance, tests/training/test_engine.py):
a micro-batch changes only the order in which the same terms are added."""

import pytest
import torch
from test_engine import (FLOAT64, LLAMA_TARGETS, assert_same_upload, client_tables, float64_causal_loss, initial_state,
                         instruction_tables, llama_dirs, one_thread, prepared)

from fedsim.config import TrainConfig
from fedsim.data import InstructionRows, TokenizedRows
from fedsim.modeling import load_tokenizer
from fedsim.privacy import PrivacySettings, poisson_batches
from fedsim.training.engine import train_clients

__all__ = ["llama_dirs", "one_thread"]  # fixtures, used by name


def train(model, method, state, rows, micro, task="classification", private=False):
    settings = TrainConfig(local_steps=3, batch_size=4, lr=5e-3, weight_decay=0.01, max_grad_norm=0.5, micro_batch_size=micro)
    K = len(rows)
    if private:
        privacy = [PrivacySettings(0.7, 0.05, 0.6, max(1, round(0.6 * len(r)))) for r in rows]
        batches = [poisson_batches(r, 0.6, 10 + i) for i, r in enumerate(rows)]
        return train_clients(model, method, 0, [state] * K, [None] * K, batches, settings, [3] * K, seed=7, task=task,
                             privacy=privacy, noise_seeds=list(range(100, 100 + K)))
    batches = [r.batches(4, 10 + i) for i, r in enumerate(rows)]
    return train_clients(model, method, 0, [state] * K, [None] * K, batches, settings, [3] * K, seed=7, task=task)


def assert_same_steps(whole, parts, where):
    for k, (w, p) in enumerate(zip(whole, parts)):
        assert_same_upload(p.upload, w.upload, f"{where} client {k}", FLOAT64)
        assert p.stats.losses == pytest.approx(w.stats.losses, rel=1e-10, nan_ok=True), where


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("private", [False, True])
def test_micro_batches_give_the_whole_batches_step(tiny_model_dir, method_name, K, private):
    """Batches of 4 in micro-batches of 1 and of 3 (3 + 1 rows: weights 3/4 and 1/4), the head trained, clipping on."""
    config, model, method = prepared(tiny_model_dir, method_name)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    state = initial_state(model, method, rows[3])
    whole = train(model, method, state, rows[:K], None, private=private)
    moved = max((w.upload[key] - state[key]).abs().max().item() for w in whole for key in w.upload)
    assert moved > 1e-4  # the steps did something
    for micro in (1, 3):
        assert_same_steps(whole, train(model, method, state, rows[:K], micro, private=private), f"{method_name} K={K} micro={micro}")


def test_causal_lm_micro_batches_weigh_their_labelled_tokens(llama_dirs):
    """A causal LM's loss is the mean over the batch's labelled tokens: each micro-batch weighs its share of them."""
    config, model, method = prepared(llama_dirs["causal"], "fedit", task="causal-lm", targets=LLAMA_TARGETS, **{"workload.max_length": 32})
    model.loss_function = float64_causal_loss
    rows = [InstructionRows(table, load_tokenizer(config), 32, "response") for table in instruction_tables()][:2]
    state = initial_state(model, method, rows[0])
    whole = train(model, method, state, rows, None, task="causal-lm")
    assert_same_steps(whole, train(model, method, state, rows, 3, task="causal-lm"), "causal micro=3")


def test_the_kv_cache_is_off_while_clients_train(llama_dirs):
    """Training needs no KV cache (and gradient checkpointing refuses it): off for the engine's passes, restored after."""
    config, model, method = prepared(llama_dirs["causal"], "fedit", task="causal-lm", targets=LLAMA_TARGETS, **{"workload.max_length": 32})
    rows = [InstructionRows(table, load_tokenizer(config), 32, "response") for table in instruction_tables()][:2]
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.config.use_cache))
    assert model.config.use_cache
    train(model, method, initial_state(model, method, rows[0]), rows, None, task="causal-lm")
    assert seen and not any(seen) and model.config.use_cache
