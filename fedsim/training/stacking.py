"""K clients' trained tensors stacked along a first, client dimension, and the forward that uses them: one pass through the
frozen base model trains them all (K = 1 included).

- Every adapted layer holds the K clients' trained tensors stacked along a first, client dimension (Fed-SB:
  R as K×r×r; FedIT: A as K×r×k and B as K×d×r; FFA: B), and a frozen tensor once where every client has
  the same (Fed-SB's B and A). A trained head's ``nn.Linear`` is stacked too (K×out×in): each client its own.
  Ravan's R enters through its layer's ``block_mask`` (its heads' diagonal blocks), as in the layer's own forward.
- The cohort's batch is the clients' batches one after the other, right-padded to the longest sequence
  (attention mask 0, labels −100), so client k's examples are one contiguous segment of rows. A stacked
  tensor meets its segment by a batched matmul over the K segments: a view of the activations when the
  segments hold equally many examples, else one zero-padded copy (of the low-rank activations where the
  first factor is shared, as Fed-SB's A is). Where the clients' batches differ much in length, a step
  is split into a few passes of clients of similar lengths (`plan_passes`), so that padding does not
  cost more than another pass would; their gradients add up to the one pass's.
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
(`stacked_forward`), and restored after.
"""


from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.adapters.layers import adapted_layers, adapted_modules, leading_block
from fedsim.adapters.state import State, pad_to, state_key
from fedsim.methods.base import Method

FACTOR_ORDER = ("lora_A", "lora_R", "lora_B")  # x → A → R → B


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
    mask: torch.Tensor | None = None  # the entries that enter the product (Ravan's R: its heads' diagonal blocks); None: all


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
                mask = modules[name].block_mask(r_c) if kind == "lora_R" else None
                factors.append(Factor(stacked[key], True, key, mask))
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
    one = segments.count == 1 and segments.samples is None  # one client in the pass: its slice is a plain weight
    for i, factor in enumerate(layer.factors):
        if factor.stacked and segments.samples is not None:  # a per-sample pass: each row its own copy
            h = segments.row_matmul(h, _masked(segments.per_row(factor.weight, factor.key), factor.mask))
        elif factor.stacked and one:
            h = F.linear(h, _masked(segments.select(factor.weight), factor.mask)[0])
        elif factor.stacked:
            if shape is None:
                h, shape = segments.pack(h)
            h = torch.matmul(h, _masked(segments.select(factor.weight), factor.mask).transpose(1, 2))
        else:
            h = F.linear(h, factor.weight)
        if i < last and layer.rank_mask is not None:
            mask = segments.select(layer.rank_mask)
            h = h * (mask[:, None, :] if shape is not None else mask[0] if one else segments.per_example(mask, h.dim()))
        if shape is not None and not any(f.stacked for f in layer.factors[i + 1:]):
            h, shape = segments.unpack(h, shape), None
    if isinstance(layer.scaling, torch.Tensor):  # each client's own: h is in rows again here
        scaling = segments.select(layer.scaling)[0] if one else segments.per_example(segments.select(layer.scaling), h.dim())
        return (result + h * scaling).to(result_dtype)
    return (result + (h if layer.scaling == 1.0 else h * layer.scaling)).to(result_dtype)


def _masked(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return weights if mask is None else weights * mask


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
    if segments.count == 1:  # one client in the pass: its slices are a plain weight and bias
        slices = [None if f is None else segments.select(f.weight)[0] if f.stacked else f.weight for f in (weight, bias)]
        return F.linear(x, *slices)
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


