"""FedSVD: clients train B only; the server refactorises ``B̄A`` by SVD into an orthonormal A and a new B (exact).

Lee, Park, Lee, Wagner, Seong, Bocklet, Lee, Hwang, "FedSVD: Adaptive Orthogonalization for Private
Federated Learning with LoRA", NeurIPS 2025, arXiv:2505.12805 (code: github.com/seanie12/fed-svd).

Rule: ``B̄ = Σ w_i B_i`` (A frozen during the round, as in FFA-LoRA), then ``B̄A = U S Vᵀ`` and
``A ← Vᵀ_r`` (orthonormal rows: the right singular vectors), ``B ← U_r S_r``. The new A follows the
principal directions of the aggregate; being orthonormal it bounds the gradient of B, which is what
keeps DP-SGD's clipping and noise from being amplified (the paper's point: it is made for DP).

Exact: ``Σ w_i B_i A = B̄A`` (A shared), and ``B̄A`` has rank ≤ r, so its rank-r SVD reproduces it;
``agg_error`` is float rounding. The SVD is taken without forming the d×k product: ``B̄ = QR``
(reduced QR), SVD of the r×k matrix ``R A = U' S Vᵀ``, ``U = Q U'`` — O(r²(d+k)) a layer.
The components come out ordered by singular value, so a rank-r_i client (``clients.ranks``) trains
the best rank-r_i part of the current adapter.

Messages per client and round, per adapted layer (W0 d×k, rank r; plus the head where
``method.train_head``): up ``r·d`` (B_i); down ``r·(d+k)`` (the new A and B).

Where fedsim departs from the paper: none in the rule. As in the authors' code, the first round
starts from LoRA's initialisation (A random, B = 0; PEFT's default there, Kaiming-uniform here),
so A is orthonormal from the first aggregation on, and the refactorisation runs every round (their
``recalculate_svd_period=1``, no warm-up). Their RoBERTa runs freeze the classification head; here
``method.train_head`` decides, as for every method.
"""

from collections.abc import Sequence

import torch

from fedsim.adapters.state import State, layer_names_of, state_key
from fedsim.methods import register
from fedsim.methods.base import Method, RoundResult, Upload


@register("fedsvd", paper="https://arxiv.org/abs/2505.12805", trains="B; A orthonormal, shared", rule="SVD of `B̄A` → orthonormal A, new B")
class FedSVD(Method):
    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_B",)

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)
        new_state = {**state, **averaged}
        for layer in layer_names_of(state):
            A_key, B_key = state_key(layer, "lora_A"), state_key(layer, "lora_B")
            B, A = orthonormal_refactor(averaged[B_key], state[A_key])
            new_state[A_key], new_state[B_key] = A.to(state[A_key].dtype), B.to(state[B_key].dtype)
        broadcast = {key: new_state[key] for key in new_state if key in averaged or key.endswith(".lora_A")}
        return self.finish(state, new_state, broadcast, uploads, weights)


def orthonormal_refactor(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r S_r, Vᵀ_r)`` of the SVD of ``B A`` (float64): the same product, with an orthonormal A."""
    if B.is_meta:  # counting bytes (analysis.comm): the shapes of the reduced QR and SVD, without their meta arithmetic
        (d, r), k = B.shape, A.shape[1]
        rank = min(d, r, k)
        return torch.empty(d, rank, dtype=torch.float64, device="meta"), torch.empty(rank, k, dtype=torch.float64, device="meta")
    Q, R = torch.linalg.qr(B.to(torch.float64))
    U, S, Vh = torch.linalg.svd(R @ A.to(torch.float64), full_matrices=False)
    return (Q @ U) * S, Vh
