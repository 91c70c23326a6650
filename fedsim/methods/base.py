"""The interface every aggregation method implements, and the arithmetic they share.

A method has four duties and nothing else: set up the adapters on a model (``prepare``,
``init_state``); say which tensors a client trains (``trained_kinds``); build what comes up
(``upload``) and what goes down (the ``broadcast`` of ``aggregate``, applied by ``receive``); and
aggregate. The global state is a flat ``dict[str, Tensor]`` keyed as ``fedsim.adapters.state`` says.

Aggregation sums clients in client-id order and accumulates in float64, so the result does not
depend on the order in which clients arrive; each round's aggregation error is measured by
``fedsim.methods.agg_error``. Nothing here imports Ray.

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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedsim.adapters.init import kaiming_uniform_A, layer_seed, lora_sb_factors
from fedsim.adapters.layers import adapted_layers, leading_block, set_rank
from fedsim.adapters.lora_sb import inject_lora_sb, target_linear_names
from fedsim.adapters.state import HEAD_PREFIX, State, head_parameters, key_kind, pad_to, state_key
from fedsim.config import ClientsConfig, MethodConfig, Section
from fedsim.errors import UsageError
from fedsim.methods.agg_error import aggregation_error, weighted_sum64
from fedsim.seeds import torch_generator


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


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ w_i t_i``, accumulated in float64 in the order given (on the inputs' device), returned in the inputs' dtype."""
    return weighted_sum64(tensors, weights).to(tensors[0].dtype)


@dataclass
class MethodOptions(Section):
    """A method's own settings (``method.<key>``): a subclass in the method's file declares them as ``setting`` fields, with
    a docstring citing where they come from, as PEFT's tuners declare their configs; building it checks them. This
    class itself declares none: the options of a method that has no settings of its own."""

    prefix: ClassVar[str] = "method."

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "MethodOptions":
        """The options from the ``method.*`` settings given: those this class declares (the others are other methods')."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in names})


@dataclass(frozen=True)
class About:
    """A method in words, for people: ``fedsim methods``, the README's table, reports."""

    trains: str = "A, B"  # what a client trains
    rule: str = "FedAvg of the trained tensors"  # the server's aggregate
    exact: str = "yes"  # "yes", or "no (…)": whether the clients' next model holds exactly Σ w_i B_i A_i


class Method:
    """Base class; one subclass a file in ``fedsim.methods``, registered with ``@fedsim.methods.register``.

    The class attributes below describe the method for people (``fedsim methods``, the README's table,
    reports); what it sends is not described but computed, by running its own code (``aggregate``, ``downlink``) on
    meta tensors of a model's shapes (``analysis.comm``).
    """

    name: str = ""
    paper: str = ""  # the paper's link
    about: About = About()
    adapter: str = "lora"  # which injector: "lora" (PEFT) or "lora-sb" (fedsim.adapters.lora_sb)
    num_clients: int | None = None  # set where the method fixes the client count (central)
    comm_variants: tuple[dict, ...] = ({},)  # method.* settings that `fedsim comm` shows a row each for by default
    rank_scaling: str = "max"  # clients.rank_scaling's default for this method (see ``client_scaling``): its paper's or code's
    options_class: type[MethodOptions] = MethodOptions  # its own settings, declared in its file

    def __init__(self, config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0):
        """``config``: the ``method`` section (its ``options``: the method's own settings, as given; checked here into
        ``self.options``); ``clients``: for ``clients.weights`` and ``clients.rank_aggregation``; ``seed``: the run seed
        (LoRA's A initialisation, FLoRA's redraws)."""
        self.config = config
        self.options = self.options_class.from_settings(config.options)
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
        return {**state, **self.head_state(model)}

    def head_state(self, model: nn.Module) -> State:
        """The classification head's parameters (copies, on the CPU) where ``method.train_head``: its round-0 state."""
        if not self.config.train_head:
            return {}
        return {HEAD_PREFIX + name: param.detach().to("cpu", copy=True) for name, param in head_parameters(model).items()}

    # -- 2. what a client trains ------------------------------------------------------------
    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        """The adapter tensors clients train in round ``round_idx``: LoRA's A and B unless a method says otherwise."""
        return ("lora_A", "lora_B")

    def client_kinds(self, round_idx: int) -> tuple[str, ...]:
        """Kinds a client trains but keeps (``"lora_B"``…, or ``"head"`` for the head): never uploaded, never
        aggregated, stored per client between its rounds. By default the head where ``method.local_head``, else none."""
        return ("head",) if self.config.local_head else ()

    def trains_head(self, round_idx: int) -> bool:
        """Whether clients train the classification head in round ``round_idx``: ``method.train_head``, in the first
        ``method.head_rounds`` rounds only where that is set (a warm-up, after which the averaged head stays frozen)."""
        rounds = self.config.head_rounds
        return self.config.train_head and (rounds is None or round_idx < rounds)

    def trainable_parameters(self, model: nn.Module, round_idx: int) -> dict[str, nn.Parameter]:
        """Mark exactly this round's trained tensors as trainable and return them, keyed as in the state."""
        model.requires_grad_(False)
        params: dict[str, nn.Parameter] = {}
        kinds = self.trained_kinds(round_idx)
        for name, layer in adapted_layers(model).items():
            for kind in kinds:
                params[state_key(name, kind)] = layer.module(kind).weight
        if self.trains_head(round_idx):
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

    def pack(self, message: State) -> State:
        """A message as it travels, up or down (its bytes are counted on this): by default as it is. A method whose tensors
        travel in a smaller form (Ravan: R's diagonal blocks) packs them in ``upload`` and ``downlink`` and unpacks them
        where they arrive; ``analysis.comm`` packs the uploads it builds from a (meta) state through this."""
        return message

    def uploaded_kinds(self, round_idx: int) -> tuple[str, ...]:
        """The kinds a client uploads in round ``round_idx``: what it trains (the head too, where trained), less what it keeps."""
        kept = self.client_kinds(round_idx)
        head = ("head",) if self.trains_head(round_idx) else ()  # a frozen head (public, or after head_rounds) stays put
        return tuple(kind for kind in (*self.trained_kinds(round_idx), *head) if kind not in kept)

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
        if keys and uploads[0].tensors[keys[0]].is_meta:  # counting bytes (analysis.comm): shapes only
            like = {key: state.get(key, uploads[0].tensors[key]) for key in keys}
            return {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in like.items()}
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

    def finish(
        self,
        old_state: State,
        new_state: State,
        broadcast: State,
        uploads: Sequence[Upload],
        weights: Sequence[float],
        layer_terms: dict[str, tuple[float, float]] | None = None,
        layer_weights: dict[str, Sequence[float]] | None = None,
    ) -> RoundResult:
        """Measure the aggregation error of ``new_state`` (``agg_error.aggregation_error``) and package the round's result.

        ``layer_terms``: ``{layer: (squared error, squared ideal norm)}`` of a method that folds into W0 (FedEx-LoRA,
        FLoRA); ``layer_weights``: a layer's ideal weights where they are not ``weights`` (HetLoRA). No error on meta
        tensors (counting bytes).
        """
        client_weights = {u.client_id: w for u, w in zip(uploads, weights)}
        if any(t.is_meta for t in new_state.values()):
            return RoundResult(state=new_state, broadcast=broadcast, agg_error=float("nan"), weights=client_weights)
        agg_error, layer_errors = aggregation_error(old_state, new_state, uploads, weights, self.scaling, layer_terms, layer_weights)
        return RoundResult(state=new_state, broadcast=broadcast, agg_error=agg_error, layer_errors=layer_errors,
                           weights=client_weights)


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
