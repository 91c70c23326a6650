"""The aggregation error from the factors (Gram traces, no d×k matrix per client) against the explicit d×k computation.

The reference here is the explicit one: every client's ``w_i · s · B_i R_i A_i`` formed as a d×k float64
matrix and summed, the new state's ``s · B R A`` plus what the round folded into W0 subtracted, norms taken.
Errors are compared in units of ‖Σ w_i s B_i R_i A_i‖ (the metric's own denominator) to 1e-10, and where the
error is not tiny (the inexact methods) also relative to the error itself: an exact method's error is float32
rounding (~1e-8 of the norm), below what the explicit computation resolves relative to itself.
"""

import math

import pytest
import torch
from tiny_models import LLAMA_TARGETS, make_method, random_batches, tiny_llama

from fedsim.adapters import accumulate_gradients, target_linear_names
from fedsim.methods import Upload
from fedsim.adapters.state import layer_names_of, state_key
from fedsim.methods.agg_error import client_factors, dense, squared_norm, squared_norms
from fedsim.methods.fra_lora import truncated_factors

RANK = 4
METHODS = ["fed-sb", "fedit", "fedex-lora", "ffa-lora", "flora", "fra-lora", "fra-then-ffa"]
INEXACT = {"fedit", "fra-lora", "fra-then-ffa"}


def setup(method_name, **settings):
    model = tiny_llama()
    method = make_method(method_name, seed=0, rank=RANK, alpha=2 * RANK, switch_round=1, **settings)
    grads = None
    if method.needs_init_gradients:
        grads = accumulate_gradients(model, target_linear_names(model, LLAMA_TARGETS), random_batches(99, count=2))
    method.prepare(model, LLAMA_TARGETS)
    state = method.init_state(model, grads, init_lr=1e-3)
    generator = torch.Generator().manual_seed(11)
    if not method.needs_init_gradients:  # a non-zero B, so that every product matters
        state = {k: (0.1 * torch.randn(v.shape, generator=generator) if k.endswith("lora_B") else v) for k, v in state.items()}
    return model, method, state


def uploads_of(method, model, state, round_idx, ranks):
    """Clients of the given ranks: the leading block of the global tensors plus a random perturbation."""
    uploads = []
    for client_id, rank in enumerate(ranks):
        generator = torch.Generator().manual_seed(100 * round_idx + client_id)
        tensors = {}
        for key in method.trainable_parameters(model, round_idx):
            value = state[key]
            kind = key.rsplit(".", 1)[1]
            block = {"lora_A": (rank, value.shape[1]), "lora_B": (value.shape[0], rank), "lora_R": (rank, rank)}.get(kind, value.shape)
            value = value[tuple(slice(0, n) for n in block)]
            tensors[key] = value + 0.05 * torch.randn(value.shape, generator=generator) * (1 + value.abs().mean())
        uploads.append(Upload(client_id, num_samples=10 + 7 * client_id, tensors=tensors))
    return uploads


def explicit_errors(method, old_state, new_state, uploads):
    """``{layer: (‖ideal − ΔW_agg‖, ‖ideal‖)}``, each client's product formed as a d×k float64 matrix."""
    ordered = sorted(uploads, key=lambda u: u.client_id)
    weights = method.client_weights(ordered)
    out = {}
    for layer in layer_names_of(old_state):
        ideal = 0
        for upload, weight in zip(ordered, weights):
            B, R, A = client_factors(old_state, upload, layer)
            ideal = ideal + weight * method.scaling * (B @ (A if R is None else R @ A))
        B, A = (new_state[state_key(layer, k)].double() for k in ("lora_B", "lora_A"))
        R = new_state.get(state_key(layer, "lora_R"))
        effective = method.scaling * (B @ (A if R is None else R.double() @ A))
        delta = state_key(layer, "base_delta")
        if delta in new_state:
            effective = effective + new_state[delta].double() - (old_state[delta].double() if delta in old_state else 0)
        out[layer] = (torch.linalg.matrix_norm(ideal - effective).item(), torch.linalg.matrix_norm(ideal).item())
    return out


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("ranks,rank_aggregation", [([4, 4, 4], "zero-pad"), ([4, 2, 3, 1], "zero-pad"), ([2, 4, 3], "partitioned")])
def test_error_from_the_factors_equals_the_explicit_dxk_computation(method_name, ranks, rank_aggregation):
    model, method, state = setup(method_name, rank_aggregation=rank_aggregation)
    for round_idx in range(2):  # the second round starts from folded W0s (FedEx, FLoRA) and is FFA for fra-then-ffa
        uploads = uploads_of(method, model, state, round_idx, ranks)
        result = method.aggregate(state, uploads, round_idx)
        explicit = explicit_errors(method, state, result.state, uploads)
        total_error = math.sqrt(sum(e**2 for e, _ in explicit.values()))
        total_norm = math.sqrt(sum(n**2 for _, n in explicit.values()))
        assert result.agg_error == pytest.approx(total_error / total_norm, abs=1e-10)
        for layer, (error, norm) in explicit.items():
            assert result.layer_errors[layer] == pytest.approx(error / norm, abs=1e-10), layer
            if method_name in INEXACT and not (method_name == "fra-then-ffa" and round_idx >= 1):
                assert result.layer_errors[layer] == pytest.approx(error / norm, rel=1e-10), layer
        exact = method_name not in INEXACT or (method_name == "fra-then-ffa" and round_idx >= 1)
        if exact and rank_aggregation == "zero-pad":
            assert result.agg_error < 1e-6
        elif method_name in INEXACT and round_idx == 0:
            assert result.agg_error > 1e-3
        state = result.state


def random_terms(d, k, ranks, seed, shared_A=False):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(max(ranks), k, generator=generator, dtype=torch.float64)
    terms = []
    for r in ranks:
        R = torch.randn(r, r, generator=generator, dtype=torch.float64) if r % 2 else None
        right = A[:r] if shared_A else torch.randn(r, k, generator=generator, dtype=torch.float64)
        terms.append((float(torch.rand(1, generator=generator)) - 0.5, torch.randn(d, r, generator=generator, dtype=torch.float64), R, right))
    return terms


@pytest.mark.parametrize("d,k,ranks", [(40, 30, [3, 2, 5]), (12, 10, [4, 4, 4, 4, 3])])  # Gram traces; the d×k product (many columns)
def test_squared_norm_of_stacked_terms_is_exact(d, k, ranks):
    terms = random_terms(d, k, ranks, seed=d)
    assert squared_norm(terms) == pytest.approx(float(torch.linalg.matrix_norm(dense(terms)) ** 2), rel=1e-12)
    total, head = squared_norms(terms, 2)  # the first two terms' norm from the same Gram matrices
    assert total == pytest.approx(squared_norm(terms), rel=1e-12)
    assert head == pytest.approx(float(torch.linalg.matrix_norm(dense(terms[:2])) ** 2), rel=1e-12)


def test_fra_truncation_from_the_factors_equals_the_dense_svd():
    terms = random_terms(50, 36, [3, 4, 2], seed=3)
    delta = dense(terms)
    singular = torch.linalg.svdvals(delta)
    assert singular[3] / singular[4] > 1.05  # a gap at r = 4: the truncation is unique
    B, A = truncated_factors(terms, 4, 0.5)  # 9 stacked columns < 36: two thin QRs and a 9×9 SVD
    B_dense, A_dense = truncated_factors([(1.0, delta, None, torch.eye(36, dtype=torch.float64))], 4, 0.5)  # the d×k SVD
    assert torch.allclose(B @ A, B_dense @ A_dense, rtol=0, atol=1e-12 * float(singular[0]))
    few = truncated_factors(terms[:1], 4, 1.0)  # ΔW of rank 3 < r: the missing component is zero
    assert few[0].shape == (50, 4) and few[1].shape == (4, 36) and torch.allclose(few[0] @ few[1], dense(terms[:1]), atol=1e-12)
