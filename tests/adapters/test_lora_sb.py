"""The LoRA-SB layer, its injection and its update-approximation initialisation, on real transformer layers."""

import pytest
import torch
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, random_batches, tiny_bert, tiny_llama, make_method

from fedsim.adapters import LoraSBLinear, accumulate_gradients, adapted_layers, inject_lora_sb, target_linear_names

RANK = 4


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
    method.prepare(model, targets)
    state = method.init_state(model, grad_sums, init_lr=lr)
    method.load_state(model, state)
    layers = adapted_layers(model)
    assert list(layers) == names
    for name, g in zip(names, expected_grads):
        U, S, Vh = torch.linalg.svd(-lr * torch.sign(g), full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        got = layers[name].delta_weight()
        assert (torch.linalg.matrix_norm(got - best) / torch.linalg.matrix_norm(best)).item() < 1e-4
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
