"""FLoRA: stack the clients' adapters; every client folds ``Σ w_i B_i A_i`` into W0 and re-initialises LoRA.

Wang, Shen, Zhang, Gong, Wang, Wang, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv:2409.05976.

The aggregation is exact (the stacked product is the weighted sum of the client products), and the
cost is on the way down: each client receives every client's A and B, c·Σ r(d+k) numbers a round.
Stacking is along the rank dimension (B's columns, A's rows), so clients of different ranks stack
as they are — FLoRA's answer to rank heterogeneity.
After the fold, A is re-drawn (seeded by the run seed and the round, layer after layer in sorted order of
the layer names, so clients draw the same A from the seed alone, without it being sent, however their
state's keys are ordered) and B is zero.
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
        new_state = self.receive(state, broadcast)
        return self.finish(state, new_state, broadcast, uploads, weights)

    def receive(self, state: State, broadcast: State) -> State:
        weights = broadcast[WEIGHTS_KEY].tolist()
        ranks = broadcast[RANKS_KEY].tolist()
        next_round = int(broadcast[ROUND_KEY].item()) + 1
        new_state = dict(state)
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + next_round)
        for layer in sorted(layer_names_of(state)):  # the draw order of A: fixed by the names, not by the dict
            stack_B = broadcast[state_key(layer, "stack_B")].to(torch.float64).split(ranks, dim=1)
            stack_A = broadcast[state_key(layer, "stack_A")].to(torch.float64).split(ranks, dim=0)
            fold = sum(w * self.scaling * (B @ A) for w, B, A in zip(weights, stack_B, stack_A))
            delta_key = state_key(layer, "base_delta")
            new_state[delta_key] = add_residual(state.get(delta_key), fold.to(torch.float32))
            A_key, B_key = state_key(layer, "lora_A"), state_key(layer, "lora_B")
            rank, in_features = state[A_key].shape
            new_state[A_key] = kaiming_uniform_A(rank, in_features, generator).to(state[A_key].dtype)
            new_state[B_key] = torch.zeros_like(state[B_key])
        new_state.update({key: value for key, value in broadcast.items() if key.startswith(HEAD_PREFIX)})
        return new_state
