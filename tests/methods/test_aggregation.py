"""The mathematics of every method on real transformer layers (small BERT and Llama, random weights).

Each test computes what it checks on its own (products of the model's modules, a plain SVD) rather
than trusting the method's own error metric.
"""

import numpy as np
import pytest
import torch
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, cycle, random_batches, tiny_bert, tiny_llama, make_method, train_one

from fedsim.adapters import accumulate_gradients, adapted_layers, target_linear_names

from fedsim.config import TrainConfig
from fedsim.adapters.state import HEAD_PREFIX, key_kind, layer_names_of, nbytes
from fedsim.methods import METHODS, Upload
from fedsim.seeds import derive_seed

MODELS = {"bert": (tiny_bert, BERT_TARGETS), "llama": (tiny_llama, LLAMA_TARGETS)}
EXACT = ["fed-sb", "fedex-lora", "ffa-lora", "flora", "rolora", "fedsvd"]
RANK = 4


def setup(model_name, method_name, weights="samples", **settings):
    factory, targets = MODELS[model_name]
    model = factory()
    method = make_method(method_name, rank=RANK, alpha=2 * RANK, weights=weights, seed=0, **settings)
    grads = None
    if method.needs_init_gradients:
        grads = accumulate_gradients(model, target_linear_names(model, targets), random_batches(99, count=2))
    method.prepare(model, targets)
    return model, method, method.init_state(model, grads, init_lr=1e-3)


def random_uploads(method, state, round_idx, model, count=4):
    """Clients whose trained tensors are the global ones plus independent random perturbations."""
    uploads = []
    kept = method.client_kinds(round_idx)  # personalised tensors never go up
    trained = [key for key in method.trainable_parameters(model, round_idx) if key_kind(key) not in kept]
    for client_id in reversed(range(count)):  # arrival order differs from client-id order
        generator = torch.Generator().manual_seed(1000 * round_idx + client_id)
        tensors = {}
        for key in trained:
            base = state[key]
            tensors[key] = base + 0.05 * torch.randn(base.shape, generator=generator, dtype=base.dtype) * (1 + base.abs().mean())
        uploads.append(Upload(client_id, num_samples=10 + 7 * client_id, tensors=tensors))
    return uploads


def merged_weights(model, method, state):
    """Every adapted layer's effective weight ``W (incl. folded deltas) + scaling·B[R]A``, read off the model."""
    method.load_state(model, state)
    return {name: layer.base.weight.double() + layer.delta_weight() for name, layer in adapted_layers(model).items()}


def client_merged(model, method, state, upload):
    return merged_weights(model, method, {**state, **upload.tensors})


def expected_merged(model, method, state, uploads, weights):
    per_client = [client_merged(model, method, state, u) for u in uploads]
    return {name: sum(w * m[name] for w, m in zip(weights, per_client)) for name in per_client[0]}


def relative(a, b):
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method_name", EXACT)
@pytest.mark.parametrize("weights", ["samples", "uniform"])
def test_exact_methods_merge_to_the_weighted_mean_of_client_models(model_name, method_name, weights):
    model, method, state = setup(model_name, method_name, weights)
    for round_idx in range(2):  # a second round checks what the first folded into W0 is kept
        uploads = random_uploads(method, state, round_idx, model)
        ordered = sorted(uploads, key=lambda u: u.client_id)
        w = method.client_weights(ordered)
        expected = expected_merged(model, method, state, ordered, w)
        result = method.aggregate(state, uploads, round_idx)
        merged = merged_weights(model, method, result.state)
        for name in expected:
            assert relative(merged[name], expected[name]) < 1e-5, (round_idx, name)
        assert result.agg_error < 1e-5
        state = result.state


@pytest.mark.parametrize("model_name", MODELS)
def test_fedit_is_inexact_and_reports_its_error(model_name):
    model, method, state = setup(model_name, "fedit")
    uploads = random_uploads(method, state, 0, model)
    ordered = sorted(uploads, key=lambda u: u.client_id)
    w = method.client_weights(ordered)
    expected = expected_merged(model, method, state, ordered, w)
    result = method.aggregate(state, uploads, 0)
    merged = merged_weights(model, method, result.state)
    # the reported metric, recomputed here: ‖Σ w_i B_i A_i − B̄Ā‖ / ‖Σ w_i B_i A_i‖ over all layers
    base = {name: layer.base.weight.double() for name, layer in adapted_layers(model).items()}
    error = sum(torch.linalg.matrix_norm(merged[n] - expected[n]) ** 2 for n in expected) ** 0.5
    norm = sum(torch.linalg.matrix_norm(expected[n] - base[n]) ** 2 for n in expected) ** 0.5
    assert (error / norm).item() > 1e-3
    assert result.agg_error == pytest.approx((error / norm).item(), rel=1e-6)
    for name in expected:
        assert result.layer_errors[name] == pytest.approx(relative(merged[name], expected[name]) * (
            torch.linalg.matrix_norm(expected[name]) / torch.linalg.matrix_norm(expected[name] - base[name])).item(), rel=1e-6)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method_name", ["fra-lora", "fra-then-ffa"])
def test_fra_lora_is_the_best_rank_r_approximation(model_name, method_name):
    model, method, state = setup(model_name, method_name)
    uploads = random_uploads(method, state, 0, model)
    ordered = sorted(uploads, key=lambda u: u.client_id)
    w = method.client_weights(ordered)
    result = method.aggregate(state, uploads, 0)
    method.load_state(model, result.state)
    layers = adapted_layers(model)
    total_error = total_norm = 0.0
    for name in layers:
        full = sum(
            wi * method.scaling * u.tensors[f"{name}.lora_B"].double().numpy() @ u.tensors[f"{name}.lora_A"].double().numpy()
            for wi, u in zip(w, ordered)
        )
        U, S, Vt = np.linalg.svd(full)
        best = (U[:, :RANK] * S[:RANK]) @ Vt[:RANK]
        got = layers[name].delta_weight().numpy()
        assert np.linalg.norm(got - best) / np.linalg.norm(best) < 1e-5
        assert np.linalg.matrix_rank(got, tol=1e-9 * S[0]) == RANK
        total_error += np.sum(S[RANK:] ** 2)  # Eckart–Young: what truncation must lose
        total_norm += np.sum(S**2)
    assert result.agg_error == pytest.approx(np.sqrt(total_error / total_norm), rel=1e-4)
    assert result.agg_error > 0


def test_fra_then_ffa_switches_to_exact_ffa():
    model, method, state = setup("bert", "fra-then-ffa", switch_round=1)
    assert method.trained_kinds(0) == ("lora_A", "lora_B")
    assert method.trained_kinds(1) == ("lora_B",)
    state = method.aggregate(state, random_uploads(method, state, 0, model), 0).state
    result = method.aggregate(state, random_uploads(method, state, 1, model), 1)
    assert result.agg_error < 1e-6
    for layer in layer_names_of(state):  # A stays where FRA left it
        assert torch.equal(result.state[f"{layer}.lora_A"], state[f"{layer}.lora_A"])


@pytest.mark.parametrize("method_name", list(METHODS))
def test_the_broadcast_carries_everything_that_changed(method_name):
    """A returning client that applies the counted broadcast holds exactly the server's new state."""
    model, method, state = setup("bert", method_name)
    for round_idx in range(3):
        result = method.aggregate(state, random_uploads(method, state, round_idx, model), round_idx)
        received = method.receive(state, result.broadcast)
        assert received.keys() == result.state.keys()
        for key in received:
            assert torch.equal(received[key], result.state[key]), key
        state = result.state


def test_aggregation_ignores_arrival_order():
    model, method, state = setup("bert", "fedit")
    uploads = random_uploads(method, state, 0, model)
    a = method.aggregate(state, uploads, 0)
    b = method.aggregate(state, list(reversed(uploads)), 0)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_fed_sb_message_is_r_squared_per_layer_whatever_the_client_count():
    model, method, state = setup("llama", "fed-sb", train_head=False)
    layers = adapted_layers(model)
    for count in (2, 8):
        result = method.aggregate(state, random_uploads(method, state, 0, model, count=count), 0)
        assert sum(t.numel() for t in result.broadcast.values()) == len(layers) * RANK**2
        keys = sum(len(k.encode()) for k in result.broadcast)
        assert nbytes(result.broadcast) == 4 * len(layers) * RANK**2 + keys


@pytest.mark.parametrize("model_name", MODELS)
def test_fed_sb_trains_exactly_L_r_squared_parameters_plus_the_head(model_name):
    for train_head in (False, True):
        model, method, state = setup(model_name, "fed-sb", train_head=train_head)
        params = method.trainable_parameters(model, 0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == sum(p.numel() for p in params.values())
        head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score"))
        assert trainable == len(adapted_layers(model)) * RANK**2 + (head if train_head else 0)
        assert all(k.startswith(HEAD_PREFIX) or k.endswith(".lora_R") for k in params)


def train_rounds(method, model, state, client_batches, rounds, settings):
    losses = []
    for round_idx in range(rounds):
        uploads = []
        for client_id, batches in client_batches.items():
            upload, stats = train_one(model, method, state, round_idx, cycle(batches), settings, derive_seed(7, "training", round_idx, client_id))
            uploads.append(Upload(client_id, sum(len(b["labels"]) for b in batches), upload))
            losses.extend(stats.losses)
        state = method.aggregate(state, uploads, round_idx).state
    return state, losses


def test_fed_sb_with_one_client_equals_central_lora_sb_step_for_step():
    settings = TrainConfig(local_steps=4, lr=5e-3)
    data = {0: random_batches(3, count=5)}
    model_a, fed_sb, state_a = setup("bert", "fed-sb")
    model_b, central, state_b = setup("bert", "central", adapter="lora-sb")
    assert central.num_clients == 1
    final_a, losses_a = train_rounds(fed_sb, model_a, state_a, data, 3, settings)
    final_b, losses_b = train_rounds(central, model_b, state_b, data, 3, settings)
    assert len(losses_a) == 12 and losses_a == losses_b
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert losses_a[-1] < losses_a[0]  # and it does learn


def test_training_changes_only_the_trained_tensors():
    model, method, state = setup("bert", "ffa-lora")
    method.load_state(model, state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    upload, _ = train_one(model, method, state, 0, cycle(random_batches(1)), TrainConfig(local_steps=2, lr=1e-2), 1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or n.startswith("classifier") for n in changed)
    assert set(upload) == set(method.trainable_parameters(model, 0))


def test_bad_rank_is_a_usage_error():
    from fedsim.errors import UsageError

    with pytest.raises(UsageError, match="method.rank"):
        make_method("fed-sb", rank=0)
    with pytest.raises(UsageError, match="method.rank"):
        make_method("fedit", rank=999).prepare(tiny_bert(), BERT_TARGETS)
    with pytest.raises(UsageError, match="method.name"):
        make_method("fedx")
    with pytest.raises(UsageError, match="model.target_modules"):
        make_method("fedit").prepare(tiny_bert(), ["q_proj"])
