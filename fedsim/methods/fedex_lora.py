"""FedEx-LoRA: FedAvg of A and B, plus the residual ``Σ w_i B_i A_i − B̄Ā`` folded into W0 (exact).

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models", arXiv:2410.09432.

What goes down each round is the averaged A and B and the residual (d×k a layer), which the client
adds to its W0.
"""

from collections.abc import Sequence

import torch

from fedsim.adapters.layers import adapter_product
from fedsim.methods.base import Method, RoundResult, State, Upload, layer_names_of, state_key


class FedExLoRA(Method):
    name = "fedex-lora"
    paper = "https://arxiv.org/abs/2410.09432"

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)
        new_state = {**state, **averaged}
        broadcast = dict(averaged)
        ideal = {}
        for layer in layer_names_of(state):
            ideal[layer] = self.ideal_update(state, uploads, weights, layer)
            mean_product = adapter_product(
                averaged[state_key(layer, "lora_B")].to(torch.float64),
                None,
                averaged[state_key(layer, "lora_A")].to(torch.float64),
                self.scaling,
            )
            residual = (ideal[layer] - mean_product).to(torch.float32)
            delta_key = state_key(layer, "base_delta")
            new_state[delta_key] = add_residual(state.get(delta_key), residual)
            broadcast[state_key(layer, "residual")] = residual
        return self.finish(state, new_state, broadcast, uploads, weights, ideal)

    def receive(self, state: State, broadcast: State) -> State:
        new_state = dict(state)
        for key, value in broadcast.items():
            layer, kind = key.rsplit(".", 1)
            if kind == "residual":
                delta_key = state_key(layer, "base_delta")
                new_state[delta_key] = add_residual(state.get(delta_key), value)
            else:
                new_state[key] = value
        return new_state


def add_residual(base_delta: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """The accumulated W0 correction after one more residual (float32, the same on server and client)."""
    return residual.clone() if base_delta is None else base_delta + residual
