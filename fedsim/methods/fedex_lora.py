"""FedEx-LoRA: FedAvg of A and B, plus the residual ``Σ w_i B_i A_i − B̄Ā`` folded into W0 (exact).

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models", arXiv:2410.09432.

What goes down each round is the averaged A and B and the residual (d×k a layer), which the client
adds to its W0.
"""

from collections.abc import Sequence

import torch

from fedsim.methods.base import Method, RoundResult, State, Upload, dense, layer_names_of, state_key


class FedExLoRA(Method):
    name = "fedex-lora"
    paper = "https://arxiv.org/abs/2410.09432"

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)
        new_state = {**state, **averaged}
        broadcast = dict(averaged)
        layer_terms = {}
        for layer in layer_names_of(state):
            _, mean_B, _, mean_A = self.adapter_term(new_state, layer)
            residual = dense(self.ideal_terms(state, uploads, weights, layer))  # Σ w_i s B_i A_i (d×k, as the residual is)
            ideal_norm2 = float(torch.linalg.matrix_norm(residual) ** 2)
            residual.addmm_(mean_B, mean_A, alpha=-self.scaling)  # − s B̄Ā, in place
            residual32 = residual.to(torch.float32)
            delta_key = state_key(layer, "base_delta")
            new_state[delta_key] = add_residual(state.get(delta_key), residual32)
            broadcast[state_key(layer, "residual")] = residual32
            # what the stored (float32) fold misses of the exact residual: the method's whole error
            applied = new_state[delta_key].to(torch.float64)
            if delta_key in state:
                applied -= state[delta_key].to(torch.float64)
            layer_terms[layer] = (float(torch.linalg.matrix_norm(residual - applied) ** 2), ideal_norm2)
        return self.finish(state, new_state, broadcast, uploads, weights, layer_terms)

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
