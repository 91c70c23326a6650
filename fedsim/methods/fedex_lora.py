"""FedEx-LoRA: FedAvg of A and B, plus the residual ``Σ w_i B_i A_i − B̄Ā`` folded into W0 (exact).

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models", arXiv:2410.09432.

What goes down each round (``method.fedex_downlink``):
- ``residual``: the averaged A and B and the residual (d×k a layer, float32), which the client adds to W0;
- ``stacked``: every aggregated client's A and B (c·Σ r(d+k), with their weights), from which a client
  computes Ā, B̄ and the residual itself — the message the Fed-SB paper counts for FedEx-LoRA;
- ``auto``: whichever of the two is smaller in that round (stacked wins while c·r(d+k) < d·k).
Both give the client bit-for-bit the state the server keeps: one function (``fold``) computes it on both sides.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsim.adapters.state import HEAD_PREFIX, State, layer_names_of, nbytes, state_key
from fedsim.config import setting
from fedsim.methods import register
from fedsim.methods.agg_error import ideal_update
from fedsim.methods.base import Method, MethodOptions, RoundResult, Upload
from fedsim.methods.stack import stack_uploads, unstack


@dataclass
class FedExLoRAOptions(MethodOptions):
    """What FedEx-LoRA sends down (Singhal, Ponkshe, Vepakomma, arXiv:2410.09432): its residual, or the stacked adapters
    from which a client computes it, as the Fed-SB paper (arXiv:2502.15436) counts FedEx-LoRA's messages."""

    fedex_downlink: str = setting("residual", "fedex-lora: what goes down — residual (the d×k correction), stacked (every "
                                  "client's A and B, c·Σr(d+k), from which a client computes it, as the papers count it) or "
                                  "auto (the cheaper in that round)", choices=("residual", "stacked", "auto"))


@register("fedex-lora", paper="https://arxiv.org/abs/2410.09432", rule="FedIT + residual `Σ w_i B_i A_i − B̄Ā` folded into W0")
class FedExLoRA(Method):
    options_class = FedExLoRAOptions
    comm_variants = ({"fedex_downlink": "residual"}, {"fedex_downlink": "stacked"})

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        new_state, averaged, residuals, layer_terms = self.fold(state, uploads, weights)
        broadcast = {**averaged, **{state_key(layer, "residual"): residual for layer, residual in residuals.items()}}
        if self.options.fedex_downlink != "residual":
            head = {key: value for key, value in averaged.items() if key.startswith(HEAD_PREFIX)}
            stacked = {**stack_uploads(layer_names_of(state), uploads, weights, self.rank), **head}
            if self.options.fedex_downlink == "stacked" or nbytes(stacked) < nbytes(broadcast):
                broadcast = stacked
        return self.finish(state, new_state, broadcast, uploads, weights, layer_terms)

    def receive(self, state: State, broadcast: State) -> State:
        head = {key: value for key, value in broadcast.items() if key.startswith(HEAD_PREFIX)}
        if any(key.endswith(".stack_A") for key in broadcast):  # stacked: the client computes the fold itself
            uploads, weights = unstack(broadcast)
            return {**self.fold(state, uploads, weights)[0], **head}
        new_state = dict(state)
        for key, value in broadcast.items():
            layer, kind = key.rsplit(".", 1)
            if kind == "residual":
                delta_key = state_key(layer, "base_delta")
                new_state[delta_key] = add_residual(state.get(delta_key), value)
            else:
                new_state[key] = value
        return new_state

    def fold(self, state: State, uploads: Sequence[Upload], weights: Sequence[float]):
        """(new state, the averaged tensors, each layer's residual (float32), each layer's (squared error, squared ideal
        norm)). The residual is formed from the ideal update (d×k, float64) anyway, so the error is measured here: what
        the stored float32 fold misses of the exact residual is the method's whole error."""
        averaged = self.average(state, uploads, weights)
        new_state = {**state, **averaged}
        residuals, layer_terms = {}, {}
        for layer in layer_names_of(state):
            residual = ideal_update(state, uploads, weights, layer, self.scaling)  # Σ w_i s B_i A_i, d×k float64
            mean_B = averaged[state_key(layer, "lora_B")].to(torch.float64)
            mean_A = averaged[state_key(layer, "lora_A")].to(torch.float64)
            ideal_norm2 = None if residual.is_meta else float(torch.linalg.matrix_norm(residual) ** 2)
            if not residual.is_meta:  # counting bytes (analysis.comm): the residual's shape is all there is
                residual.addmm_(mean_B, mean_A, alpha=-self.scaling)  # − s B̄Ā, in place
            residuals[layer] = residual.to(torch.float32)
            delta_key = state_key(layer, "base_delta")
            new_state[delta_key] = add_residual(state.get(delta_key), residuals[layer])
            if ideal_norm2 is not None:
                applied = new_state[delta_key].to(torch.float64)
                if delta_key in state:
                    applied -= state[delta_key].to(torch.float64)
                layer_terms[layer] = (float(torch.linalg.matrix_norm(residual - applied) ** 2), ideal_norm2)
        return new_state, averaged, residuals, layer_terms

def add_residual(base_delta: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """The accumulated W0 correction after one more residual (float32, the same on server and client)."""
    if base_delta is None or residual.is_meta:  # meta (counting bytes): a new tensor of the sum's shape
        return residual.clone()
    return base_delta + residual
