"""FRA-LoRA: full-rank aggregation ``ΔW = Σ w_i B_i A_i``, truncated by SVD to rank r → new B, A.

Trautmann, Hales, Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning", arXiv:2501.06332.

By Eckart–Young the new ``B A`` is the best rank-r approximation of the exact aggregate; what is cut
off is reported as the aggregation error. The singular values are split evenly between the
factors: ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (divided by the LoRA scaling, so that
``scaling · B A`` is the truncation).
"""

from collections.abc import Sequence

import torch

from fedsim.methods import register
from fedsim.methods.base import Method, RoundResult, State, Upload, layer_names_of, state_key


@register("fra-lora", paper="https://arxiv.org/abs/2501.06332", rule="rank-r truncated SVD of `Σ w_i B_i A_i`", exact="no (truncation reported)")
class FRALoRA(Method):
    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)  # the head (and a baseline for the broadcast keys)
        new_state = {**state, **averaged}
        ideal = {}
        for layer in layer_names_of(state):
            ideal[layer] = self.ideal_update(state, uploads, weights, layer)
            B, A = truncated_factors(ideal[layer], self.rank, self.scaling)
            new_state[state_key(layer, "lora_B")] = B.to(state[state_key(layer, "lora_B")].dtype)
            new_state[state_key(layer, "lora_A")] = A.to(state[state_key(layer, "lora_A")].dtype)
        broadcast = {key: new_state[key] for key in averaged}
        return self.finish(state, new_state, broadcast, uploads, weights, ideal)


def truncated_factors(delta_weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``scaling · B A`` the best rank-``rank`` approximation of ``delta_weight`` (float64)."""
    U, S, Vh = torch.linalg.svd(delta_weight.to(torch.float64), full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)
    return U[:, :rank] * root, root[:, None] * Vh[:rank]
