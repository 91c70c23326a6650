"""The interface every aggregation method implements, and the arithmetic they share.

A method has four duties and nothing else: set up the adapters on a model (``prepare``,
``init_state``); say which tensors a client trains (``trained_kinds``); build what comes up
(``upload``) and what goes down (the ``broadcast`` of ``aggregate``, applied by ``receive``); and
aggregate. The global state is a flat ``dict[str, Tensor]``:

- ``"<layer>.lora_A"`` (r×k), ``"<layer>.lora_B"`` (d×r), ``"<layer>.lora_R"`` (r×r, LoRA-SB only),
  ``"<layer>.base_delta"`` (d×k, float32; methods that fold updates into W0), where ``<layer>`` is
  the module path in the base model;
- ``"head:<param>"`` for the classification head, where it is trained and averaged.

Aggregation sums clients in client-id order and accumulates in float64, so the result does not
depend on the order in which clients arrive. Nothing here imports Ray.

Two generic hooks serve the methods that go beyond one shared global state:

- ``client_kinds``: tensors that stay with the client (personalisation, e.g. FedSA-LoRA's B and head).
  They are never uploaded and never aggregated; the runtime keeps them per client
  (``fedsim.client_state.ClientStore``) and starts the client from ``client_state(global, own)``;
  ``keep`` says what to store after the client trained.
- ``downlink``: what a client of adapter rank r_i actually receives of a broadcast (FlexLoRA and
  HetLoRA send each client only its rank's leading block); by default the broadcast itself.

A rank-r_i client's scaling is ``client_scaling`` (``clients.rank_scaling``; each method's default is its
``rank_scaling``: ``max`` unless its paper or code says otherwise, which its docstring then cites — FlexLoRA's
code says ``own``). The methods whose papers have no rank-heterogeneous clients keep ``max``: no published choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsim.adapters.layers import adapted_layers, leading_block, set_rank
from fedsim.adapters.lora_sb import inject_lora_sb, target_linear_names
from fedsim.adapters.init import layer_seed, lora_sb_factors
from fedsim.config import ClientsConfig, MethodConfig
from fedsim.errors import UsageError
from fedsim.seeds import torch_generator
from fedsim.shapes import ModelShapes

State = dict[str, torch.Tensor]
Term = tuple[float, torch.Tensor, "torch.Tensor | None", torch.Tensor]  # coef · B R A (R None: coef · B A), float64
ADAPTER_KINDS = ("lora_A", "lora_B", "lora_R")
HEAD_PREFIX = "head:"
HEAD_MODULE_NAMES = ("classifier", "score")


@dataclass
class Upload:
    """What one client sends up: its trained tensors, keyed as in the global state."""

    client_id: int
    num_samples: int
    tensors: State


@dataclass
class RoundResult:
    """The outcome of one aggregation."""

    state: State  # the new global state
    broadcast: State  # what every returning client receives before the next round
    agg_error: float  # ‖Σ w_i B_i A_i − ΔW_agg‖_F / ‖Σ w_i B_i A_i‖_F over all layers
    layer_errors: dict[str, float] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)


def state_key(layer: str, kind: str) -> str:
    return f"{layer}.{kind}"


def layer_names_of(state: State) -> list[str]:
    """Adapted layer names in the state, in insertion (module) order."""
    names: dict[str, None] = {}
    for key in state:
        if not key.startswith(HEAD_PREFIX):
            names[key.rsplit(".", 1)[0]] = None
    return list(names)


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A new meta tensor of ``tensor``'s shape and dtype: what counting bytes (``analysis.comm``) builds where the real
    code computes. Built directly, not by meta arithmetic, which runs through Python decompositions (tens of µs to ms
    an op, and an import of sympy at its first use)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ w_i t_i``, accumulated in float64 in the order given (on the inputs' device), returned in the inputs' dtype."""
    if tensors[0].is_meta:  # counting bytes (analysis.comm): the shape is all there is
        return meta_like(tensors[0])
    return weighted_sum64(tensors, weights).to(tensors[0].dtype)


def weighted_sum64(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ w_i t_i`` in float64, in the order given, on the inputs' device."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights):
        total += weight * tensor.to(torch.float64)
    return total


def nbytes(tensors: State) -> int:
    """Bytes of a message as sent: every tensor's data plus its key (UTF-8)."""
    return sum(t.numel() * t.element_size() + len(k.encode()) for k, t in tensors.items())


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classification head's parameters (``classifier`` for BERT-like, ``score`` for Llama-like).

    Looked up on the head modules themselves, not by walking every parameter of the model.
    """
    return {
        f"{head}.{name}": param
        for head in HEAD_MODULE_NAMES
        if isinstance(getattr(model, head, None), nn.Module)
        for name, param in getattr(model, head).named_parameters()
    }


def kaiming_uniform_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's A initialisation (PEFT and Hu et al.): U(−1/√k, 1/√k), from a seeded generator."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound


@dataclass(frozen=True)
class About:
    """A method in words, for people: ``fedsim methods``, the README's table, reports."""

    trains: str = "A, B"  # what a client trains
    rule: str = "FedAvg of the trained tensors"  # the server's aggregate
    exact: str = "yes"  # "yes", or "no (…)": whether the clients' next model holds exactly Σ w_i B_i A_i


class Method:
    """Base class; one subclass a file in ``fedsim.methods``, registered with ``@fedsim.methods.register``.

    The class attributes below describe the method for people (``fedsim methods``, the README's table,
    reports); what it sends is not described but computed, by running its own code on meta tensors
    (``meta_state``, ``meta_upload``, ``aggregate``, ``downlink``: see ``analysis.comm``).
    """

    name: str = ""
    paper: str = ""  # the paper's link
    about: About = About()
    adapter: str = "lora"  # which injector: "lora" (PEFT) or "lora-sb" (fedsim.adapters.lora_sb)
    num_clients: int | None = None  # set where the method fixes the client count (central)
    comm_variants: tuple[dict, ...] = ({},)  # method.* settings that `fedsim comm` shows a row each for by default
    rank_scaling: str = "max"  # clients.rank_scaling's default for this method (see ``client_scaling``): its paper's or code's

    def __init__(self, config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0):
        """``config``: the ``method`` section; ``clients``: for ``clients.weights`` and ``clients.rank_aggregation``;
        ``seed``: the run seed (LoRA's A initialisation, FLoRA's redraws)."""
        self.config = config
        self.clients = clients if clients is not None else ClientsConfig()
        self.seed = seed
        self.rank = config.rank

    # -- 1. set up the adapters -------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """The adapter product's factor of the global state: 1 for LoRA-SB; alpha/r for LoRA (``client_scaling`` at rank r)."""
        return self.client_scaling(None)

    def client_scaling(self, rank: int | None) -> float:
        """s_i, the adapter product's factor of a client of adapter rank ``rank`` (None: r): the one definition.

        ``clients.rank_scaling`` (null: the method's ``rank_scaling``): ``max``, alpha/r for every client;
        ``own``, alpha/r_i, what PEFT gives a LoRA of rank r_i (FlexLoRA's code). alpha is ``method.alpha``,
        or r where it is null and for LoRA-SB (whose scaling is 1 at rank r). At rank r both are alpha/r, the
        same float. The global state is held at ``scaling``: a client's block is converted on the way in and
        out (``load_state``, ``upload``, ``keep``), so the server's arithmetic sees ``s · B'_i R_i A_i =
        s_i · B_i R_i A_i`` and needs no change (its ideal is ``Σ w_i s_i B_i R_i A_i``).
        """
        alpha = self.rank if self.adapter == "lora-sb" or self.config.alpha is None else self.config.alpha
        mode = self.clients.rank_scaling or self.rank_scaling
        if rank is None or mode == "max":
            return alpha / self.rank
        return alpha / rank

    @property
    def rescaled_kind(self) -> str:
        """The trained factor that carries a client's conversion ``s / s_i`` (``client_scaling``): R for LoRA-SB; B for LoRA, as
        FlexLoRA's code does (``B = U_r S_r / (alpha / r_i)``, ``A = V_rᵀ``). A method that trains A alone sees no change."""
        return "lora_R" if self.adapter == "lora-sb" else "lora_B"

    @property
    def needs_init_gradients(self) -> bool:
        """LoRA-SB's initialisation needs the full model's gradient on a calibration sample."""
        return self.adapter == "lora-sb"

    def prepare(self, model: nn.Module, target_modules: list[str]) -> nn.Module:
        """Inject this method's adapters into ``model`` in place; every base weight is frozen."""
        names = target_linear_names(model, target_modules)
        smallest = min(min(model.get_submodule(n).weight.shape) for n in names)
        if self.rank > smallest:
            raise UsageError(f"method.rank: {self.rank} exceeds the smallest adapted dimension ({smallest}) of the target modules")
        model.requires_grad_(False)
        if self.adapter == "lora-sb":
            inject_lora_sb(model, names, self.rank)
        else:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(
                r=self.rank,
                lora_alpha=self.config.alpha if self.config.alpha is not None else self.rank,
                target_modules=names,
                lora_dropout=0.0,
                bias="none",
                init_lora_weights=False,
            )
            inject_adapter_in_model(config, model)
        model.requires_grad_(False)
        return model

    def init_state(self, model: nn.Module, grad_sums: dict[str, torch.Tensor] | None = None, init_lr: float = 1e-3) -> State:
        """The round-0 global state for a prepared ``model``, on the CPU.

        LoRA: A from LoRA's Kaiming-uniform initialisation (seeded by the run seed), B = 0.
        LoRA-SB: B, R, A from the update approximation of ``grad_sums`` (``fedsim.adapters.init``),
        computed layer by layer on the device the sums are on; only the factors come back.
        """
        state: State = {}
        generator = torch_generator(self.seed, "lora-init")
        for index, (name, layer) in enumerate(adapted_layers(model).items()):
            dtype = layer.base.weight.dtype
            if self.adapter == "lora-sb":
                if grad_sums is None or name not in grad_sums:
                    raise ValueError(f"LoRA-SB initialisation needs the gradient sum of layer {name}")
                B, R, A = lora_sb_factors(grad_sums[name], self.rank, init_lr, seed=layer_seed(self.seed, index))
                state[state_key(name, "lora_R")] = R.to("cpu", dtype)
            else:
                A = kaiming_uniform_A(self.rank, layer.base.in_features, generator)
                B = torch.zeros(layer.base.out_features, self.rank, dtype=torch.float64)
            state[state_key(name, "lora_A")] = A.to("cpu", dtype).contiguous()
            state[state_key(name, "lora_B")] = B.to("cpu", dtype).contiguous()
        if self.config.train_head:
            for name, param in head_parameters(model).items():
                state[HEAD_PREFIX + name] = param.detach().to("cpu", copy=True)
        return state

    # -- 2. what a client trains ------------------------------------------------------------
    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        """The adapter tensors clients train in round ``round_idx``: LoRA's A and B unless a method says otherwise."""
        return ("lora_A", "lora_B")

    def client_kinds(self, round_idx: int) -> tuple[str, ...]:
        """Kinds a client trains but keeps (``"lora_B"``…, or ``"head"`` for the head): never uploaded, never
        aggregated, stored per client between its rounds. None by default."""
        return ()

    def trainable_parameters(self, model: nn.Module, round_idx: int) -> dict[str, nn.Parameter]:
        """Mark exactly this round's trained tensors as trainable and return them, keyed as in the state."""
        model.requires_grad_(False)
        params: dict[str, nn.Parameter] = {}
        kinds = self.trained_kinds(round_idx)
        for name, layer in adapted_layers(model).items():
            for kind in kinds:
                params[state_key(name, kind)] = layer.module(kind).weight
        if self.config.train_head:
            for name, param in head_parameters(model).items():
                params[HEAD_PREFIX + name] = param
        for param in params.values():
            param.requires_grad_(True)
        return params

    # -- 3. what goes down and up -----------------------------------------------------------
    def load_state(self, model: nn.Module, state: State, rank: int | None = None) -> None:
        """Set a prepared model to the global state (what a client starts its round from).

        A client of rank ``rank`` < r uses the leading rank components of every adapter (its block of
        R for LoRA-SB; the first rows of A and columns of B for LoRA), as HetLoRA and Fed-SB define it.
        """
        set_rank(model, rank or self.rank, self.client_scaling(rank))
        layers = adapted_layers(model)
        heads = head_parameters(model)
        ratio = self.scaling / self.client_scaling(rank)  # 1 unless clients.rank_scaling=own and rank < r
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith(HEAD_PREFIX):
                    heads[key[len(HEAD_PREFIX):]].copy_(value)
                    continue
                name, kind = key.rsplit(".", 1)
                if kind == "base_delta":
                    _set_base_delta(layers[name].base, value)
                else:
                    weight = layers[name].module(kind).weight
                    weight.copy_(leading_block(value, weight.shape))
                    if kind == self.rescaled_kind and ratio != 1.0:
                        weight.mul_(ratio)  # s_i · B_i = s · B: the client starts from the global block's product

    def upload(self, model: nn.Module, round_idx: int) -> State:
        """The client's message: its trained tensors but those it keeps (``client_kinds``), copied to CPU."""
        kept = self.client_kinds(round_idx)
        return self.to_global(model, {
            key: param.detach().to("cpu", copy=True)
            for key, param in self.trainable_parameters(model, round_idx).items()
            if key_kind(key) not in kept
        })

    def keep(self, model: nn.Module, round_idx: int) -> State:
        """What the client keeps after training: its ``client_kinds`` tensors (at its own rank; ``"head"``: the
        head's parameters), copied to CPU."""
        kinds = self.client_kinds(round_idx)
        kept = {
            state_key(name, kind): layer.module(kind).weight.detach().to("cpu", copy=True)
            for name, layer in adapted_layers(model).items()
            for kind in kinds
            if kind != "head"
        }
        if "head" in kinds:
            kept.update({HEAD_PREFIX + name: param.detach().to("cpu", copy=True) for name, param in head_parameters(model).items()})
        return self.to_global(model, kept)

    def to_global(self, model: nn.Module, tensors: State) -> State:
        """A client's tensors (copies) at the global state's scaling: its ``rescaled_kind`` times ``s_i / s``, where the
        model's layer runs at s_i (``load_state``); ``load_state`` undoes it. Every other tensor as it is."""
        layers = adapted_layers(model)
        for key, tensor in tensors.items():
            if key_kind(key) == self.rescaled_kind:
                ratio = layers[key.rsplit(".", 1)[0]].scaling / self.scaling
                if ratio != 1.0:
                    tensor.mul_(ratio)
        return tensors

    @staticmethod
    def client_state(global_state: State, own: State) -> State:
        """A client's starting state: the global state with the client's own kept tensors over it."""
        return {**global_state, **own}

    def downlink(self, message: State, rank: int) -> State:
        """What a returning client of adapter rank ``rank`` receives of ``message`` (a broadcast, or the whole
        state at first contact). By default the message itself."""
        return message

    def receive(self, state: State, broadcast: State) -> State:
        """Client side: the global state after applying the server's broadcast to the previous one."""
        return {**state, **broadcast}

    def uploaded_kinds(self, round_idx: int) -> tuple[str, ...]:
        """The kinds a client uploads in round ``round_idx``: what it trains (the head too, where trained), less what it keeps."""
        kept = self.client_kinds(round_idx)
        return tuple(kind for kind in (*self.trained_kinds(round_idx), "head") if kind not in kept)

    def averaged_kinds(self, round_idx: int) -> tuple[str, ...] | None:
        """The kinds whose new global value in round ``round_idx`` is a weighted mean of the clients' uploaded tensors
        (zero-padded or partitioned where ranks differ): what a server optimizer steps on (``server.optimizer``,
        ``fedsim.server_optimizer``; Reddi et al. 2021). The base class's FedAvg: every uploaded kind. None where the
        aggregate is not such a mean in that round (an SVD, a fold into W0, a correction): the method then refuses a
        server step. A method that overrides ``aggregate`` and still averages says so by overriding this."""
        return self.uploaded_kinds(round_idx) if self.aggregates_by_mean else None

    @property
    def aggregates_by_mean(self) -> bool:
        """Whether the aggregate is the weighted mean of the uploads (the base class's ``aggregate``): then workers may
        send their clients' weighted sums instead of each upload (``runtime.presum``, ``fedsim.presum``)."""
        return type(self).aggregate is Method.aggregate

    def steady_round(self) -> int:
        """The first round whose messages are those of every later round (what `fedsim comm` shows per round)."""
        return 1

    # -- the same messages without a model: meta tensors of a model's shapes --------------------
    def meta_state(self, shapes: ModelShapes) -> State:
        """The round-0 global state as meta tensors (shapes and dtypes, no data): what ``init_state`` builds for
        a model of these shapes. Run through ``meta_upload``, ``aggregate`` and ``downlink``, it gives the bytes
        each message takes, from the method's own code (``analysis.comm``)."""
        meta = {"device": "meta", "dtype": shapes.torch_dtype}
        state: State = {}
        for layer in shapes.layers:
            d, k, r = layer.out_features, layer.in_features, self.rank
            if self.adapter == "lora-sb":
                state[state_key(layer.name, "lora_R")] = torch.empty(r, r, **meta)
            state[state_key(layer.name, "lora_A")] = torch.empty(r, k, **meta)
            state[state_key(layer.name, "lora_B")] = torch.empty(d, r, **meta)
        if self.config.train_head:
            state.update({HEAD_PREFIX + name: torch.empty(shape, **meta) for name, shape in shapes.head})
        return state

    def meta_upload(self, state: State, round_idx: int, rank: int | None = None) -> State:
        """A client's upload, as ``upload`` builds it from a model at rank ``rank``, built from a (meta) state."""
        rank = rank or self.rank
        kinds = self.uploaded_kinds(round_idx)
        return {key: leading_block(value, rank_shape(key_kind(key), value.shape, rank))
                for key, value in state.items() if key_kind(key) in kinds}

    # -- 4. aggregate -------------------------------------------------------------------------
    def client_weights(self, uploads: Sequence[Upload]) -> list[float]:
        """``w_i``: by sample count (``n_i / Σ n``) or uniform (``1/c``), in the order of ``uploads``."""
        if self.clients.weights == "uniform":
            return [1.0 / len(uploads)] * len(uploads)
        total = sum(u.num_samples for u in uploads)
        return [u.num_samples / total for u in uploads]

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        """FedAvg of the uploaded tensors. Exact where the trained tensors enter the product linearly."""
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)
        return self.finish(state, {**state, **averaged}, averaged, uploads, weights)

    # -- shared helpers -------------------------------------------------------------------------
    def ordered(self, uploads: Sequence[Upload]) -> tuple[list[Upload], list[float]]:
        if not uploads:
            raise ValueError("aggregate needs at least one upload")
        ordered = sorted(uploads, key=lambda u: u.client_id)
        return ordered, self.client_weights(ordered)

    def average(self, state: State, uploads: Sequence[Upload], weights: Sequence[float],
                keys: Sequence[str] | None = None) -> State:
        """``Σ w_i t_i`` for every uploaded tensor (or those of ``keys``). Lower-rank clients' blocks are zero-padded
        to the global shape; ``partitioned`` divides each entry by the weight of the clients that trained it instead."""
        keys = list(uploads[0].tensors if keys is None else keys)
        if keys and uploads[0].tensors[keys[0]].is_meta:  # counting bytes: shapes only
            return {key: meta_like(state.get(key, uploads[0].tensors[key])) for key in keys}
        averaged = {}
        for key in keys:
            shape = state[key].shape if key in state else uploads[0].tensors[key].shape
            tensors = [pad_to(u.tensors[key], shape) for u in uploads]
            partial = any(u.tensors[key].shape != shape for u in uploads)
            if self.clients.rank_aggregation == "partitioned" and partial:
                total = weighted_mean([t.to(torch.float64) for t in tensors], weights)
                coverage = weighted_mean([pad_to(torch.ones(u.tensors[key].shape, dtype=torch.float64, device=total.device), shape)
                                          for u in uploads], weights)
                untrained = state[key].to(torch.float64)  # entries no client trained keep their value
                averaged[key] = torch.where(coverage > 0, total / coverage.clamp_min(1e-300), untrained).to(state[key].dtype)
            else:
                averaged[key] = weighted_mean(tensors, weights)
        return averaged

    def client_factors(self, state: State, upload: Upload, layer: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(B_i, R_i, A_i)`` of one client in float64: its uploaded tensors over the global ones."""

        rank = client_rank(upload, layer, self.rank)

        def get(kind: str) -> torch.Tensor | None:
            key = state_key(layer, kind)
            tensor = upload.tensors.get(key, state.get(key))
            if tensor is None:
                return None
            return leading_block(tensor, rank_shape(kind, tensor.shape, rank)).to(torch.float64)

        return get("lora_B"), get("lora_R"), get("lora_A")

    def ideal_terms(self, state: State, uploads: Sequence[Upload], weights: Sequence[float], layer: str) -> list[Term]:
        """``Σ w_i · scaling · B_i R_i A_i`` (what exact aggregation must produce) as terms ``(coef, B, R, A)``, float64.

        Where the clients upload one kind and share the others (Fed-SB: R; FFA: B), the weighted sum is
        taken inside, one term a layer; a lower-rank client's block is zero-padded to the full shape,
        which leaves its product unchanged. Otherwise one term a client. No d×k matrix is formed.
        """
        uploaded = {kind for kind in ADAPTER_KINDS if state_key(layer, kind) in uploads[0].tensors}
        shared = {kind: state[state_key(layer, kind)].to(torch.float64)
                  for kind in ADAPTER_KINDS if kind not in uploaded and state_key(layer, kind) in state}

        def summed(kind: str) -> torch.Tensor:
            key = state_key(layer, kind)
            return weighted_sum64([pad_to(u.tensors[key], state[key].shape) for u in uploads], weights)

        if uploaded == {"lora_R"}:
            return [(self.scaling, shared["lora_B"], summed("lora_R"), shared["lora_A"])]
        if uploaded == {"lora_B"} and "lora_R" not in shared:
            return [(self.scaling, summed("lora_B"), None, shared["lora_A"])]
        if uploaded == {"lora_A"} and "lora_R" not in shared:
            return [(self.scaling, shared["lora_B"], None, summed("lora_A"))]
        return [(weight * self.scaling, *self.client_factors(state, upload, layer)) for upload, weight in zip(uploads, weights)]

    def ideal_update(self, state: State, uploads: Sequence[Upload], weights: Sequence[float], layer: str) -> torch.Tensor:
        """``Σ w_i · scaling · B_i R_i A_i`` as one d×k matrix (float64), for a method that folds it into W0."""
        if state[state_key(layer, "lora_A")].is_meta:  # counting bytes (analysis.comm): the shape is all there is
            d, k = state[state_key(layer, "lora_B")].shape[0], state[state_key(layer, "lora_A")].shape[1]
            return torch.empty(d, k, dtype=torch.float64, device="meta")
        return dense(self.ideal_terms(state, uploads, weights, layer))

    def adapter_term(self, state: State, layer: str) -> Term:
        """The adapter product ``scaling · B R A`` of a state, as a term (float64)."""
        R = state.get(state_key(layer, "lora_R"))
        return (self.scaling, state[state_key(layer, "lora_B")].to(torch.float64), None if R is None else R.to(torch.float64),
                state[state_key(layer, "lora_A")].to(torch.float64))

    def layer_error(self, old_state: State, new_state: State, uploads: Sequence[Upload], weights: Sequence[float],
                    layer: str) -> tuple[float, float]:
        """``(‖Σ w_i s B_i R_i A_i − s B R A‖²_F, ‖Σ w_i s B_i R_i A_i‖²_F)`` from the factors alone, exactly.

        The new adapter product is one more (negated) term: ``‖Σ_t L_t R_t‖² = tr((LᵀL)(R Rᵀ))`` with the
        terms' factors stacked (``squared_norms``), O((d+k)·n²) for n stacked columns, never a d×k matrix per
        client. For a layer whose W0 the round left alone. Where the ideal is one term sharing a factor
        with the new product (Fed-SB, FFA), the difference is taken inside that factor, so an exact
        method's error is measured to float64 precision, not lost in the cancellation of two equal norms.
        """
        delta_key = state_key(layer, "base_delta")
        if new_state.get(delta_key) is not old_state.get(delta_key):
            raise ValueError(f"{self.name} folds into W0 in layer {layer}: it must measure that layer's error itself (finish's layer_terms)")
        ideal = self.ideal_terms(old_state, uploads, weights, layer)
        terms = difference(ideal, self.adapter_term(new_state, layer))
        if len(terms) == len(ideal) + 1:  # nothing merged: the ideal's norm is a block of the same Gram matrices
            return squared_norms(terms, len(ideal))
        return squared_norm(terms), squared_norm(ideal)

    def finish(
        self,
        old_state: State,
        new_state: State,
        broadcast: State,
        uploads: Sequence[Upload],
        weights: Sequence[float],
        layer_terms: dict[str, tuple[float, float]] | None = None,
    ) -> RoundResult:
        """Measure the aggregation error of ``new_state`` and package the round's result.

        ``layer_terms`` (``{layer: (squared error, squared ideal norm)}``) come from a method that folds
        into W0 and so holds the d×k fold already (FedEx-LoRA, FLoRA); every other layer is measured
        from the factors (``layer_error``). No error on meta tensors (counting bytes).
        """
        if any(t.is_meta for t in new_state.values()):
            return RoundResult(state=new_state, broadcast=broadcast, agg_error=float("nan"),
                               weights={u.client_id: w for u, w in zip(uploads, weights)})
        squared_error = squared_ideal = 0.0
        layer_errors: dict[str, float] = {}
        for layer in layer_names_of(new_state):
            if layer_terms is not None and layer in layer_terms:
                error2, norm2 = layer_terms[layer]
            else:
                error2, norm2 = self.layer_error(old_state, new_state, uploads, weights, layer)
            error2 = max(0.0, error2)  # a Gram trace of an error at rounding level can come out a hair below zero
            layer_errors[layer] = math.sqrt(error2 / norm2) if norm2 > 0 else 0.0
            squared_error += error2
            squared_ideal += norm2
        agg_error = math.sqrt(squared_error / squared_ideal) if squared_ideal > 0 else 0.0
        return RoundResult(
            state=new_state,
            broadcast=broadcast,
            agg_error=agg_error,
            layer_errors=layer_errors,
            weights={u.client_id: w for u, w in zip(uploads, weights)},
        )


def key_kind(key: str) -> str:
    """``"lora_A"`` of ``"<layer>.lora_A"``; ``"head"`` for a head parameter."""
    return "head" if key.startswith(HEAD_PREFIX) else key.rsplit(".", 1)[1]


def rank_block(state: State, rank: int) -> State:
    """``state`` as a rank-``rank`` client holds it: the first ``rank`` rows of every A and columns of every B
    (and the leading block of every R); every other tensor as it is. The truncation HetLoRA and FlexLoRA send."""
    blocks = {"lora_A": (slice(0, rank),), "lora_B": (slice(None), slice(0, rank)), "lora_R": (slice(0, rank), slice(0, rank))}
    return {key: value[blocks[key_kind(key)]].contiguous() if key_kind(key) in blocks else value for key, value in state.items()}


def stacked(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L R = Σ_t coef_t B_t R_t A_t``: the left factors side by side (d×n), the right ones stacked (n×k)."""
    left = torch.cat([coef * (B if R is None else B @ R) for coef, B, R, _ in terms], dim=1)
    right = torch.cat([A for _, _, _, A in terms], dim=0)
    return left, right


def dense(terms: Sequence[Term]) -> torch.Tensor:
    """``Σ_t coef_t B_t R_t A_t`` as one d×k matrix: one product of the stacked factors."""
    left, right = stacked(terms)
    return left @ right


def squared_norm(terms: Sequence[Term]) -> float:
    """``‖Σ_t coef_t B_t R_t A_t‖²_F`` exactly (see ``squared_norms``)."""
    return squared_norms(terms, len(terms))[0]


def squared_norms(terms: Sequence[Term], first: int) -> tuple[float, float]:
    """``(‖Σ_t T_t‖²_F, ‖Σ_{t<first} T_t‖²_F)`` exactly, with ``T_t = coef_t B_t R_t A_t``.

    With the factors stacked (``L R = Σ T_t``, n columns): ``Σ (LᵀL) ∘ (R Rᵀ)``, and the second from the
    leading block of the same two n×n Gram matrices, in O((d+k)·n²); or from the d×k products where those
    are cheaper (n > dk/(d+k): many clients of a thin layer), in O(d·k·n).
    """
    left, right = stacked(terms)
    split = sum(A.shape[0] for _, _, _, A in terms[:first])
    (d, n), k = left.shape, right.shape[1]
    if (d + k) * n > d * k:
        head = left[:, :split] @ right[:split]
        total = head + left[:, split:] @ right[split:] if split < n else head
        return float(torch.linalg.matrix_norm(total) ** 2), float(torch.linalg.matrix_norm(head) ** 2)
    products = (left.mT @ left) * (right @ right.mT)
    return float(products.sum()), float(products[:split, :split].sum())


def difference(ideal: Sequence[Term], new: Term) -> list[Term]:
    """The terms of ``Σ ideal − new``; one ideal term that shares B and A (or A, or B) with ``new`` is merged with it."""
    coef, B, R, A = new
    if len(ideal) == 1:
        c0, B0, R0, A0 = ideal[0]
        same_B, same_A = _same(B0, B), _same(A0, A)
        if same_B and same_A:
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            middle = c0 * (eye if R0 is None else R0) - coef * (eye if R is None else R)
            return [(1.0, B0, middle, A0)]
        if same_A:
            left = c0 * (B0 if R0 is None else B0 @ R0) - coef * (B if R is None else B @ R)
            return [(1.0, left, None, A0)]
        if same_B:
            right = c0 * (A0 if R0 is None else R0 @ A0) - coef * (A if R is None else R @ A)
            return [(1.0, B0, None, right)]
    return [*ideal, (-coef, B, R, A)]


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and bool(torch.equal(x, y))


def client_rank(upload: Upload, layer: str, full_rank: int) -> int:
    """A client's rank, read off the shapes of what it uploaded for ``layer``."""
    tensors = upload.tensors
    if state_key(layer, "lora_R") in tensors:
        return tensors[state_key(layer, "lora_R")].shape[0]
    if state_key(layer, "lora_A") in tensors:
        return tensors[state_key(layer, "lora_A")].shape[0]
    if state_key(layer, "lora_B") in tensors:
        return tensors[state_key(layer, "lora_B")].shape[1]
    return full_rank


STACK_WEIGHTS, STACK_RANKS = "stack.weights", "stack.ranks"


def stack_uploads(layers: Sequence[str], uploads: Sequence[Upload], weights: Sequence[float], full_rank: int) -> State:
    """Every client's A and B of each layer stacked along the rank (A's rows, B's columns), with the clients'
    weights (float64) and ranks: what FLoRA, and FedEx-LoRA's ``stacked`` downlink, send to every client."""
    ranks = [client_rank(u, layers[0], full_rank) for u in uploads]  # a client's rank is the same in every layer
    message: State = {STACK_WEIGHTS: torch.tensor(list(weights), dtype=torch.float64),
                      STACK_RANKS: torch.tensor(ranks, dtype=torch.int64)}
    stacked_rank = sum(ranks)
    for layer in layers:
        A_0, B_0 = uploads[0].tensors[state_key(layer, "lora_A")], uploads[0].tensors[state_key(layer, "lora_B")]
        if A_0.is_meta:  # counting bytes (analysis.comm): shapes only, and meta concatenation is slow
            message[state_key(layer, "stack_A")] = A_0.new_empty(stacked_rank, A_0.shape[1])
            message[state_key(layer, "stack_B")] = B_0.new_empty(B_0.shape[0], stacked_rank)
        else:
            A = [u.tensors[state_key(layer, "lora_A")] for u in uploads]
            B = [u.tensors[state_key(layer, "lora_B")] for u in uploads]
            message[state_key(layer, "stack_A")] = torch.cat(A, dim=0)
            message[state_key(layer, "stack_B")] = torch.cat(B, dim=1)
    return message


def unstack(message: State) -> tuple[list[Upload], list[float]]:
    """The clients' adapter uploads and weights back from a ``stack_uploads`` message (client ids 0..c-1, in order)."""
    weights = message[STACK_WEIGHTS].tolist()
    ranks = message[STACK_RANKS].tolist()
    uploads = [Upload(i, 1, {}) for i in range(len(ranks))]
    for key, value in message.items():
        layer, _, kind = key.rpartition(".")
        if kind in ("stack_A", "stack_B"):
            parts = value.split(ranks, dim=0 if kind == "stack_A" else 1)
            for upload, part in zip(uploads, parts):
                upload.tensors[state_key(layer, "lora_" + kind[-1])] = part
    return uploads, weights


def rank_shape(kind: str, shape: torch.Size, rank: int) -> tuple[int, ...]:
    """The shape of a rank-``rank`` client's block of an adapter tensor of ``kind`` (A: r×k, B: d×r, R: r×r)."""
    if kind == "lora_A":
        return (rank, shape[1])
    if kind == "lora_B":
        return (shape[0], rank)
    if kind == "lora_R":
        return (rank, rank)
    return tuple(shape)


def pad_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero-pad ``tensor`` at the end of each dimension to ``shape`` (a lower-rank client's block in the global tensor)."""
    if tensor.shape == shape:
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return padded


def _set_base_delta(base: nn.Linear, delta: torch.Tensor) -> None:
    """``W = W0 + delta`` for a layer whose updates are folded into the base weight.

    The pristine W0 is kept on the module the first time; a delta already applied is not re-applied.
    """
    if getattr(base, "_fedsim_loaded_delta", None) is delta:
        return
    if not hasattr(base, "_fedsim_w0"):
        base._fedsim_w0 = base.weight.detach().clone()
    w0 = base._fedsim_w0
    base.weight.copy_((w0.to(torch.float32) + delta.to(w0.device, torch.float32)).to(w0.dtype))
    base._fedsim_loaded_delta = delta
