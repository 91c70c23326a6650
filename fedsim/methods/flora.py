"""FLoRA: stack the clients' adapters; every client folds ``Σ w_i B_i A_i`` into W0 and re-initialises LoRA.

Wang, Shen, Zhang, Gong, Wang, Wang, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv:2409.05976.

The aggregation is exact (the stacked product is the weighted sum of the client products), and the
cost is on the way down: each client receives every client's A and B, c·Σ r(d+k) numbers a round.
Stacking is along the rank dimension (B's columns, A's rows), so clients of different ranks stack
as they are — FLoRA's answer to rank heterogeneity.
After the fold, A is re-drawn (seeded by the run seed and the round, so clients draw the same A
without it being sent) and B is zero.
"""

from collections.abc import Sequence

import torch

from fedsim.methods.base import (
    HEAD_PREFIX,
    Method,
    RoundResult,
    State,
    Upload,
    kaiming_uniform_A,
    layer_names_of,
    state_key,
    weighted_mean,
)
from fedsim.methods.fedex_lora import add_residual

WEIGHTS_KEY = "flora.weights"
RANKS_KEY = "flora.ranks"
ROUND_KEY = "flora.round"


class FLoRA(Method):
    name = "flora"
    paper = "https://arxiv.org/abs/2409.05976"

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        broadcast: State = {
            WEIGHTS_KEY: torch.tensor(weights, dtype=torch.float64),
            RANKS_KEY: torch.tensor([u.tensors[state_key(layer_names_of(state)[0], "lora_A")].shape[0] for u in uploads]),
            ROUND_KEY: torch.tensor([round_idx], dtype=torch.int64),
        }
        for layer in layer_names_of(state):
            broadcast[state_key(layer, "stack_A")] = torch.cat([u.tensors[state_key(layer, "lora_A")] for u in uploads], dim=0)
            broadcast[state_key(layer, "stack_B")] = torch.cat([u.tensors[state_key(layer, "lora_B")] for u in uploads], dim=1)
        head_keys = [key for key in uploads[0].tensors if key.startswith(HEAD_PREFIX)]
        broadcast.update({key: weighted_mean([u.tensors[key] for u in uploads], weights) for key in head_keys})
        layer_terms: dict[str, tuple[float, float]] = {}
        new_state = self.fold(state, broadcast, layer_terms)
        return self.finish(state, new_state, broadcast, uploads, weights, layer_terms)

    def receive(self, state: State, broadcast: State) -> State:
        return self.fold(state, broadcast)

    def fold(self, state: State, broadcast: State, layer_terms: dict[str, tuple[float, float]] | None = None) -> State:
        """Fold ``Σ w_i · scaling · B_i A_i`` into W0 and redraw the adapters (the server and every client alike).

        The fold is one product of the stacked factors, float64. With ``layer_terms``, each layer's
        ``(squared error, squared ideal norm)`` is recorded: the fold is the ideal update itself, so the
        error is what the float32 W0 correction misses of it.
        """
        weights = broadcast[WEIGHTS_KEY].tolist()
        ranks = broadcast[RANKS_KEY].tolist()
        next_round = int(broadcast[ROUND_KEY].item()) + 1
        new_state = dict(state)
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + next_round)
        for layer in layer_names_of(state):
            stack_B = broadcast[state_key(layer, "stack_B")].to(torch.float64)
            stack_A = broadcast[state_key(layer, "stack_A")].to(torch.float64)
            column_weights = torch.tensor([w * self.scaling for w, r in zip(weights, ranks) for _ in range(r)],
                                          dtype=torch.float64, device=stack_B.device)
            fold = (stack_B * column_weights) @ stack_A
            delta_key = state_key(layer, "base_delta")
            new_state[delta_key] = add_residual(state.get(delta_key), fold.to(torch.float32))
            if layer_terms is not None:
                applied = new_state[delta_key].to(torch.float64)
                if delta_key in state:
                    applied -= state[delta_key].to(torch.float64)
                layer_terms[layer] = (float(torch.linalg.matrix_norm(fold - applied) ** 2), float(torch.linalg.matrix_norm(fold) ** 2))
            A_key, B_key = state_key(layer, "lora_A"), state_key(layer, "lora_B")
            rank, in_features = state[A_key].shape
            new_state[A_key] = kaiming_uniform_A(rank, in_features, generator).to(state[A_key].device, state[A_key].dtype)
            new_state[B_key] = torch.zeros_like(state[B_key])
        new_state.update({key: value for key, value in broadcast.items() if key.startswith(HEAD_PREFIX)})
        return new_state
