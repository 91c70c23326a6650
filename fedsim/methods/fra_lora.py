"""FRA-LoRA: full-rank aggregation ``ΔW = Σ w_i B_i A_i``, truncated by SVD to rank r → new B, A.

Trautmann, Hales, Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning", arXiv:2501.06332.

By Eckart–Young the new ``B A`` is the best rank-r approximation of the exact aggregate; what is cut
off is reported as the aggregation error. The singular values are split evenly between the
factors: ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (divided by the LoRA scaling, so that
``scaling · B A`` is the truncation). ``ΔW`` has rank at most n = Σ r_i, so its SVD is taken from
the stacked factors (two thin QRs and an n×n SVD) wherever n < min(d, k): exact, and no d×k matrix.
The even split is FRA-LoRA's here; a subclass may put all of S in B (``split = "B"``: FlexLoRA's code).
"""

from collections.abc import Sequence

import torch

from fedsim.adapters.state import State, layer_names_of, state_key
from fedsim.methods import register
from fedsim.methods.agg_error import Term, ideal_terms, stacked
from fedsim.methods.base import Method, RoundResult, Upload


@register("fra-lora", paper="https://arxiv.org/abs/2501.06332", rule="rank-r truncated SVD of `Σ w_i B_i A_i`", exact="no (truncation reported)")
class FRALoRA(Method):
    split = "even"  # how the singular values are shared between B and A (``truncated_factors``)

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)  # the head (and a baseline for the broadcast keys)
        new_state = {**state, **averaged}
        for layer in layer_names_of(state):
            B_key, A_key = state_key(layer, "lora_B"), state_key(layer, "lora_A")
            if state[A_key].is_meta:  # counting bytes (analysis.comm): the shapes are all there is, and they do not change
                new_state[B_key], new_state[A_key] = state[B_key].new_empty(state[B_key].shape), state[A_key].new_empty(state[A_key].shape)
                continue
            B, A = truncated_factors(ideal_terms(state, uploads, weights, layer, self.scaling), self.rank, self.scaling, self.split)
            new_state[B_key] = B.to(state[B_key].dtype)
            new_state[A_key] = A.to(state[A_key].dtype)
        broadcast = {key: new_state[key] for key in averaged}
        return self.finish(state, new_state, broadcast, uploads, weights)


def truncated_factors(terms: Sequence[Term], rank: int, scaling: float, split: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``scaling · B A`` the best rank-``rank`` approximation of ``ΔW = Σ_t coef_t B_t R_t A_t`` (float64).

    ``split``: ``even``, ``B = U_r √S_r / √scaling``, ``A = √S_r V_rᵀ / √scaling``; ``B``, ``B = U_r S_r / scaling``, ``A = V_rᵀ``.

    With ``ΔW = L R`` (the stacked factors, n columns): ``L = Q_L T_L``, ``Rᵀ = Q_R T_R``, so
    ``ΔW = Q_L (T_L T_Rᵀ) Q_Rᵀ`` and the SVD of the n×n core gives ΔW's. Where n ≥ min(d, k), the dense SVD.
    """
    left, right = stacked(terms)
    (d, n), k = left.shape, right.shape[1]
    if n < min(d, k):
        Q_left, T_left = torch.linalg.qr(left)
        Q_right, T_right = torch.linalg.qr(right.mT)
        U, S, Vh = torch.linalg.svd(T_left @ T_right.mT)
        U, Vh = Q_left @ U, Vh @ Q_right.mT
    else:
        U, S, Vh = torch.linalg.svd(left @ right, full_matrices=False)
    if split == "B":
        B, A = U[:, :rank] * (S[:rank] / scaling), Vh[:rank]
    else:
        root = torch.sqrt(S[:rank] / scaling)
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
    if B.shape[1] < rank:  # ΔW has rank n < r: the missing components are zero
        B = torch.cat([B, B.new_zeros(d, rank - B.shape[1])], dim=1)
        A = torch.cat([A, A.new_zeros(rank - A.shape[0], k)], dim=0)
    return B, A
