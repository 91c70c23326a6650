"""Ravan: h LoRA heads ``ΔW = Σ_i s_i B_i H_i A_i``; B_i, A_i frozen and shared; clients train and send ``s_i H_i``.

Raje, Askin, Jhunjhunwala, Joshi, "Ravan: Multi-Head Low-Rank Adaptation for Federated Fine-Tuning", NeurIPS 2025,
arXiv:2506.05568 (https://arxiv.org/abs/2506.05568).

fedsim holds the h heads as one LoRA-SB layer (``fedsim.adapters.lora_sb``) of rank r = h·r_h: ``B = [B_1 … B_h]`` (d×r),
``A = [A_1; …; A_h]`` (r×k), ``R = blockdiag(s_1 H_1, …, s_h H_h)`` (r×r), so ``B R A = Σ_i s_i B_i H_i A_i``. The layer's
``head_rank`` = r_h lets only R's diagonal blocks enter the product, in its own forward and in the cohort engine's: an
entry off them gets no gradient and never travels. One layer rather than h adapter modules because then the global
state, the cohort engine (R stacked K×r×r), Opacus, the aggregation error and the PEFT export all work on LoRA-SB's
B, R, A unchanged; Ravan adds a mask and its own message format.

- Messages (``pack``): R travels as its heads' blocks, ``<layer>.lora_H`` (r × r_h, head i in rows i·r_h…), up and
  down: h·r_h² = r²/h numbers a layer, the paper's "clients upload s_i H_i directly". B and A never change: they go down
  at a client's first contact, or are built by the client (``adapters.init_at: client``).
- Aggregation: ``s_i H_i ← Σ_c w_c s_{i,c} H_{i,c}``, the weighted mean of the products (averaging s and H apart would not
  be exact): ``Σ_c w_c Σ_i B_i (s_{i,c} H_{i,c}) A_i = Σ_i B_i (Σ_c w_c s_{i,c} H_{i,c}) A_i``. Exact.
- Budget: Fed-SB at rank r₀ sends r₀² a layer; Ravan with h heads of rank r_h sends h·r_h² at rank h·r_h, so the same
  bytes at √h times the rank (h = 4: r = 2r₀). ``method.rank`` is Ravan's total rank r; ``method.ravan_heads`` divides it.

What fedsim could not check, and chose (only the abstract and summaries of the paper were available; its method
section and the authors' code were not found):
- s_i is trained inside the block: fedsim trains s_i·H_i as one r_h×r_h tensor; the paper trains s_i and H_i as
  separate parameters. Model, message and aggregate are the same; the optimisation path is not (a step on (s, H) also
  moves s·H along H). A separate s_i would need a fourth factor in the engine's A → R → B chain.
- The initialisation of B_i, A_i and H_i: the paper ablates several; its default was not found. ``method.ravan_init``:
  ``orthogonal`` (default: orthonormal columns of B and rows of A drawn from the run seed, so the heads span mutually
  orthogonal subspaces, and H = 0: the model starts at W0) or ``lora-sb`` (Fed-SB's update-approximation init: the
  heads split the top-r singular directions of the first full fine-tuning step, H_i its block of diag(S)).
- h and r_h: the paper's per-experiment values were not checked; h = 4 by default (Fed-SB's bytes at twice its rank).
- Clients of rank r_i < r (``clients.ranks``, fedsim's design as for Fed-SB, not the paper's head selection, which was
  not checked): a client trains R's leading r_i×r_i block, its first heads (the last possibly cut), and sends r_i rows
  of ``lora_H`` (a cut head padded to r_h columns).
- Under DP-SGD the noise lands on R's entries off the blocks too; they never enter the product or a message. SCAFFOLD's
  control variates (``train.control_variates``) travel at R's full r×r, as that rule sends every trained tensor (zero off
  the blocks); ``runtime.presum`` is refused (the workers would sum packed blocks of different ranks).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.adapters.layers import adapted_layers, adapted_modules
from fedsim.adapters.state import State, key_kind, state_key
from fedsim.config import ClientsConfig, MethodConfig, setting
from fedsim.errors import UsageError
from fedsim.methods import register
from fedsim.methods.base import Method, MethodOptions, RoundResult, Upload
from fedsim.seeds import torch_generator


@dataclass
class RavanOptions(MethodOptions):
    """Ravan's number of heads and the initialisation of their frozen bases (Raje, Askin, Jhunjhunwala, Joshi,
    arXiv:2506.05568; the defaults are fedsim's: see ``fedsim.methods.ravan``)."""

    ravan_heads: int = setting(4, "ravan: the number of heads h; method.rank = h × a head's rank", low=1)
    ravan_init: str = setting("orthogonal", "ravan: the heads' frozen B_i, A_i — orthogonal (orthonormal, from the run seed; "
                              "H = 0) or lora-sb (Fed-SB's update-approximation init)", choices=("orthogonal", "lora-sb"))


@register("ravan", paper="https://arxiv.org/abs/2506.05568", trains="h heads' s_i H_i (r/h × r/h each); B_i, A_i frozen",
          rule="`s_i H_i = Σ_c w_c s_{i,c} H_{i,c}` (the products)")
class Ravan(Method):
    adapter = "lora-sb"
    options_class = RavanOptions

    def __init__(self, config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0):
        super().__init__(config, clients, seed)
        heads = self.options.ravan_heads
        if self.rank % heads:
            raise UsageError(f"method.ravan_heads: {heads} heads do not divide method.rank ({self.rank}); give a rank that is "
                             "a multiple of the number of heads")
        self.head_rank = self.rank // heads

    @property
    def needs_init_gradients(self) -> bool:
        return self.options.ravan_init == "lora-sb"

    def prepare(self, model: nn.Module, target_modules: list[str]) -> nn.Module:
        super().prepare(model, target_modules)
        for _, module in adapted_modules(model):
            module.head_rank = self.head_rank
        return model

    def init_state(self, model: nn.Module, grad_sums: dict[str, torch.Tensor] | None = None, init_lr: float = 1e-3) -> State:
        """``lora-sb``: Fed-SB's (R = diag(S) is block-diagonal already). ``orthogonal``: B, A with orthonormal columns and
        rows (a QR of Gaussians from the run seed and the layer's name), R = 0."""
        if self.needs_init_gradients:
            return super().init_state(model, grad_sums, init_lr)
        state: State = {}
        for name, layer in adapted_layers(model).items():
            generator = torch_generator(self.seed, "ravan-init", name)
            d, k = layer.base.weight.shape
            dtype = layer.base.weight.dtype
            state[state_key(name, "lora_R")] = torch.zeros(self.rank, self.rank, dtype=dtype)
            state[state_key(name, "lora_A")] = orthonormal(k, self.rank, generator).T.to(dtype).contiguous()
            state[state_key(name, "lora_B")] = orthonormal(d, self.rank, generator).to(dtype).contiguous()
        return {**state, **self.head_state(model)}

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_R",)

    # -- R travels as its heads' blocks -------------------------------------------------------------
    def pack(self, message: State) -> State:
        """Every R of ``message`` as its heads' blocks, ``lora_H``; every other tensor as it is."""
        return _replaced(message, "lora_R", "lora_H", lambda R: diagonal_blocks(R, self.head_rank))

    @staticmethod
    def unpack(message: State) -> State:
        """Every ``lora_H`` of ``message`` as the block-diagonal R it packs; every other tensor as it is."""
        return _replaced(message, "lora_H", "lora_R", block_diagonal)

    def upload(self, model: nn.Module, round_idx: int) -> State:
        return self.pack(super().upload(model, round_idx))

    def downlink(self, message: State, rank: int) -> State:
        return self.pack(message)

    def receive(self, state: State, broadcast: State) -> State:
        return {**self.unpack(state), **self.unpack(broadcast)}

    def load_state(self, model: nn.Module, state: State, rank: int | None = None) -> None:
        super().load_state(model, self.unpack(state), rank)

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        """FedAvg of the clients' blocks (an upload's R, packed or not, cut to its blocks first)."""
        blocks = [Upload(u.client_id, u.num_samples, self.unpack(self.pack(u.tensors))) for u in uploads]
        return super().aggregate(state, blocks, round_idx)

    def averaged_kinds(self, round_idx: int) -> tuple[str, ...]:
        return self.uploaded_kinds(round_idx)  # the new R is the weighted mean of the clients' (block-diagonal) R


def orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A rows×columns matrix with orthonormal columns (rows ≥ columns), float64: the Q of a Gaussian's QR."""
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64)).Q


def diagonal_blocks(R: torch.Tensor, head_rank: int) -> torch.Tensor:
    """(n, n) → (n, head_rank): R's diagonal blocks, head after head; a head cut at n is padded with zeros."""
    n = R.shape[0]
    H = R.new_zeros(n, head_rank)
    for start in range(0, n, head_rank):
        stop = min(start + head_rank, n)
        H[start:stop, :stop - start] = R[start:stop, start:stop]
    return H


def block_diagonal(H: torch.Tensor) -> torch.Tensor:
    """(n, head_rank) → (n, n): the block-diagonal R whose blocks ``diagonal_blocks`` took; zero off them."""
    n, head_rank = H.shape
    R = H.new_zeros(n, n)
    for start in range(0, n, head_rank):
        stop = min(start + head_rank, n)
        R[start:stop, start:stop] = H[start:stop, :stop - start]
    return R


def _replaced(message: State, kind: str, new_kind: str, convert: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """``message`` with each tensor of ``kind`` converted and keyed as its layer's ``new_kind`` (in the same order)."""
    return {(state_key(key.rsplit(".", 1)[0], new_kind) if key_kind(key) == kind else key):
            (convert(value) if key_kind(key) == kind else value) for key, value in message.items()}
