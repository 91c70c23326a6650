"""DP-SGD through Opacus on real text (BBC News, MiniLM's tokenizer): clipping, noise, accounting."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from reference_training import PrivateStep
from tiny_models import BERT_TARGETS, tiny_bert, make_method

from fedsim.adapters import adapted_layers
from fedsim.privacy import PrivacySettings, poisson_batches, private_gradient_sum
from fedsim.privacy_accounting import BudgetSpent, calibrate_noise, calibrate_noise_for_clients, epsilon_spent, worst_case_epsilon

C = 0.05  # small enough that real per-sample gradients get clipped


@pytest.fixture(scope="module")
def real_batch():
    """16 real BBC News documents, tokenised with MiniLM's real tokenizer (ids folded into the tiny model's vocabulary)."""
    from transformers import AutoTokenizer

    from fedsim.config import resolve_model_path
    from workloads import load_workload

    workload = load_workload("bbc-news", train_limit=16, eval_limit=4, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    batch = tokenizer(workload.train.column("text").to_pylist(), truncation=True, max_length=24, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"] % 64, "attention_mask": batch["attention_mask"],
            "labels": torch.tensor(workload.train.column("label").to_pylist()) % 3}


def fed_sb_model():
    model = tiny_bert()
    method = make_method("fed-sb", rank=4)
    method.prepare(model, BERT_TARGETS)
    generator = torch.Generator().manual_seed(0)
    for layer in adapted_layers(model).values():  # a non-trivial adapter, so R has real gradients
        for module in (layer.lora_A, layer.lora_B, layer.lora_R):
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * 0.5
    params = list(method.trainable_parameters(model, 0).values())
    for module in model.modules():  # no dropout: the per-sample gradients are compared across passes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train(), params


def dp_gradient(model, params, batch, sigma, seed=0, expected_batch_size=None):
    """The gradient DP-SGD applies for ``batch`` (after clipping, noise and averaging), without stepping."""
    optimizer = torch.optim.SGD(params, lr=0.0)
    size = len(batch["labels"]) if batch is not None else 1
    step = PrivateStep(model, optimizer, params, PrivacySettings(sigma, C, 0.5, expected_batch_size or size), seed)
    try:
        step.loss(batch)
        step.optimizer.pre_step()
        return [p.grad.detach().clone() for p in params]
    finally:
        step.close()


def raw_sample_gradients(model, params, batch):
    grads = []
    for i in range(len(batch["labels"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad()
        model(**one).loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
    model.zero_grad()
    return grads


def flat_norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


def test_every_clipped_per_sample_gradient_is_within_the_clip_norm(real_batch):
    model, params = fed_sb_model()
    raw = raw_sample_gradients(model, params, real_batch)
    raw_norms = [flat_norm(g) for g in raw]
    assert max(raw_norms) > C  # clipping is active on these real batches
    for i in range(len(raw)):  # each sample alone: DP-SGD's gradient is exactly the clipped per-sample gradient
        one = {k: v[i : i + 1] for k, v in real_batch.items()}
        clipped = dp_gradient(model, params, one, sigma=0.0)
        assert flat_norm(clipped) <= C * (1 + 1e-5)
        expected = [g * min(1.0, C / raw_norms[i]) for g in raw[i]]
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(clipped, expected))
    # the whole batch: the mean of the clipped per-sample gradients, each clipped to C over all tensors together
    batch_grad = dp_gradient(model, params, real_batch, sigma=0.0)
    expected = [sum(g[j] * min(1.0, C / n) for g, n in zip(raw, raw_norms)) / len(raw) for j in range(len(params))]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(batch_grad, expected))


def test_the_noise_has_the_standard_deviation_sigma_c_over_the_batch(real_batch):
    model, params = fed_sb_model()
    sigma, batch_size = 1.7, 8
    noise = torch.cat([torch.cat([g.flatten() for g in dp_gradient(model, params, None, sigma, seed, batch_size)]) for seed in range(40)])
    expected_std = sigma * C / batch_size
    n = noise.numel()
    assert n > 5000
    # sample std of n Gaussians: relative standard error 1/sqrt(2n); 5 of them is a test that can fail
    assert abs(noise.std().item() / expected_std - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(n)
    # a different sigma is told apart
    assert abs(noise.std().item() / (1.2 * expected_std) - 1) > 5 / math.sqrt(2 * n)


def test_only_the_trained_tensors_are_noised(real_batch):
    model, params = fed_sb_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD(params, lr=1.0)
    step = PrivateStep(model, optimizer, params, PrivacySettings(5.0, C, 0.5, 4), 0)
    step.loss(real_batch)
    step.optimizer.step()
    step.close()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_opacus_accounting_of_the_history(accountant):
    history = [(1.1, 0.05, 20), (1.1, 0.05, 20), (0.9, 0.1, 5)]
    direct = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for sigma, q, steps in history:
        for _ in range(steps):
            direct.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_spent(history, 1e-5, accountant) == pytest.approx(direct.get_epsilon(delta=1e-5), rel=1e-3)


@pytest.mark.parametrize("target", [1.0, 3.0])
def test_calibrated_noise_meets_the_target_also_after_a_private_init(target):
    sigma = calibrate_noise(target, 1e-5, 0.1, 100)
    assert target - 0.05 <= epsilon_spent([(sigma, 0.1, 100)], 1e-5) <= target
    init = [(20.0, 1.0, 1)]
    sigma_after = calibrate_noise(target, 1e-5, 0.1, 100, spent=init)
    assert sigma_after > sigma
    assert target - 0.05 <= epsilon_spent([*init, (sigma_after, 0.1, 100)], 1e-5) <= target


def clients_of_a_run(steps=lambda n: 30):
    """(history, rate, steps to go) of 12 clients of sizes 20..130 (q = 8/n): a private init at q = 2/n, then 0, 1 or 2
    rounds of 10 steps."""
    clients = []
    for i, n in enumerate(range(20, 140, 10)):
        rounds = [0, 1, 2][i % 3]
        history = [(25.0, 2 / n, 1)] + [(1.2, 8 / n, 10)] * rounds
        clients.append((history, 8 / n, steps(n)))
    return clients


@pytest.mark.parametrize("steps", [lambda n: 30, lambda n: 3 * math.ceil(n / 8)], ids=["same steps", "local epochs"])
def test_worst_case_epsilon_is_the_largest_over_every_client(steps):
    clients = clients_of_a_run(steps)
    brute_force = max(epsilon_spent([*history, (1.5, rate, n)], 1e-5) for history, rate, n in clients)
    assert worst_case_epsilon(clients, 1.5, 1e-5) == pytest.approx(brute_force, rel=1e-12)


@pytest.mark.parametrize("steps", [lambda n: 30, lambda n: 3 * math.ceil(n / 8)], ids=["same steps", "local epochs"])
def test_noise_calibrated_for_every_client_keeps_each_within_the_target(steps):
    target, delta = 8.0, 1e-5  # the clients have spent up to ε ≈ 5.5
    clients = clients_of_a_run(steps)
    sigma = calibrate_noise_for_clients(target, delta, clients)
    reached = [epsilon_spent([*history, (sigma, rate, n)], delta) for history, rate, n in clients]
    assert target - 0.02 <= max(reached) <= target  # the most exposed client ends at the target, no client above
    alone = [calibrate_noise(target, delta, rate, n, spent=history) for history, rate, n in clients[-3:]]
    assert sigma >= max(alone) - 1e-6  # at least what each client needs by itself
    with pytest.raises(BudgetSpent) as spent:  # a client that has spent the target already: no σ helps
        calibrate_noise_for_clients(max(epsilon_spent(h, delta) for h, _, _ in clients) - 1e-3, delta, clients)
    assert spent.value.epsilon == pytest.approx(max(epsilon_spent(h, delta) for h, _, _ in clients))


def test_poisson_batches_sample_each_record_with_the_rate():
    class Rows:
        def __len__(self):
            return 1000

        def batch(self, indices):
            return {"labels": torch.as_tensor(indices)}

    sizes = [0 if b is None else len(b["labels"]) for _, b in zip(range(200), poisson_batches(Rows(), 0.02, 1))]
    assert abs(np.mean(sizes) - 20) < 2 and len(set(sizes)) > 5
    assert [b is None for _, b in zip(range(50), poisson_batches(Rows(), 0.0005, 2))].count(True) > 20


def test_private_init_gradient_is_clipped_per_sample_then_noised(real_batch):
    model = tiny_bert().train()
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    quiet = private_gradient_sum(model, names, [real_batch], max_grad_norm=C, noise_multiplier=0.0, seed=0)
    assert flat_norm(list(quiet.values())) <= len(real_batch["labels"]) * C * (1 + 1e-6)
    noisy = private_gradient_sum(model, names, [real_batch], max_grad_norm=C, noise_multiplier=2.0, seed=0)
    noise = torch.cat([(noisy[n] - quiet[n]).flatten() for n in names])
    assert abs(noise.std().item() / (2.0 * C) - 1) < 0.05


# --- causal LMs: a record's gradient is that of its own mean token loss --------------------------

LENGTHS = [3, 40, 9, 22]  # very different token counts: under a batch token-mean these would weigh 3 to 40


def causal_fed_sb_model():
    from tiny_models import LLAMA_TARGETS, tiny_causal_llama

    model = tiny_causal_llama()
    method = make_method("fed-sb", rank=4)
    method.prepare(model, LLAMA_TARGETS)
    generator = torch.Generator().manual_seed(0)
    for layer in adapted_layers(model).values():
        for module in (layer.lora_A, layer.lora_B, layer.lora_R):
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * 0.5
    return model.train(), list(method.trainable_parameters(model, 0).values())


def test_causal_lm_dp_sgd_clips_each_records_own_gradient_and_averages_them():
    from tiny_models import causal_batch

    model, params = causal_fed_sb_model()
    batch = causal_batch(LENGTHS)
    raw = []
    for i, n in enumerate(LENGTHS):  # each record alone, unpadded: the gradient of its own mean token loss
        one = {k: v[i : i + 1, :n] for k, v in batch.items()}
        model.zero_grad()
        model(**one).loss.backward()
        raw.append([p.grad.detach().clone() for p in params])
    model.zero_grad()
    raw_norms = [flat_norm(g) for g in raw]
    assert max(raw_norms) > C  # clipping is active
    optimizer = torch.optim.SGD(params, lr=0.0)
    step = PrivateStep(model, optimizer, params, PrivacySettings(0.0, C, 0.5, len(LENGTHS)), 0)
    try:
        step.loss(batch)
        per_sample = [[p.grad_sample[i].detach().clone() for p in params] for i in range(len(LENGTHS))]
        step.optimizer.pre_step()
        batch_grad = [p.grad.detach().clone() for p in params]
    finally:
        step.close()
    for sample, own, norm in zip(per_sample, raw, raw_norms):  # what Opacus clips is the record's own gradient
        assert close(sample, own)
        assert flat_norm([g * min(1.0, C / norm) for g in sample]) <= C * (1 + 1e-4)
    expected = [sum(g[j] * min(1.0, C / n) for g, n in zip(raw, raw_norms)) / len(raw) for j in range(len(params))]
    assert close(batch_grad, expected)


def close(tensors, reference, rtol=1e-4):
    """Equal up to float32 rounding, over all tensors together (padding changes the order of the sums)."""
    return flat_norm([a.double() - b.double() for a, b in zip(tensors, reference)]) <= rtol * flat_norm(reference)


def test_causal_lm_private_init_sums_each_records_clipped_own_gradient():
    from tiny_models import causal_batch, tiny_causal_llama

    model = tiny_causal_llama().train()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    batch = causal_batch(LENGTHS, seed=1)
    weights = [model.get_submodule(name).weight for name in names]
    expected = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    norms = []
    for i, n in enumerate(LENGTHS):
        model.zero_grad()
        model(**{k: v[i : i + 1, :n] for k, v in batch.items()}).loss.backward()
        grads = [w.grad.double() for w in weights]
        norms.append(flat_norm(grads))
        for total, g in zip(expected, grads):
            total += g * min(1.0, C / norms[-1])
    model.zero_grad()
    assert max(norms) > C
    quiet = private_gradient_sum(model, names, [batch], max_grad_norm=C, noise_multiplier=0.0, seed=0)
    assert close([quiet[name] for name in names], expected)
