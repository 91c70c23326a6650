"""fedsim.training under DP: K private clients in one pass get, each, what DP-SGD through Opacus gives it alone.

Real text of different lengths through the real MiniLM tokenizer (tests/training/test_engine.py's clients), a small BERT and a
small Llama causal LM, ``model.dropout: 0``, float64 (what is compared is the algorithm, not rounding). The reference
is one client alone through Opacus (``tests/reference_training.py``: ``run_client`` with ``PrivacySettings``, ``PrivateStep``:
Opacus's GradSampleModule and DPOptimizer); the engine runs K = 1 too. No Ray.
"""

import math

import pytest
import torch

from fedsim.training.batches import cohort_batch, record_passes, record_widths
from fedsim.training.engine import train_clients
from fedsim.training.losses import record_losses
from fedsim.training.private import clipped_records, noise_client_sums
from fedsim.training.stacking import Segments, stack_clients, stacked_forward
from fedsim.config import TrainConfig
from fedsim.data import InstructionRows, TokenizedRows
from fedsim.methods import METHODS
from fedsim.modeling import load_tokenizer
from fedsim.privacy import PrivacySettings, poisson_batches
from reference_training import PrivateStep, run_client
from test_engine import (FLOAT64, LLAMA_TARGETS, RANKS, assert_same_upload, client_tables, float64_causal_loss, initial_state, instruction_tables,
                         llama_dirs, one_thread, prepared, relative_error)

__all__ = ["llama_dirs", "one_thread"]  # fixtures, used by name

SETTINGS = TrainConfig(local_steps=3, batch_size=4, lr=5e-3, weight_decay=0.01, schedule="linear", warmup_steps=1)
RATES = [0.8, 0.5, 0.15, 0.4, 0.6, 0.5, 0.4]  # Poisson rates per client: client 2 (3 records at 0.15) often draws none
CLIP = [0.05, 0.1, 0.02, 1.0, 0.05, 0.05, 0.05]  # C per client: clipping active for most records, not all


def privacy_settings(rows, sigma):
    return [PrivacySettings(sigma, CLIP[i], RATES[i], max(1, round(RATES[i] * len(r)))) for i, r in enumerate(rows)]


def compare_private(model, method, state, rows, sigma, steps, cohort_sizes=(1, 2, 7), task="classification", tolerance=FLOAT64):
    """Every client alone through Opacus (``run_client`` with its PrivacySettings, its training seed), then in cohorts:
    each client's upload, steps and losses the same."""
    privacy = privacy_settings(rows, sigma)
    seeds = [100 + i for i in range(len(rows))]

    def batches(i):
        return poisson_batches(rows[i], privacy[i].sample_rate, 10 + i)

    solo = [run_client(model, method, state, 0, batches(i), SETTINGS, seeds[i], RANKS[i], privacy[i], steps[i]) for i in range(len(rows))]
    assert any(math.isnan(loss) for _, stats in solo for loss in stats.losses)  # an empty Poisson batch was drawn (noise only)
    for K in cohort_sizes:
        together = []
        for first in range(0, len(rows), K):
            chunk = list(range(first, min(len(rows), first + K)))
            together += train_clients(model, method, 0, [state] * len(chunk), [RANKS[i] for i in chunk], [batches(i) for i in chunk], SETTINGS,
                                      [steps[i] for i in chunk], seed=7, task=task, privacy=[privacy[i] for i in chunk],
                                      noise_seeds=[seeds[i] for i in chunk])
        for i, ((solo_upload, solo_stats), result) in enumerate(zip(solo, together)):
            upload, stats = result.upload, result.stats
            where = f"{method.name} σ={sigma} K={K} client {i}"
            assert_same_upload(upload, solo_upload, where, tolerance)
            assert stats.steps == solo_stats.steps == steps[i], where
            assert stats.losses == pytest.approx(solo_stats.losses, rel=1e-10, nan_ok=True), where
    return solo


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_private_cohorts_with_sigma_zero_equal_opacus_for_every_method(tiny_model_dir, method_name):
    """σ = 0: what is compared is each record's clipped gradient (to its own client's C), summed and divided by the
    client's expected batch size; Poisson batches (empty ones too), rank-heterogeneous clients, the head trained,
    different steps per client, records of different lengths in passes planned over records. float64, ``FLOAT64``
    (measured: 3.4e-13)."""
    config, model, method = prepared(tiny_model_dir, method_name)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    solo = compare_private(model, method, initial_state(model, method, rows[3]), rows, 0.0, [3, 2, 3, 4, 1, 3, 3])
    assert any(relative_error(a, b) > 1e-3 for a, b in zip(solo[0][0].values(), solo[4][0].values()))  # the clients did differ


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "ffa-lora", "fedsvd"])
def test_private_cohorts_draw_each_clients_own_opacus_noise(tiny_model_dir, method_name):
    """σ = 0.8: each client's noise comes from its own training seed's generator, drawn tensor by tensor at its own
    shape, so a cohort reproduces Opacus's DP-SGD of the client alone, noise included, whatever shares its cohort."""
    config, model, method = prepared(tiny_model_dir, method_name)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    compare_private(model, method, initial_state(model, method, rows[3]), rows, 0.8, [3] * len(rows))


def test_private_ravan_cohorts_with_noise(tiny_model_dir):
    """Ravan with 2 heads (rank 2; clients of rank 3 and 1 cut one): σ = 0.8, against Opacus, whose R is a plain
    nn.Linear called once a head; R's entries off the blocks take noise in both, and neither sends them."""
    config, model, method = prepared(tiny_model_dir, "ravan", **{"method.ravan_heads": 2})
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    compare_private(model, method, initial_state(model, method, rows[3]), rows, 0.8, [3] * len(rows))


def test_private_causal_lm_cohorts(llama_dirs):
    """A small Llama causal LM (adapters on all seven projections), each record's own mean token loss over its response
    tokens, prompts and responses of different lengths; σ = 0 and σ = 0.8; float64."""
    config, model, method = prepared(llama_dirs["causal"], "fed-sb", task="causal-lm", targets=LLAMA_TARGETS, **{"workload.max_length": 32})
    rows = [InstructionRows(table, load_tokenizer(config), 32, "response") for table in instruction_tables()]
    state = initial_state(model, method, rows[3])
    for sigma in (0.0, 0.8):
        compare_private(model, method, state, rows, sigma, [3] * len(rows), cohort_sizes=(7,), task="causal-lm")


def per_sample_gradients(model, method, state, ranks, batches, task, max_norms):
    """(raw, clipped): each record's gradient over its client's trained tensors (key → list over records, own shapes)
    from one per-sample cohort pass, before and after `clipped_records`."""
    cohort = stack_clients(model, method, 0, [state] * len(batches), ranks)
    inputs, labels, sizes = cohort_batch(batches, model.config.pad_token_id or 0)
    model.train()
    with stacked_forward(cohort):
        segments = cohort.current[0] = Segments(sizes, list(range(len(batches))), len(batches), torch.device("cpu"), per_sample=True)
        losses = record_losses(model(**inputs).logits, labels, task)
        gradients = torch.autograd.grad(losses.sum(), [leaf for _, leaf in segments.samples])
        raw = {key: g.clone() for (key, _), g in zip(segments.samples, gradients)}
        clipped = clipped_records(segments, list(gradients), max_norms)
    model.eval()
    owners = segments.row_client.tolist()
    shapes = cohort.shapes

    def own(tensors):
        return [{key: t[n][tuple(slice(0, d) for d in shapes[owners[n]][key])] for key, t in tensors.items()} for n in range(len(owners))]

    return own(raw), own(clipped), owners


def flat_norm(tensors: dict) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_every_records_gradient_is_its_own_and_clipped_to_its_clients_norm(tiny_model_dir, llama_dirs, task):
    """Each record's per-sample gradient (per-row copies of its client's stacked tensors) equals the gradient of its own
    loss computed alone, unpadded, one record at a time (1e-12, float64); clipped, it is min(1, C_k/‖g‖)·g over all of
    its client's tensors together (Opacus's C/(‖g‖ + 1e-6): 1e-12 against that, 1e-6/‖g‖ against the exact factor)
    and never above C_k. 4 clients of different ranks, lengths and clip norms, the head trained."""
    if task == "classification":
        config, model, method = prepared(tiny_model_dir, "fedit")
        rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()[:4]]
    else:
        config, model, method = prepared(llama_dirs["causal"], "fedit", task="causal-lm", targets=LLAMA_TARGETS, **{"workload.max_length": 32})
        model.loss_function = float64_causal_loss
        rows = [InstructionRows(table, load_tokenizer(config), 32, "response") for table in instruction_tables()[:4]]
    state = initial_state(model, method, rows[3])
    generator = torch.Generator().manual_seed(0)
    state = {key: value + 0.05 * torch.randn(value.shape, generator=generator, dtype=value.dtype) for key, value in state.items()}  # B ≠ 0
    ranks, max_norms = [4, 2, 3, 4], [0.05, 0.5, 0.01, 100.0]
    batches = [rows[k].batch(range(min(3, len(rows[k])))) for k in range(4)]
    raw, clipped, owners = per_sample_gradients(model, method, state, ranks, batches, task, max_norms)
    scaled = []
    n = 0
    for k, batch in enumerate(batches):
        method.load_state(model, state, ranks[k])
        params = method.trainable_parameters(model, 0)
        model.train()
        for j in range(len(batch["input_ids"])):
            width = int(record_widths(batch, batch["labels"])[j])
            one = {key: value[j : j + 1, :width] if value.dim() >= 2 else value[j : j + 1] for key, value in batch.items()}
            model.zero_grad(set_to_none=True)
            model(**one).loss.backward()
            alone = {key: p.grad for key, p in params.items()}
            assert owners[n] == k
            for key, grad in alone.items():
                assert relative_error(raw[n][key], grad) <= 1e-12, (k, j, key)
            norm = flat_norm(alone)
            assert flat_norm(clipped[n]) <= max_norms[k] * (1 + 1e-12)
            opacus_factor, exact_factor = min(1.0, max_norms[k] / (norm + 1e-6)), min(1.0, max_norms[k] / norm)
            for key, grad in alone.items():
                assert relative_error(clipped[n][key], grad * opacus_factor) <= 1e-12, (k, j, key)
                assert relative_error(clipped[n][key], grad * exact_factor) <= 1e-6 / norm + 1e-12, (k, j, key)
            scaled.append(exact_factor < 1.0)
            n += 1
        model.eval()
    assert n == len(owners) and any(scaled) and not all(scaled)  # clipping both active and not


def test_each_clients_noise_is_sigma_c_over_b_independent_and_opacus_own(tiny_model_dir):
    """Empty sums, 3 clients (ranks 4, 2, 4; σ, C, B their own), 300 steps of noise: each client's noise has std σC/B
    (5 standard errors: a test that a 20% error fails) and mean 0; clients 0 and 2 are uncorrelated; a client's padding
    (beyond its rank) gets none; and client k's noise is, number for number, what Opacus's DPOptimizer draws for it
    alone (an empty batch through PrivateStep, the same seed), also when the cohort is another."""
    config, model, method = prepared(tiny_model_dir, "fed-sb")
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()[:3]]
    state = initial_state(model, method, rows[0])
    ranks, seeds = [4, 2, 4], [11, 12, 13]
    privacy = [PrivacySettings(0.5, 0.3, 0.1, 4), PrivacySettings(1.0, 0.1, 0.1, 7), PrivacySettings(2.0, 0.05, 0.1, 2)]
    cohort = stack_clients(model, method, 0, [state] * 3, ranks)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    draws = []
    for _ in range(300):
        sums = {key: torch.zeros_like(t) for key, t in cohort.trained.items()}
        noise_client_sums(cohort, sums, [0, 1, 2], privacy, generators)
        draws.append(sums)
    flat = []
    for k in range(3):
        own = torch.cat([d[key][k][tuple(slice(0, n) for n in cohort.shapes[k][key])].flatten() for d in draws for key in cohort.order])
        expected = privacy[k].noise_multiplier * privacy[k].max_grad_norm / privacy[k].expected_batch_size
        n = own.numel()
        assert n > 20_000
        assert abs(own.std().item() / expected - 1) < 5 / math.sqrt(2 * n)
        assert abs(own.std().item() / (1.2 * expected) - 1) > 5 / math.sqrt(2 * n)
        assert abs(own.mean().item()) < 5 * expected / math.sqrt(n)
        flat.append(own)
    correlation = torch.corrcoef(torch.stack([flat[0], flat[2]]))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(flat[0].numel())
    padded = [key for key in cohort.order if cohort.shapes[1][key] != cohort.trained[key].shape[1:]]
    assert padded
    for d in draws:
        for key in padded:
            outside = d[key][1].clone()
            outside[tuple(slice(0, n) for n in cohort.shapes[1][key])] = 0
            assert not outside.any()

    for k in range(3):  # the first draw is Opacus's own for the client alone
        method.load_state(model, state, ranks[k])
        params = method.trainable_parameters(model, 0)
        step = PrivateStep(model, torch.optim.SGD(list(params.values()), lr=0.0), list(params.values()), privacy[k], seeds[k])
        try:
            step.loss(None)
            step.optimizer.pre_step()
            for key, p in params.items():
                assert torch.equal(draws[0][key][k][tuple(slice(0, n) for n in p.shape)], p.grad), (k, key)
        finally:
            step.close()
    alone = stack_clients(model, method, 0, [state], [ranks[2]])  # client 2 in a cohort of its own
    sums = {key: torch.zeros_like(t) for key, t in alone.trained.items()}
    noise_client_sums(alone, sums, [0], [privacy[2]], [torch.Generator().manual_seed(seeds[2])])
    assert all(torch.equal(sums[key][0], draws[0][key][2]) for key in alone.order)


def test_records_are_planned_in_passes_by_their_own_length():
    assert record_passes([3, 40, 5, 38, 4, 39], pass_cost=32) == [[0, 2, 4], [1, 3, 5]]
    assert record_passes([3, 40, 5, 38], pass_cost=10_000) == [[0, 1, 2, 3]]
    assert record_passes([7, 7, 7], pass_cost=0) == [[0, 1, 2]]  # equal lengths share a pass
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8], [5, 0, 0, 0]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    assert record_widths(inputs, torch.tensor([0, 1, 1])).tolist() == [2, 4, 1]
    labels = torch.tensor([[-100, 6, -100, 9], [5, 6, 7, 8], [-100, -100, -100, -100]])  # a label past the mask keeps its place
    assert record_widths(inputs, labels).tolist() == [4, 4, 1]


def test_an_empty_batch_without_privacy_is_refused(tiny_model_dir):
    config, model, method = prepared(tiny_model_dir, "fed-sb")
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()[:2]]
    state = initial_state(model, method, rows[0])
    with pytest.raises(ValueError, match="empty batch"):
        train_clients(model, method, 0, [state] * 2, [None] * 2, [iter([None] * 3), rows[1].batches(4, 0)], SETTINGS, [3, 3], seed=0)
