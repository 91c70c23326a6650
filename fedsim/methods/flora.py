"""FLoRA: stack the clients' adapters; every client folds ``Σ w_i B_i A_i`` into W0 and re-initialises LoRA.

Wang, Shen, Zhang, Gong, Wang, Wang, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv:2409.05976.

The aggregation is exact (the stacked product is the weighted sum of the client products), and the
cost is on the way down: each client receives every client's A and B, c·Σ r(d+k) numbers a round
(plus the c weights and ranks). Stacking is along the rank dimension (B's columns, A's rows), so
clients of different ranks stack as they are — FLoRA's answer to rank heterogeneity.
After the fold, A is re-drawn (seeded by the run seed, the round and the layer's name, so a client
draws the same A without it being sent) and B is zero.

Scaling of a rank-r_i client (``clients.rank_scaling``, default ``max``): the authors' code (ATP-1010/FederatedLLM,
``main.py``) gives a client of rank r_i ``lora_alpha = 2·r_i``, so alpha_i/r_i = 2 whatever the rank: a
rank-independent factor, fedsim's ``max``.
"""

from collections.abc import Sequence

import torch

from fedsim.adapters.init import kaiming_uniform_A
from fedsim.adapters.state import HEAD_PREFIX, State, layer_names_of, state_key
from fedsim.methods import register
from fedsim.methods.agg_error import ideal_update
from fedsim.methods.base import Method, RoundResult, Upload
from fedsim.methods.fedex_lora import add_residual
from fedsim.methods.stack import stack_uploads, unstack
from fedsim.seeds import derive_seed

ROUND_KEY = "flora.round"


@register("flora", paper="https://arxiv.org/abs/2409.05976", trains="A, B, re-initialised each round", rule="stacked `Σ w_i B_i A_i` folded into W0")
class FLoRA(Method):
    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        broadcast = stack_uploads(layer_names_of(state), uploads, weights, self.rank)
        broadcast[ROUND_KEY] = torch.tensor([round_idx], dtype=torch.int64)
        head_keys = [key for key in uploads[0].tensors if key.startswith(HEAD_PREFIX)]
        head = self.average(state, uploads, weights, head_keys)
        broadcast.update(head)
        layer_terms: dict[str, tuple[float, float]] = {}
        new_state = {**self.fold(state, uploads, weights, round_idx + 1, layer_terms), **head}
        return self.finish(state, new_state, broadcast, uploads, weights, layer_terms)

    def receive(self, state: State, broadcast: State) -> State:
        uploads, weights = unstack(broadcast)
        head = {key: value for key, value in broadcast.items() if key.startswith(HEAD_PREFIX)}
        return {**self.fold(state, uploads, weights, int(broadcast[ROUND_KEY].item()) + 1), **head}

    def fold(self, state: State, uploads: Sequence[Upload], weights: Sequence[float], next_round: int,
             layer_terms: dict[str, tuple[float, float]] | None = None) -> State:
        """``W0 += Σ w_i · scaling · B_i A_i`` (float32, accumulated in float64), then a fresh A and B = 0 — the same
        arithmetic on the server (from the uploads) and on every client (from the broadcast).

        With ``layer_terms``, each layer's ``(squared error, squared ideal norm)``: the fold is the ideal update itself
        (one product of the stacked factors), so the error is what the float32 W0 correction misses of it."""
        new_state = dict(state)
        for layer in sorted(layer_names_of(state)):
            fold = ideal_update(state, uploads, weights, layer, self.scaling)  # Σ w_i · scaling · B_i A_i
            delta_key = state_key(layer, "base_delta")
            new_state[delta_key] = add_residual(state.get(delta_key), fold.to(torch.float32))
            if layer_terms is not None and not fold.is_meta:
                applied = new_state[delta_key].to(torch.float64)
                if delta_key in state:
                    applied -= state[delta_key].to(torch.float64)
                layer_terms[layer] = (float(torch.linalg.matrix_norm(fold - applied) ** 2), float(torch.linalg.matrix_norm(fold) ** 2))
            A_key, B_key = state_key(layer, "lora_A"), state_key(layer, "lora_B")
            new_state[A_key] = self.redraw_A(state[A_key], layer, next_round)
            B = state[B_key]  # meta: counting bytes (analysis.comm), where zeros_like is slow
            new_state[B_key] = B.new_empty(B.shape) if B.is_meta else torch.zeros_like(B)
        return new_state

    def redraw_A(self, old_A: torch.Tensor, layer: str, round_idx: int) -> torch.Tensor:
        """LoRA's A for ``layer`` at the start of ``round_idx``: seeded by (run seed, round, layer name) alone."""
        if old_A.is_meta:  # counting bytes (analysis.comm): shapes only
            return old_A.new_empty(old_A.shape)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "flora-redraw", round_idx, layer))
        rank, in_features = old_A.shape
        return kaiming_uniform_A(rank, in_features, generator).to(old_A.dtype)
