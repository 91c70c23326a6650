"""Cohort-batched training: K clients of a round trained together, in one forward and backward pass a step.

The clients of a worker share its frozen base model and differ only in small tensors (their adapters, and
the classification head where it is trained), so one pass through the base model can train them all:

- Every adapted layer holds the K clients' trained tensors stacked along a first, client dimension (Fed-SB:
  R as K×r×r; FedIT: A as K×r×k and B as K×d×r; FFA: B), and a frozen tensor once where every client has
  the same (Fed-SB's B and A). A trained head's ``nn.Linear`` is stacked too (K×out×in): each client its own.
- The cohort's batch is the clients' batches one after the other, right-padded to the longest sequence
  (attention mask 0, labels −100), so client k's examples are one contiguous segment of rows. A stacked
  tensor meets its segment by a batched matmul over the K segments: a view of the activations when the
  segments hold equally many examples, else one zero-padded copy (of the low-rank activations where the
  first factor is shared, as Fed-SB's A is). Where the clients' batches differ much in length, a step
  is split into a few passes of clients of similar lengths (`plan_passes`), so that padding does not
  cost more than another pass would; their gradients add up to the one pass's.
- The loss is Σ_k (client k's own mean loss): classification, the mean cross-entropy over its examples;
  causal LM, the mean over its labelled tokens (what the model's own loss is on the client's batch alone).
  Client k's tensors touch only its rows, so its gradient is its solo gradient.
- AdamW is elementwise, so one AdamW over the stacked tensors is K AdamWs (`StackedAdamW`: torch's AdamW
  arithmetic, with a learning rate per client for clients whose schedules differ); ``max_grad_norm`` clips
  each client's slice by its own norm. A client that has taken its steps (its own number: ``train.local_epochs``
  gives each client its own) has its slice copied out then, and its rows leave the batch.
- Clients of different ranks share a cohort: tensors are stacked at the cohort's largest rank r_c,
  zero-padded, and a rank mask zeroes client k's components beyond r_k after every factor but the last,
  so a layer computes ``B[:, :r_k] R_k A[:r_k] x`` exactly and the padding gets no gradient. Each client's product is
  multiplied by its own scaling (``Method.client_scaling``: alpha/r_k under ``clients.rank_scaling=own``).

Method-agnostic: for each client the method loads that client's state (``load_state``, with the client's
rank) and names what it trains (``trainable_parameters``); after training each client's slice is copied
back into the model and the method builds the upload (``upload``): the calls a lone client makes. A state
may differ per client (personalised methods). What no client trains must be the same for all of a cohort
(W0 + ``base_delta``, which is therefore loaded once; the head where it is not trained); a frozen adapter
tensor that differs between clients is stacked like a trained one.

The adapted layers' (and trained head's) ``forward`` is replaced for the cohort's pass only, in one place
(`stacked_forward`), and restored after. ``train_s``: the clients train at once, so each client's share of
the cohort's wall time is in proportion to the tokens (attention-mask ones) it trained.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.adapters.layers import adapted_layers, adapted_modules, leading_block
from fedsim.adapters.state import State, pad_to, state_key
from fedsim.methods.base import Method
from fedsim.config import TrainConfig
from fedsim.data import per_example_loss
from fedsim.privacy import PrivacySettings
from fedsim.training.schedule import TrainStats, lr_factor

IGNORE_INDEX = -100
TASKS = ("classification", "causal-lm")
FACTOR_ORDER = ("lora_A", "lora_R", "lora_B")  # x → A → R → B
# What one more pass of a step costs, counted in padded tokens: a pass's fixed work (kernel launches, Python) against
# the work of a token. Rough: on a CPU a token of MiniLM is ~0.5 ms and a pass's overhead a few ms; on a GPU a pass of
# a 1B model costs some ms of launches, the time of a few thousand tokens. bench/cohort.py and bench/gpu.py measure.
PASS_COST_TOKENS = {"cpu": 32, "cuda": 2048}


# -- where each client's rows sit in the cohort's batch --------------------------------------------------
class Segments:
    """The cohort batch's rows, client after client: ``sizes[i]`` rows of the i-th active client.

    ``clients`` are the active clients' indices into the stacked tensors (a client that has taken its
    steps is no longer in the batch). `pack` turns rows (N, …, f) into (active clients, rows×…, f) for a
    batched matmul; `unpack` undoes it.

    ``per_sample`` (DP-SGD): every row is multiplied by its own copy of its client's slice (`per_row`), and
    the copies of trained tensors are leaves, recorded in ``samples``: their gradient is each record's own.
    """

    def __init__(self, sizes: list[int], clients: list[int], num_clients: int, device: torch.device, per_sample: bool = False):
        self.sizes = sizes
        self.count = len(sizes)
        self.longest = max(sizes)
        self.equal = all(n == self.longest for n in sizes)
        # built on the CPU and copied once: no device round trip per step
        self.index = None if clients == list(range(num_clients)) else torch.tensor(clients).to(device)
        example_client = [i for i, n in enumerate(sizes) for _ in range(n)]
        self.example_client = torch.tensor(example_client).to(device)
        if not self.equal:  # each row's place in the zero-padded layout (count × longest rows)
            self.rows = torch.tensor([i * self.longest + j for i, n in enumerate(sizes) for j in range(n)]).to(device)
        self.samples: list[tuple[str, torch.Tensor]] | None = [] if per_sample else None
        if per_sample:  # each row's client, as an index into the stacked tensors
            self.row_client = torch.tensor([clients[i] for i, n in enumerate(sizes) for _ in range(n)]).to(device)

    def select(self, stacked: torch.Tensor) -> torch.Tensor:
        """The active clients' slices of a stacked tensor."""
        return stacked if self.index is None else stacked.index_select(0, self.index)

    def pack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """(N, …, f) → (clients, longest·…, f), and the shape to `unpack` to."""
        if self.equal:
            return x.reshape(self.count, -1, x.shape[-1]), x.shape[:-1]
        padded = x.new_zeros((self.count * self.longest, *x.shape[1:])).index_copy(0, self.rows, x)
        return padded.reshape(self.count, -1, x.shape[-1]), x.shape[:-1]

    def unpack(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.equal:
            return y.reshape(*shape, y.shape[-1])
        return y.reshape(self.count * self.longest, *shape[1:], y.shape[-1]).index_select(0, self.rows)

    def per_example(self, per_client: torch.Tensor, ndim: int) -> torch.Tensor:
        """A (clients, f) tensor repeated for each client's rows, shaped (N, 1, …, f) to broadcast over ``ndim`` dims."""
        rows = per_client.index_select(0, self.example_client)
        return rows.reshape(rows.shape[0], *[1] * (ndim - 2), rows.shape[-1])

    def per_row(self, stacked: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Each row's copy of its client's slice of ``stacked`` (N, …). Where ``key`` names a trained tensor the copy is
        a leaf of its own (recorded in ``samples``): the gradient of Σ_records loss with respect to it is each
        record's own gradient, which nothing else in the batch touches."""
        rows = stacked.detach().index_select(0, self.row_client)
        if key is not None:
            self.samples.append((key, rows.requires_grad_(True)))
        return rows

    @staticmethod
    def row_matmul(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Row n of ``x`` (N, …, in) times its own ``weights[n]``ᵀ ((N, out, in)): (N, …, out)."""
        y = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), weights.transpose(1, 2))
        return y.reshape(*x.shape[:-1], weights.shape[1])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values (N,) summed per client (clients,)."""
        if self.equal:
            return values.reshape(self.count, -1).sum(1)
        return values.new_zeros(self.count).index_add(0, self.example_client, values)


# -- what a cohort pass holds --------------------------------------------------------------------------
@dataclass
class Factor:
    """One factor (A, R or B) of a stacked adapter: (K, out, in) when stacked, else one (out, in) for all."""

    weight: torch.Tensor
    stacked: bool
    key: str | None = None  # the state key where the cohort trains it (``Cohort.trained``)


@dataclass
class StackedLayer:
    """An adapted layer during a cohort pass: ``base(x) + scaling · B R A x`` with per-client factors."""

    module: nn.Module  # the PEFT LoRA layer or LoraSBLinear whose forward is replaced
    base: nn.Module
    factors: list[Factor]
    scaling: float | torch.Tensor  # one for all, or (K, 1): client k's own (clients.rank_scaling=own, ranks below r)
    rank_mask: torch.Tensor | None  # (K, r_c): 1 on client k's first r_k components; None when all ranks are r_c


@dataclass
class StackedLinear:
    """A trained ``nn.Linear`` outside the adapters (the classification head): weight and bias per client or shared."""

    module: nn.Linear
    weight: Factor
    bias: Factor | None


@dataclass
class Cohort:
    """The stacked tensors of K clients: ``trained`` (state key → (K, …) tensor that takes gradients) and the
    layers that use them."""

    trained: dict[str, torch.Tensor]
    layers: list[StackedLayer]
    linears: list[StackedLinear]
    order: list[str]  # the trained keys in the order the method names them (``trainable_parameters``)
    shapes: list[dict[str, torch.Size]]  # per client: each trained tensor's own shape (its rank's block of the stack)
    current: list = field(default_factory=lambda: [None])  # the step's Segments, read by the replaced forwards


# -- the optimiser --------------------------------------------------------------------------------------
class StackedAdamW:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) over tensors whose first dimension is the client.

    AdamW is elementwise, so slice k follows exactly the AdamW client k would run alone. Where every client
    has the same learning rate and weight decay at a step (one schedule for all), the step is torch's own
    AdamW (``torch.optim.adamw.adamw``, the function ``torch.optim.AdamW`` calls: its multi-tensor kernels on
    a GPU); where they differ (clients whose schedules run over different numbers of steps), the same
    arithmetic is applied with a learning rate per slice. Betas (0.9, 0.999) and eps 1e-8: torch's defaults,
    which ``train_local`` uses.
    """

    def __init__(self, params: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.betas, self.eps = betas, eps
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.state_steps = [torch.tensor(0.0) for _ in params]  # as torch.optim.AdamW keeps them

    @torch.no_grad()
    def step(self, lr: Sequence[float], weight_decay: Sequence[float]) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        exp_avgs, exp_avg_sqs = [self.exp_avg[i] for i in live], [self.exp_avg_sq[i] for i in live]
        steps = [self.state_steps[i] for i in live]
        beta1, beta2 = self.betas
        if len(set(lr)) == 1 and len(set(weight_decay)) == 1:
            from torch.optim.adamw import adamw

            adamw(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=lr[0], weight_decay=weight_decay[0], eps=self.eps, maximize=False)
            return
        for param, exp_avg, exp_avg_sq, step_t in zip(params, exp_avgs, exp_avg_sqs, steps):
            step_t += 1
            step = step_t.item()
            shape = (len(lr),) + (1,) * (param.dim() - 1)
            dtype = torch.promote_types(param.dtype, torch.float32)
            lr_t = torch.tensor(lr, dtype=dtype).reshape(shape).to(param.device)
            decay_t = torch.tensor(weight_decay, dtype=dtype).reshape(shape).to(param.device)
            param.mul_(1 - lr_t * decay_t)
            exp_avg.lerp_(param.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            param.add_(exp_avg / denom * (-lr_t / (1 - beta1**step)))

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


def clip_per_client(trained: Sequence[torch.Tensor], max_norms: Sequence[float | None]) -> None:
    """``clip_grad_norm_`` on each client's slice of ``trained`` by its own norm (2-norm over all its tensors)."""
    grads = [t.grad for t in trained if t.grad is not None]
    if not grads or all(m is None for m in max_norms):
        return
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads])
    norms = torch.linalg.vector_norm(per_tensor, dim=0)  # (K,)
    limits = torch.tensor([float("inf") if m is None else m for m in max_norms], dtype=norms.dtype, device=norms.device)
    coef = torch.clamp(limits / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *[1] * (g.dim() - 1)).to(g.dtype))


# -- stacking the clients' tensors ------------------------------------------------------------------------
def _effective(weight: torch.Tensor, kind: str, rank: int) -> torch.Tensor:
    """The block of an adapter module's weight a client of rank ``rank`` uses (LoRA-SB keeps A and B at full rank)."""
    return {"lora_A": weight[:rank], "lora_B": weight[:, :rank], "lora_R": weight}[kind]


def _layer_kinds(layer) -> list[str]:
    return [kind for kind in FACTOR_ORDER if kind != "lora_R" or layer.lora_R is not None]


def _layer_rank(layer) -> int:
    return layer.lora_R.weight.shape[0] if layer.lora_R is not None else layer.lora_A.weight.shape[0]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is b:
        return True
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    return {id(p): (module, name) for module in model.modules() for name, p in module.named_parameters(recurse=False)}


def stack_clients(model: nn.Module, method: Method, round_idx: int, states: Sequence[State],
                  ranks: Sequence[int | None]) -> Cohort:
    """Load each client's state through the method and stack what the clients train (see the module docstring)."""
    K = len(states)
    trained_keys: list[str] | None = None
    trained: list[dict[str, torch.Tensor]] = []  # per client: key → its starting tensor (a copy)
    frozen: dict[str, torch.Tensor] = {}  # key → the largest block seen, where every client's is a leading block of it
    personal: set[str] = set()  # frozen adapter tensors that differ between clients
    layer_ranks: dict[str, list[int]] = {}
    scalings: dict[str, list[float]] = {}  # per layer, each client's (Method.client_scaling)
    loaded: set[tuple[int, int | None]] = set()  # (state, rank) pairs seen: the same pair loads the same frozen tensors
    for k in range(K):
        method.load_state(model, states[k], ranks[k])
        seen = (id(states[k]), ranks[k]) in loaded
        loaded.add((id(states[k]), ranks[k]))
        params = method.trainable_parameters(model, round_idx)
        if trained_keys is None:
            trained_keys = list(params)
        elif list(params) != trained_keys:
            raise ValueError("cohort: clients of one cohort train different tensors; use runtime.cohort_size=1")
        mine: dict[str, torch.Tensor] = {}
        for name, layer in adapted_layers(model).items():
            rank = _layer_rank(layer)
            layer_ranks.setdefault(name, []).append(rank)
            scalings.setdefault(name, []).append(float(layer.scaling))
            for kind in _layer_kinds(layer):
                key = state_key(name, kind)
                tensor = _effective(layer.module(kind).weight, kind, rank).detach()
                if key in params:
                    mine[key] = tensor.clone()
                elif key not in personal and not seen:
                    _compare_frozen(frozen, personal, key, tensor)
        for key, param in params.items():
            if key not in mine:
                mine[key] = param.detach().clone()
        trained.append(mine)
    shapes = [{key: tensor.shape for key, tensor in mine.items()} for mine in trained]
    _check_shared_state(states, set(trained_keys), set(frozen) | personal)
    personal_values = _collect_personal(model, method, states, ranks, personal) if personal else {}
    modules = dict(adapted_modules(model))
    stacked: dict[str, torch.Tensor] = {}
    stacked_layers = []
    for name, layer in adapted_layers(model).items():
        r_c = max(layer_ranks[name])
        factors = []
        for kind in _layer_kinds(layer):
            key = state_key(name, kind)
            if key in trained[0]:
                stacked[key] = _stack_padded([client.pop(key) for client in trained]).requires_grad_(True)
                factors.append(Factor(stacked[key], True, key))
            elif key in personal:
                factors.append(Factor(_stack_padded(personal_values[key]), True))
            else:
                factors.append(Factor(frozen[key], False))  # the largest client's block: rank r_c
        mask = None
        if min(layer_ranks[name]) < r_c:
            mask = torch.zeros(K, r_c, dtype=factors[0].weight.dtype, device=factors[0].weight.device)
            for k, rank in enumerate(layer_ranks[name]):
                mask[k, :rank] = 1
        scaling = scalings[name][0]
        if len(set(scalings[name])) > 1:
            scaling = torch.tensor(scalings[name], dtype=factors[0].weight.dtype, device=factors[0].weight.device)[:, None]
        stacked_layers.append(StackedLayer(modules[name], layer.base, factors, scaling, mask))

    linears = _stack_linears(model, params, trained, stacked)
    return Cohort(stacked, stacked_layers, linears, list(trained_keys), shapes)


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(K, …) from the clients' tensors, each zero-padded to the largest (the cohort's rank r_c)."""
    shape = torch.Size(max(sizes) for sizes in zip(*(t.shape for t in tensors)))
    return torch.stack([pad_to(t, shape) for t in tensors])


def _compare_frozen(frozen: dict[str, torch.Tensor], personal: set[str], key: str, tensor: torch.Tensor) -> None:
    """Keep one copy of a frozen adapter tensor while every client's is a leading block of the largest; else mark it personal."""
    seen = frozen.get(key)
    if seen is None:
        frozen[key] = tensor.clone()
        return
    common = torch.Size(min(a, b) for a, b in zip(seen.shape, tensor.shape))
    if not torch.equal(leading_block(seen, common), leading_block(tensor, common)):
        personal.add(key)
        del frozen[key]
    elif tensor.shape != common:
        frozen[key] = tensor.clone()


def _collect_personal(model, method, states, ranks, keys: set[str]) -> dict[str, list[torch.Tensor]]:
    """Each client's value of the frozen adapter tensors that differ between clients (a second pass of ``load_state``)."""
    values: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for state, rank in zip(states, ranks):
        method.load_state(model, state, rank)
        for name, layer in adapted_layers(model).items():
            for kind in _layer_kinds(layer):
                if state_key(name, kind) in keys:
                    values[state_key(name, kind)].append(_effective(layer.module(kind).weight, kind, _layer_rank(layer)).detach().clone())
    return values


def _check_shared_state(states: Sequence[State], trained: set[str], adapter_keys: set[str]) -> None:
    """What no client trains and is not an adapter tensor (W0's base_delta, an untrained head) must be one for all."""
    for key in {key for state in states for key in state}:
        if key in trained or key in adapter_keys:
            continue
        if not all(_same(state.get(key), states[0].get(key)) for state in states[1:]):
            raise ValueError(f"cohort: the clients' states differ in '{key}', which they do not train; use runtime.cohort_size=1")


def _stack_linears(model: nn.Module, params: dict[str, nn.Parameter], trained: list[dict[str, torch.Tensor]],
                   stacked: dict[str, torch.Tensor]) -> list[StackedLinear]:
    """Stack the trained tensors outside the adapters (``params``: the model's, by key); each must be the weight
    or bias of an ``nn.Linear``."""
    rest = [key for key in trained[0] if key not in stacked]
    if not rest:
        return []
    owners = _owners(model)
    by_module: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    for key in rest:
        module, attr = owners[id(params[key])]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"cohort: cannot batch the trained tensor '{key}' of a {type(module).__name__} "
                             f"(only adapters and nn.Linear heads); use runtime.cohort_size=1")
        by_module.setdefault(id(module), (module, {}))[1][attr] = key
    linears = []
    for module, attrs in by_module.values():
        factors = {}
        for attr in ("weight", "bias"):
            if attr in attrs:
                key = attrs[attr]
                stacked[key] = torch.stack([client.pop(key) for client in trained]).requires_grad_(True)
                factors[attr] = Factor(stacked[key], True, key)
            elif getattr(module, attr, None) is not None:
                factors[attr] = Factor(getattr(module, attr), False)
        linears.append(StackedLinear(module, factors["weight"], factors.get("bias")))
    return linears


# -- the cohort's forward -----------------------------------------------------------------------------------
def _adapter_forward(layer: StackedLayer, current: list, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + scaling · B R A x`` with each client's factors on its rows (as PEFT's LoRA layer computes it)."""
    segments: Segments = current[0]
    result = layer.base(x, *args, **kwargs)
    result_dtype = result.dtype
    h = x.to(layer.factors[0].weight.dtype)
    shape = None  # set while h is packed (clients, rows, features)
    last = len(layer.factors) - 1
    for i, factor in enumerate(layer.factors):
        if factor.stacked and segments.samples is not None:  # a per-sample pass: each row its own copy
            h = segments.row_matmul(h, segments.per_row(factor.weight, factor.key))
        elif factor.stacked:
            if shape is None:
                h, shape = segments.pack(h)
            h = torch.matmul(h, segments.select(factor.weight).transpose(1, 2))
        else:
            h = F.linear(h, factor.weight)
        if i < last and layer.rank_mask is not None:
            mask = segments.select(layer.rank_mask)
            h = h * (mask[:, None, :] if shape is not None else segments.per_example(mask, h.dim()))
        if shape is not None and not any(f.stacked for f in layer.factors[i + 1:]):
            h, shape = segments.unpack(h, shape), None
    if isinstance(layer.scaling, torch.Tensor):  # each client's own: h is in rows again here
        return (result + h * segments.per_example(segments.select(layer.scaling), h.dim())).to(result_dtype)
    return (result + (h if layer.scaling == 1.0 else h * layer.scaling)).to(result_dtype)


def _linear_forward(linear: StackedLinear, current: list, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b`` with each client's weight (and bias) on its rows."""
    segments: Segments = current[0]
    weight, bias = linear.weight, linear.bias
    if segments.samples is not None:  # a per-sample pass: each row its own copy
        y = segments.row_matmul(x, segments.per_row(weight.weight, weight.key)) if weight.stacked else F.linear(x, weight.weight)
        if bias is None:
            return y
        if not bias.stacked:
            return y + bias.weight
        rows = segments.per_row(bias.weight, bias.key)
        return y + rows.reshape(rows.shape[0], *[1] * (y.dim() - 2), rows.shape[-1])
    if weight.stacked:
        h, shape = segments.pack(x)
        y = torch.matmul(h, segments.select(weight.weight).transpose(1, 2))
        if bias is not None:
            y = y + (segments.select(bias.weight)[:, None, :] if bias.stacked else bias.weight)
        return segments.unpack(y, shape)
    y = F.linear(x, weight.weight, None if bias is None or bias.stacked else bias.weight)
    if bias is not None and bias.stacked:
        y = y + segments.per_example(segments.select(bias.weight), y.dim())
    return y


@contextlib.contextmanager
def stacked_forward(cohort: Cohort):
    """Replace the adapted layers' and stacked linears' ``forward`` for the cohort's pass; restore them after."""
    replaced = []
    try:
        for layer in cohort.layers:
            replaced.append((layer.module, layer.module.__dict__.get("forward")))
            layer.module.forward = functools.partial(_adapter_forward, layer, cohort.current)
        for linear in cohort.linears:
            replaced.append((linear.module, linear.module.__dict__.get("forward")))
            linear.module.forward = functools.partial(_linear_forward, linear, cohort.current)
        yield
    finally:
        for module, previous in reversed(replaced):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        cohort.current[0] = None


# -- batches and losses -------------------------------------------------------------------------------------
def cohort_batch(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
    """The clients' batches one after the other, right-padded to the longest: (inputs, labels, rows per client)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    merged = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() >= 2:
            parts = [F.pad(p, (0, width - p.shape[1]), value=pad_values.get(key, 0)) for p in parts]
        merged[key] = torch.cat(parts)
    labels = merged.pop("labels")
    return merged, labels, [len(b["input_ids"]) for b in batches]


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


def record_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Each record's own loss (rows,), what DP-SGD clips (``fedsim.privacy.mean_record_loss`` for one client):
    classification, its cross-entropy; causal-lm, its own mean token loss (``fedsim.data.per_example_loss``)."""
    if task == "causal-lm":
        return per_example_loss(logits, labels)
    if labels.dim() != 1 or labels.dtype not in (torch.long, torch.int) or logits.shape[-1] < 2:
        raise ValueError("cohort: classification needs integer labels, one per example, and at least 2 classes")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none")


# -- DP-SGD in a cohort ---------------------------------------------------------------------------------------
def clipped_records(segments: Segments, gradients: Sequence[torch.Tensor | None], max_norms: Sequence[float]) -> dict[str, torch.Tensor]:
    """Each record's gradient clipped to its client's C over all of that client's trained tensors together: key →
    (rows, …), row n in its client's slice.

    ``gradients``: of Σ_records loss with respect to ``segments.samples`` (each row's own copy: each record's own
    gradient; overwritten). ``max_norms``: C per client (indexed as the stacked tensors). The factor is Opacus's
    (``DPOptimizer.clip_and_accumulate``): min(1, C / (‖g‖ + 1e-6)).
    """
    per_key: dict[str, torch.Tensor] = {}
    for (key, _), gradient in zip(segments.samples, gradients):
        if gradient is not None:  # a layer used twice in a pass (tied weights) adds up
            per_key[key] = gradient if key not in per_key else per_key[key] + gradient
    if not per_key:
        return {}
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in per_key.values()], dim=1).norm(2, dim=1)
    limits = torch.tensor(list(max_norms), dtype=norms.dtype).to(norms.device).index_select(0, segments.row_client)
    factors = (limits / (norms + 1e-6)).clamp(max=1.0)
    return {key: gradient.mul_(factors.to(gradient.dtype).reshape(-1, *[1] * (gradient.dim() - 1))) for key, gradient in per_key.items()}


def noise_client_sums(cohort: Cohort, sums: dict[str, torch.Tensor], clients: Sequence[int], privacy: Sequence[PrivacySettings],
                      generators: Sequence[torch.Generator]) -> None:
    """Each of ``clients``' clipped sums + N(0, (σ_k C_k)²) on each of its own tensors, divided by its expected batch
    size: Opacus's ``DPOptimizer.add_noise`` and ``scale_grad`` (``loss_reduction="mean"``), client by client.

    Client k's noise is drawn from its own generator (seeded with its training seed, as ``PrivateStep`` seeds Opacus's),
    tensor by tensor in the method's order, each at the client's own shape (its rank's block; the padding gets none):
    the very numbers Opacus draws for the client trained alone, whichever clients share its cohort. An empty Poisson
    batch has a zero sum and still gets its noise.
    """
    for k in clients:
        std = privacy[k].noise_multiplier * privacy[k].max_grad_norm
        if std == 0:  # Opacus's _generate_noise: zeros, nothing drawn
            continue
        for key in cohort.order:
            block = leading_block(sums[key][k], cohort.shapes[k][key])
            block += torch.normal(0.0, std, size=block.shape, generator=generators[k], dtype=block.dtype, device=block.device)
    divisors = [1.0] * len(privacy)
    for k in clients:
        divisors[k] = float(privacy[k].expected_batch_size)
    for total in sums.values():
        total /= torch.tensor(divisors, dtype=total.dtype).to(total.device).reshape(-1, *[1] * (total.dim() - 1))


def plan_passes(widths: Sequence[int], rows: Sequence[int], pass_cost: int) -> list[list[int]]:
    """Split a step's clients into passes (lists of positions in ``widths``), each holding whole clients.

    Every pass pads to its longest batch, so clients of very different lengths waste work together; a pass costs
    ``pass_cost`` padded tokens of its own. The clients, sorted by their batch's length, are cut into runs that
    minimise Σ (pass_cost + rows × longest width) (dynamic programming over the sorted order). Clients of equal
    lengths always share a pass. The passes' gradients add up to the one pass's: nothing else changes.
    """
    order = sorted(range(len(widths)), key=lambda i: (widths[i], i))
    best = [0.0] + [float("inf")] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        count = 0
        for first in range(end, 0, -1):  # the pass order[first - 1 : end]
            count += rows[order[first - 1]]
            cost = best[first - 1] + pass_cost + count * widths[order[end - 1]]
            if cost < best[end]:
                best[end], start[end] = cost, first - 1
    passes, end = [], len(order)
    while end > 0:
        passes.append(sorted(order[start[end] : end]))
        end = start[end]
    return passes[::-1]


# -- a step's passes ------------------------------------------------------------------------------------------
def _row_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).sum(1)


def _backward_by_client(model: nn.Module, cohort: Cohort, batches: list[dict], clients: list[int], task: str, pad_token_id: int,
                        pass_cost: int, measured: torch.Tensor) -> None:
    """Σ_k client k's mean loss, backward, in passes of whole clients of similar lengths (`plan_passes`); each client's
    loss and tokens into ``measured`` (2, K)."""
    K, device = measured.shape[1], measured.device
    for group in plan_passes([b["input_ids"].shape[1] for b in batches], [len(b["input_ids"]) for b in batches], pass_cost):
        inputs, labels, sizes = cohort_batch([batches[i] for i in group], pad_token_id)
        segments = cohort.current[0] = Segments(sizes, [clients[i] for i in group], K, device)
        loss = client_losses(model(**inputs).logits, labels, segments, task)
        loss.sum().backward()
        index = torch.tensor([clients[i] for i in group]).to(device)
        measured[0].index_add_(0, index, loss.detach().double())
        measured[1].index_add_(0, index, segments.sum(_row_tokens(inputs).double()))


def _clipped_sums_by_record(model: nn.Module, cohort: Cohort, batches: list[dict], clients: list[int], task: str, pad_token_id: int,
                            pass_cost: int, max_norms: Sequence[float], measured: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each record's own gradient clipped to its client's C (`clipped_records`), summed per client: key → (K, …); each
    client's mean record loss and tokens into ``measured`` (2, K).

    A record's gradient does not depend on the other rows of its pass, so the passes are planned over records, not
    clients: the step's records sorted by their own length (`record_passes`), each pass cut to its longest record.
    Records of short and long batches then no longer pad each other, nor pad to their own batch's longest.
    """
    K, device = measured.shape[1], measured.device
    sums = {key: torch.zeros_like(tensor) for key, tensor in cohort.trained.items()}
    if not batches:
        return sums
    inputs, labels, sizes = cohort_batch(batches, pad_token_id)  # every record, client after client
    row_clients = [k for k, n in zip(clients, sizes) for _ in range(n)]
    widths = record_widths(inputs, labels)
    for rows in record_passes(widths.tolist(), pass_cost):
        index = torch.tensor(rows).to(device)
        width = int(widths[rows].max())
        part = {key: value.index_select(0, index)[:, :width] if value.dim() >= 2 else value.index_select(0, index)
                for key, value in inputs.items()}
        part_labels = labels.index_select(0, index)
        part_labels = part_labels[:, :width] if part_labels.dim() >= 2 else part_labels
        pass_clients = [row_clients[r] for r in rows]  # ascending rows: each client's records one after the other
        runs = [k for i, k in enumerate(pass_clients) if i == 0 or k != pass_clients[i - 1]]
        segments = cohort.current[0] = Segments([pass_clients.count(k) for k in runs], runs, K, device, per_sample=True)
        per_record = record_losses(model(**part).logits, part_labels, task)
        gradients = torch.autograd.grad(per_record.sum(), [leaf for _, leaf in segments.samples], allow_unused=True)
        for key, clipped in clipped_records(segments, gradients, max_norms).items():
            sums[key].index_add_(0, segments.row_client, clipped)
        segments.samples.clear()
        measured[0].index_add_(0, segments.row_client, per_record.detach().double())
        measured[1].index_add_(0, segments.row_client, _row_tokens(part).double())
    counts = torch.ones(K, dtype=torch.float64)
    counts[clients] = torch.tensor(sizes, dtype=torch.float64)
    measured[0] /= counts.to(device)
    return sums


def record_widths(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Each row's own length (CPU, long): one past its last attended (or labelled) position; the positions after it are
    padding, which can be cut off without changing the row's outputs (right padding; a left-padded row keeps it all)."""
    ids = inputs["input_ids"]
    used = inputs["attention_mask"] != 0 if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
    if labels.dim() >= 2:
        used = used | (labels != IGNORE_INDEX)
    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return (used * positions).amax(1).clamp(min=1).cpu()


def record_passes(widths: Sequence[int], pass_cost: int) -> list[list[int]]:
    """Records (their positions in ``widths``) in passes of similar lengths: `plan_passes` over the distinct widths, each
    with its number of records; each pass's records in ascending order."""
    distinct = sorted(set(widths))
    counts = [0] * len(distinct)
    place = {width: i for i, width in enumerate(distinct)}
    for width in widths:
        counts[place[width]] += 1
    passes = []
    for group in plan_passes(distinct, counts, pass_cost):
        chosen = {distinct[i] for i in group}
        passes.append([r for r, width in enumerate(widths) if width in chosen])
    return passes


# -- training -----------------------------------------------------------------------------------------------
def train_cohort(
    model: nn.Module,
    method: Method,
    round_idx: int,
    states: Sequence[State],
    ranks: Sequence[int | None],
    batches: Sequence[Iterator[dict[str, torch.Tensor]]],
    train: TrainConfig,
    steps: Sequence[int],
    seed: int,
    task: str = "classification",
    privacy: Sequence[PrivacySettings] | None = None,
    noise_seeds: Sequence[int] | None = None,
) -> list[tuple[State, TrainStats, State]]:
    """Train K clients together; return each client's (upload, stats, what it keeps), as ``run_client`` and
    ``Method.keep`` would alone.

    Per client k: its starting ``states[k]`` and rank ``ranks[k]`` (None: the method's), its endless
    ``batches[k]`` (on the model's device) and its ``steps[k]`` steps of AdamW (``train``'s settings, the
    schedule over its own steps). ``seed`` seeds torch for the pass (dropout: set ``model.dropout: 0`` to
    compare with clients trained one at a time).

    ``privacy`` (one ``PrivacySettings`` per client) makes every step a DP-SGD step of each client, as
    ``fedsim.privacy.PrivateStep`` takes it alone (Abadi et al. 2016): ``batches[k]`` are then Poisson batches
    (``None`` for an empty one), every record's own gradient (`record_losses`) is clipped to its client's C over
    all the client's trained tensors (`clipped_records`), each client's sum gets its own Gaussian noise from a
    generator seeded with ``noise_seeds[k]`` (its training seed) and is divided by its expected batch size
    (`noise_client_sums`); ``train.max_grad_norm`` is then not used.
    """
    if task not in TASKS:
        raise ValueError(f"cohort: unknown task '{task}'; valid: {', '.join(TASKS)}")
    K = len(states)
    if not (len(ranks) == len(batches) == len(steps) == K):
        raise ValueError("cohort: states, ranks, batches and steps must have one entry per client")
    if privacy is not None and not (len(privacy) == len(noise_seeds or ()) == K):
        raise ValueError("cohort: under DP, privacy and noise_seeds must have one entry per client")
    start = time.perf_counter()
    cohort = stack_clients(model, method, round_idx, states, ranks)
    trained = list(cohort.trained.values())
    optimizer = StackedAdamW(trained)
    finals: list[dict[str, torch.Tensor] | None] = [None] * K
    losses: list[list[float]] = [[] for _ in range(K)]
    tokens = [0.0] * K  # attention-mask ones each client trained
    device = trained[0].device if trained else next(model.parameters()).device
    pad_token_id = _pad_token_id(model)
    torch.manual_seed(seed)
    model.train()
    pass_cost = PASS_COST_TOKENS.get(device.type, PASS_COST_TOKENS["cuda"])
    generators = [torch.Generator(device=device).manual_seed(noise_seed) for noise_seed in noise_seeds] if privacy is not None else []
    try:
        with stacked_forward(cohort):
            for step in range(max(steps)):
                active = [k for k in range(K) if step < steps[k]]
                step_batches = [next(batches[k]) for k in active]
                present = [k for k, b in zip(active, step_batches) if b is not None]  # an empty Poisson batch: noise only
                if privacy is None and len(present) < len(active):
                    raise ValueError("cohort: an empty batch (Poisson sampling is for DP: pass privacy)")
                present_batches = [b for b in step_batches if b is not None]
                measured = torch.zeros(2, K, dtype=torch.float64, device=device)  # each client's loss and tokens this step
                if privacy is None:
                    _backward_by_client(model, cohort, present_batches, present, task, pad_token_id, pass_cost, measured)
                    clip_per_client(trained, [train.max_grad_norm] * K)
                else:
                    sums = _clipped_sums_by_record(model, cohort, present_batches, present, task, pad_token_id, pass_cost,
                                                   [p.max_grad_norm for p in privacy], measured)
                    noise_client_sums(cohort, sums, active, privacy, generators)
                    for key, tensor in cohort.trained.items():
                        tensor.grad = sums[key]
                lrs = [train.lr * lr_factor(step, train, steps[k]) for k in range(K)]
                decays = [train.weight_decay] * K
                for k in range(K):
                    if k not in active:  # its slice is kept aside: any value will do
                        lrs[k], decays[k] = lrs[active[0]], decays[active[0]]
                optimizer.step(lrs, decays)
                optimizer.zero_grad()
                values = measured.tolist()  # one device round trip a step
                for k in active:
                    losses[k].append(values[0][k] if k in present else float("nan"))  # NaN: an empty batch, as train_local has it
                    tokens[k] += values[1][k]
                    if step + 1 == steps[k] < max(steps):  # done before the others: keep its slice as it is now
                        finals[k] = {key: tensor[k].detach().clone() for key, tensor in cohort.trained.items()}
    finally:
        model.eval()
    results = []
    for k in range(K):
        final = finals[k] or {key: tensor[k] for key, tensor in cohort.trained.items()}
        method.load_state(model, states[k], ranks[k])
        with torch.no_grad():
            for key, param in method.trainable_parameters(model, round_idx).items():
                param.copy_(leading_block(final[key], param.shape))
        results.append((method.upload(model, round_idx), method.keep(model, round_idx)))
    wall = time.perf_counter() - start
    total_tokens = sum(tokens) or 1.0
    stats = []
    for k in range(K):
        finite = [value for value in losses[k] if value == value]
        stats.append(TrainStats(steps=len(losses[k]), train_loss=sum(finite) / len(finite) if finite else float("nan"),
                                train_s=wall * tokens[k] / total_tokens, losses=losses[k]))
    return [(upload, stat, kept) for (upload, kept), stat in zip(results, stats)]


def _pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    pad = getattr(text_config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
