"""The stacked message: every aggregated client's A and B, from which a client computes ``Σ w_i B_i A_i`` itself.

What FLoRA sends down every round (Wang et al., arXiv:2409.05976: "stacking"), and FedEx-LoRA's ``stacked`` downlink
(``method.fedex_downlink``): c·Σ r_i(d+k) numbers, the clients' weights and ranks beside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.adapters.state import State, state_key
from fedsim.methods.agg_error import client_rank
from fedsim.methods.base import Upload

STACK_WEIGHTS, STACK_RANKS = "stack.weights", "stack.ranks"


def stack_uploads(layers: Sequence[str], uploads: Sequence[Upload], weights: Sequence[float], full_rank: int) -> State:
    """Every client's A and B of each layer stacked along the rank (A's rows, B's columns), with the clients'
    weights (float64) and ranks."""
    ranks = [client_rank(u, layers[0]) or full_rank for u in uploads]  # a client's rank is the same in every layer
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
