"""The LoRA-SB layer, its injection and its update-approximation initialisation, on real transformer layers."""

import math

import pytest
import torch
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, random_batches, tiny_bert, tiny_llama, make_method

from fedsim.adapters import LoraSBLinear, accumulate_gradients, adapted_layers, inject_lora_sb, lora_sb_factors, target_linear_names
from fedsim.adapters.init import OVERSAMPLE, POWER_ITERATIONS, sign_products

RANK = 4


def randomized_svd_tolerance(S: torch.Tensor, rank: int, n: int) -> float:
    """How far the randomized ``B R A`` may sit from the exact rank-r truncation, relative to its norm.

    Subspace iteration with q = r + p Gaussian vectors and t iterations finds the top-r singular
    subspace to an angle ≤ C·(σ_{q+1}/σ_r)^(2t+1) (Halko, Martinsson, Tropp 2011, Thm 9.1 with §10's
    expected C = √(r/(p−1)) + e·√q/p·√(n−r)); the truncation then moves by that angle over the gap
    σ_r/(σ_r − σ_{r+1}) (Davis–Kahan). Plus float32's floor: the sign matrix and the passes are
    float32 (eps 6e-8, ~1e-6 seen after 6 passes), so 1e-5.
    """
    q, t = rank + OVERSAMPLE, POWER_ITERATIONS
    C = math.sqrt(rank / (OVERSAMPLE - 1)) + math.e * math.sqrt(q) / OVERSAMPLE * math.sqrt(n - rank)
    gamma = (S[q] / S[rank - 1]).item()
    return C * gamma ** (2 * t + 1) * (S[rank - 1] / (S[rank - 1] - S[rank])).item() + 1e-5


def block_gradient(d: int, k: int, flip: float, seed: int) -> torch.Tensor:
    """A gradient sum whose sign is a rank-8 block pattern (an 8×8 Hadamard), a share ``flip`` of entries flipped."""
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(3):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.randint(0, 8, (d,), generator=generator), torch.randint(0, 8, (k,), generator=generator)
    sign = hadamard[rows][:, cols]
    sign = torch.where(torch.rand(d, k, generator=generator) < flip, -sign, sign)
    return sign * (torch.rand(d, k, generator=generator, dtype=torch.float64) + 0.1)


def exact_truncation(grad_sum: torch.Tensor, rank: int, lr: float):
    """Today's reference: the float64 SVD of −lr·sign(Σ∇W), truncated to rank r."""
    U, S, Vh = torch.linalg.svd(-lr * torch.sign(grad_sum.double()), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank], S


def relative(a, b):
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


@pytest.mark.parametrize("flip", [0.0, 0.001, 0.003])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("wide", [False, True])
def test_randomized_factors_equal_the_exact_svd_where_the_sign_matrix_has_a_gap(flip, seed, wide):
    grad_sum, rank, lr = block_gradient(300, 200, flip, seed), 8, 2e-3
    grad_sum = grad_sum.T.contiguous() if wide else grad_sum
    assert 2 * (rank + OVERSAMPLE) < 200  # the randomized path, not the exact one
    best, S = exact_truncation(grad_sum, rank, lr)
    tolerance = randomized_svd_tolerance(S, rank, 200)
    assert tolerance < 2e-5  # the gap is real: this is an equality test
    B, R, A = lora_sb_factors(grad_sum.float(), rank, lr, seed=seed)
    assert B.dtype == R.dtype == A.dtype == torch.float32
    assert relative(B.double() @ R.double() @ A.double(), best) < tolerance
    assert torch.allclose(B.T @ B, torch.eye(rank), atol=1e-5) and torch.allclose(A @ A.T, torch.eye(rank), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_factors_are_near_optimal_on_a_flat_spectrum(seed):
    """The sign of a sum over many tokens is nearly ±1 noise: no gap, so no unique top-r subspace to
    match; the Frobenius error must still be within 2% of Eckart–Young's optimum (0.5% is typical here)."""
    grad_sum = torch.randn(256, 192, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    best, _ = exact_truncation(grad_sum, 8, 1.0)
    step = -torch.sign(grad_sum)
    B, R, A = lora_sb_factors(grad_sum, 8, 1.0, seed=seed)
    got = B.double() @ R.double() @ A.double()
    assert torch.linalg.matrix_norm(step - got) <= 1.02 * torch.linalg.matrix_norm(step - best)
    assert torch.linalg.matrix_norm(got) ** 2 >= 0.85 * torch.linalg.matrix_norm(best) ** 2


def test_sign_products_read_the_sign_a_block_at_a_time_and_leave_the_sum_alone():
    grad_sum = torch.randn(37, 23, generator=torch.Generator().manual_seed(4)).bfloat16()
    kept = grad_sum.clone()
    times, times_transposed = sign_products(grad_sum, block_elements=100)  # blocks of 4 rows
    x, y = torch.randn(23, 5), torch.randn(37, 5)
    sign = torch.sign(grad_sum).float()
    assert torch.allclose(times(x), sign @ x, atol=1e-5) and torch.allclose(times_transposed(y), sign.T @ y, atol=1e-5)
    assert torch.equal(grad_sum, kept)
    large = torch.randn(256, 192, generator=torch.Generator().manual_seed(5)).bfloat16()  # the randomized path
    kept = large.clone()
    B, R, A = lora_sb_factors(large, 8, 1.0)
    assert torch.equal(large, kept) and B.dtype == R.dtype == A.dtype == torch.float32


def test_randomized_factors_are_seeded():
    grad_sum = torch.randn(256, 192, generator=torch.Generator().manual_seed(3))
    first, again, other = (lora_sb_factors(grad_sum, 8, 1.0, seed=s)[0] for s in (5, 5, 6))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("factory,targets", [(tiny_bert, BERT_TARGETS), (tiny_llama, LLAMA_TARGETS)])
def test_init_is_the_truncated_svd_of_the_sign_step(factory, targets):
    model = factory()
    batches = random_batches(5, count=3)
    names = target_linear_names(model, targets)
    # the gradient sum, computed here without fedsim: autograd on the un-adapted model
    weights = [model.get_submodule(n).weight for n in names]
    expected_grads = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, weights)
        for total, g in zip(expected_grads, grads):
            total += g.double()
    lr = 2e-3
    method = make_method("fed-sb", rank=RANK, train_head=False)
    grad_sums = accumulate_gradients(model, names, batches)
    for name, g in zip(names, expected_grads):
        assert grad_sums[name].dtype == torch.float32 and torch.allclose(grad_sums[name].double(), g, atol=1e-6)
    method.prepare(model, targets)
    state = method.init_state(model, grad_sums, init_lr=lr)
    method.load_state(model, state)
    layers = adapted_layers(model)
    assert list(layers) == names
    for name, g in zip(names, expected_grads):
        best, S = exact_truncation(g, RANK, lr)
        got = layers[name].delta_weight()
        exact_path = 2 * (RANK + OVERSAMPLE) >= min(g.shape)
        assert relative(got, best) < (1e-5 if exact_path else randomized_svd_tolerance(S, RANK, min(g.shape)))
        step = -lr * torch.sign(g)
        assert torch.linalg.matrix_norm(step - got) <= 1.01 * torch.linalg.matrix_norm(step - best)
        R = layers[name].lora_R.weight
        assert torch.allclose(R, torch.diag(torch.diagonal(R)))  # R = diag(S_r), B and A orthonormal
        B, A = layers[name].lora_B.weight.double(), layers[name].lora_A.weight.double()
        assert torch.allclose(B.T @ B, torch.eye(RANK, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-5)


def test_accumulate_gradients_leaves_the_model_as_it_was():
    model = tiny_bert()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    accumulate_gradients(model, target_linear_names(model, BERT_TARGETS), random_batches(1, count=1))
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_layer_output_is_base_plus_B_R_A():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoraSBLinear(base, 3)
    for module in (layer.lora_A, layer.lora_R, layer.lora_B):
        torch.nn.init.normal_(module.weight)
    x = torch.randn(2, 6)
    expected = base(x) + x @ (layer.lora_B.weight @ layer.lora_R.weight @ layer.lora_A.weight).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_R.weight"]
    assert list(layer.lora_R.buffers()) == [] and list(layer.lora_R.children()) == []  # what Opacus needs


def test_opacus_computes_per_sample_gradients_of_R():
    from opacus import GradSampleModule

    model = tiny_bert()
    method = make_method("fed-sb", rank=RANK)
    method.prepare(model, BERT_TARGETS)
    method.trainable_parameters(model, 0)
    gsm = GradSampleModule(model.train())
    batch = random_batches(2, batch_size=3, count=1)[0]
    gsm(**batch).loss.backward()
    R = adapted_layers(model)["bert.encoder.layer.0.attention.self.query"].lora_R.weight
    assert R.grad_sample.shape == (3, RANK, RANK)
    assert torch.allclose(R.grad_sample.sum(0) / 3, R.grad, atol=1e-6)


def test_injection_replaces_only_the_targets():
    model = tiny_llama()
    names = inject_lora_sb(model, ["q_proj", "v_proj"], RANK)
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), LoraSBLinear) for n in names)
    assert not isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), LoraSBLinear)
