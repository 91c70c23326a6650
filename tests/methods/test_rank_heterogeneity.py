"""Rank-heterogeneous clients: Fed-SB's leading blocks of R, HetLoRA-style truncation for LoRA, FLoRA's stacking."""

import pytest
import torch
from tiny_models import BERT_TARGETS, cycle, random_batches, tiny_bert, make_method, train_one

from fedsim.adapters import accumulate_gradients, adapted_layers, target_linear_names
from fedsim.adapters.state import nbytes, pad_to
from fedsim.methods import Upload
from fedsim.config import TrainConfig

FULL = 8
RANKS = {0: 2, 1: 4, 2: 8}
SETTINGS = TrainConfig(local_steps=2, lr=1e-2)


def setup(method_name, **settings):
    model = tiny_bert()
    method = make_method(method_name, rank=FULL, seed=0, **settings)
    grads = accumulate_gradients(model, target_linear_names(model, BERT_TARGETS), random_batches(9, count=2)) if method.needs_init_gradients else None
    method.prepare(model, BERT_TARGETS)
    state = method.init_state(model, grads)
    if not method.needs_init_gradients:  # a non-zero B, so truncation matters
        state = {k: (torch.randn_like(v) * 0.1 if k.endswith("lora_B") else v) for k, v in state.items()}
    return model, method, state


def train_clients(model, method, state, ranks):
    uploads = []
    for client_id, rank in ranks.items():
        upload, _ = train_one(model, method, state, 0, cycle(random_batches(client_id)), SETTINGS, client_id, rank=rank)
        uploads.append(Upload(client_id, 10 + client_id, upload))
    return uploads


def client_model_weights(model, method, state, upload, rank):
    """A rank-r_i client's effective weights: its block of the adapters over the frozen base."""
    method.load_state(model, {**state}, rank)
    method.load_state(model, {**state, **{k: pad_to(v, state[k].shape) for k, v in upload.tensors.items()}}, rank)
    return {n: layer.delta_weight() for n, layer in adapted_layers(model).items()}


def test_fed_sb_clients_send_only_their_block():
    model, method, state = setup("fed-sb", train_head=False)
    uploads = train_clients(model, method, state, RANKS)
    layers = len(adapted_layers(model))
    for upload in uploads:
        rank = RANKS[upload.client_id]
        assert all(t.shape == (rank, rank) for t in upload.tensors.values())
        keys = sum(len(k.encode()) for k in upload.tensors)
        assert nbytes(upload.tensors) == 4 * layers * rank**2 + keys


def test_a_lower_rank_client_computes_with_its_leading_block_only():
    model, method, state = setup("fed-sb", train_head=False)
    method.load_state(model, state, 2)
    batch = random_batches(3, count=1)[0]
    with torch.no_grad():
        truncated = model(**batch).logits
        zeroed = dict(state)
        for key in state:
            if key.endswith("lora_R"):
                zeroed[key] = torch.zeros_like(state[key])
                zeroed[key][:2, :2] = state[key][:2, :2]
        method.load_state(model, zeroed)  # full rank with R zero outside the block: the same function
        assert torch.allclose(model(**batch).logits, truncated, atol=1e-6)


def test_zero_pad_is_the_exact_mean_of_the_client_models():
    model, method, state = setup("fed-sb", train_head=False, rank_aggregation="zero-pad")
    uploads = train_clients(model, method, state, RANKS)
    weights = method.client_weights(uploads)
    expected = {}
    for upload, w in zip(uploads, weights):
        for name, delta in client_model_weights(model, method, state, upload, RANKS[upload.client_id]).items():
            expected[name] = expected.get(name, 0) + w * delta
    result = method.aggregate(state, uploads, 0)
    method.load_state(model, result.state)
    for name, layer in adapted_layers(model).items():
        assert torch.allclose(layer.delta_weight(), expected[name], rtol=1e-5, atol=1e-9)
    assert result.agg_error < 1e-5


def test_partitioned_divides_each_entry_by_the_weight_of_those_who_trained_it():
    model, method, state = setup("fed-sb", train_head=False, rank_aggregation="partitioned")
    ranks = {0: 2, 1: 4}  # nobody trains beyond 4: those entries keep their global value
    uploads = train_clients(model, method, state, ranks)
    w = method.client_weights(uploads)
    result = method.aggregate(state, uploads, 0)
    key = next(k for k in state if k.endswith("lora_R"))
    R0, R1, new = uploads[0].tensors[key].double(), uploads[1].tensors[key].double(), result.state[key].double()
    assert torch.allclose(new[:2, :2], w[0] * R0 + w[1] * R1[:2, :2], atol=1e-6)  # both trained it
    assert torch.allclose(new[2:4, 2:4], R1[2:4, 2:4], atol=1e-6)  # only client 1 trained it: its value, not w_1 times it
    assert torch.equal(result.state[key][4:, 4:], state[key][4:, 4:])


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora", "flexlora", "hetlora"])
def test_equal_ranks_give_bit_for_bit_the_homogeneous_result(method_name):
    model, method, state = setup(method_name)
    homogeneous = method.aggregate(state, train_clients(model, method, state, {0: None, 1: None}), 0)
    heterogeneous = method.aggregate(state, train_clients(model, method, state, {0: FULL, 1: FULL}), 0)
    assert homogeneous.state.keys() == heterogeneous.state.keys()
    assert all(torch.equal(homogeneous.state[k], heterogeneous.state[k]) for k in homogeneous.state)


@pytest.mark.parametrize("method_name", ["fedex-lora", "flora", "ffa-lora"])
def test_exact_baselines_stay_exact_with_heterogeneous_ranks(method_name):
    model, method, state = setup(method_name, train_head=False)
    uploads = train_clients(model, method, state, RANKS)
    result = method.aggregate(state, uploads, 0)
    assert result.agg_error < 1e-5
    received = method.receive(state, result.broadcast)
    assert all(torch.equal(received[k], result.state[k]) for k in result.state)


def test_fedit_truncates_and_zero_pads():
    model, method, state = setup("fedit", train_head=False)
    uploads = train_clients(model, method, state, RANKS)
    for upload in uploads:
        rank = RANKS[upload.client_id]
        assert all(t.shape[0] == rank for k, t in upload.tensors.items() if k.endswith("lora_A"))
        assert all(t.shape[1] == rank for k, t in upload.tensors.items() if k.endswith("lora_B"))
    result = method.aggregate(state, uploads, 0)
    assert 0 < result.agg_error < 1


# -- clients.rank_scaling: a rank-r_i client scaled by alpha/r_i (own) or alpha/r (max) -------------------------------
ALPHA = 16.0  # s = alpha/8 = 2; own: s_i = 8, 4, 2 for ranks 2, 4, 8


def trained_clients(model, method, state, ranks):
    """Each client's upload and the product its own model holds right after training: ``s_i B_i R_i A_i`` per layer."""
    uploads, products = [], []
    for client_id, rank in ranks.items():
        upload, _ = train_one(model, method, state, 0, cycle(random_batches(client_id)), SETTINGS, client_id, rank=rank)
        uploads.append(Upload(client_id, 10 + client_id, upload))
        products.append({n: layer.delta_weight() for n, layer in adapted_layers(model).items()})
    return uploads, products


def ideal(method, uploads, products):
    """``Σ w_i s_i B_i R_i A_i`` per layer, from the clients' own models."""
    weights = method.client_weights(uploads)
    return {n: sum(w * p[n] for w, p in zip(weights, products)) for n in products[0]}


def global_products(model, method, state):
    method.load_state(model, state)
    return {n: layer.delta_weight() for n, layer in adapted_layers(model).items()}


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "flexlora"])
def test_own_scales_a_client_by_its_rank_and_starts_it_from_the_global_block(method_name):
    model, method, state = setup(method_name, alpha=ALPHA, rank_scaling="own")
    for rank in (2, 4, FULL):
        method.load_state(model, state, rank)
        expected = (FULL if method_name == "fed-sb" else ALPHA) / rank
        for name, layer in adapted_layers(model).items():
            assert layer.scaling == expected == method.client_scaling(rank)
            B, A = state[f"{name}.lora_B"].double()[:, :rank], state[f"{name}.lora_A"].double()[:rank]
            R = state.get(f"{name}.lora_R")
            block = B @ (A if R is None else R.double()[:rank, :rank] @ A) * method.scaling
            assert torch.allclose(layer.delta_weight(), block, rtol=1e-6, atol=1e-9)  # s_i B_i R_i A_i = s · the global block
    assert make_method(method_name, rank=FULL, alpha=ALPHA).client_scaling(2) == (8.0 if method_name == "flexlora" else method.scaling)


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora", "flexlora", "hetlora", "rolora"])
def test_own_and_max_are_bit_identical_when_every_client_is_at_full_rank(method_name):
    results = []
    for scaling in ("own", "max"):
        model, method, state = setup(method_name, alpha=ALPHA, rank_scaling=scaling)
        results.append(method.aggregate(state, train_clients(model, method, state, {0: FULL, 1: FULL}), 0))
    assert results[0].state.keys() == results[1].state.keys()
    assert all(torch.equal(results[0].state[k], results[1].state[k]) for k in results[0].state)
    assert results[0].agg_error == results[1].agg_error


@pytest.mark.parametrize("method_name", ["fed-sb", "ffa-lora"])
def test_exact_methods_stay_exact_under_own(method_name):
    """Fed-SB's zero-pad mean (and FFA's B mean) of uploads at the global scaling is ``Σ w_i s_i B R_i A`` itself."""
    model, method, state = setup(method_name, train_head=False, alpha=ALPHA, rank_scaling="own")
    uploads, products = trained_clients(model, method, state, RANKS)
    result = method.aggregate(state, uploads, 0)
    expected = ideal(method, uploads, products)
    for name, product in global_products(model, method, result.state).items():
        assert torch.allclose(product, expected[name], rtol=1e-5, atol=1e-8)
    assert result.agg_error < 1e-5


@pytest.mark.parametrize("method_name", ["fedex-lora", "flora"])
def test_exact_baselines_stay_exact_under_own(method_name):
    model, method, state = setup(method_name, train_head=False, alpha=ALPHA, rank_scaling="own")
    uploads, products = trained_clients(model, method, state, RANKS)
    result = method.aggregate(state, uploads, 0)
    assert result.agg_error < 1e-5
    expected = ideal(method, uploads, products)
    for name, product in global_products(model, method, result.state).items():  # the fold, plus what stays in the adapters
        delta = result.state[f"{name}.base_delta"].double() - state.get(f"{name}.base_delta", torch.zeros(1)).double()
        assert torch.allclose(product + delta, expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method_name", ["fedit", "hetlora", "flexlora"])
def test_agg_error_is_measured_against_the_clients_own_products(method_name):
    """``‖Σ w_i s_i B_i A_i − s B A‖ / ‖Σ w_i s_i B_i A_i‖`` with s_i = alpha/r_i, from the clients' own models (HetLoRA:
    its sparsity weights ``‖s_i B_i A_i‖`` in place of w_i)."""
    model, method, state = setup(method_name, train_head=False, alpha=ALPHA, rank_scaling="own")
    uploads, products = trained_clients(model, method, state, RANKS)
    result = method.aggregate(state, uploads, 0)
    if method_name == "hetlora":
        norms = {n: [p[n].norm().item() for p in products] for n in products[0]}
        expected = {n: sum(v / sum(norms[n]) * p[n] for v, p in zip(norms[n], products)) for n in products[0]}
    else:
        expected = ideal(method, uploads, products)
    new = global_products(model, method, result.state)
    error2 = sum(float((expected[n] - new[n]).norm() ** 2) for n in new)
    assert result.agg_error == pytest.approx((error2 / sum(float(e.norm() ** 2) for e in expected.values())) ** 0.5, rel=1e-4)
    assert result.agg_error > 1e-3


def test_flexlora_gives_each_client_the_authors_factors():
    """FederatedScope's FlexLoRA: the SVD of ``ΔW = Σ w_i (alpha/r_i) B_i A_i``; client i gets ``B_i = U_{r_i} S_{r_i} / (alpha/r_i)``
    and ``A_i = V_{r_i}ᵀ`` (all of S in B; A's rows orthonormal)."""
    model, method, state = setup("flexlora", train_head=False, alpha=ALPHA)
    assert method.client_scaling(2) == ALPHA / 2  # own by default
    uploads, products = trained_clients(model, method, state, RANKS)
    result = method.aggregate(state, uploads, 0)
    delta = ideal(method, uploads, products)
    for rank in (2, 4, FULL):
        method.load_state(model, method.downlink(result.state, rank), rank)
        for name, layer in adapted_layers(model).items():
            U, S, Vh = torch.linalg.svd(delta[name])
            A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
            signs = torch.sign((A * Vh[:rank]).sum(1))  # singular vectors are defined up to their sign
            assert torch.allclose(A, signs[:, None] * Vh[:rank], atol=1e-5)
            assert torch.allclose(B, U[:, :rank] * signs * S[:rank] / (ALPHA / rank), rtol=1e-4, atol=1e-6)
