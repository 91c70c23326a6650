"""LoRA-FAIR: FedIT's averages, then a server-side correction of B toward ``Σ w_i B_i A_i`` (inexact, reported).

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv:2411.14961.

Rule, per adapted layer: ``Ā = Σ w_i A_i``, ``B̄ = Σ w_i B_i`` (FedIT), and the ideal update
``ΔW = Σ w_i B_i A_i``; the server keeps Ā and replaces B̄ by ``B̄' = B̄ + ΔB``, with ΔB chosen so
that ``B̄'Ā`` approaches ΔW while B̄' stays near B̄ (the regulariser: clients resume from an
average, the paper's "Avg-Initial", not from a re-initialisation). Clients start the next round
from Ā and B̄'. B, not A, carries the correction (the paper's ablation prefers it).

fedsim solves, in closed form and in float64,

    B̄' = argmin_X ‖ΔW − X Ā‖²_F + μ ‖X − B̄‖²_F = (ΔW Āᵀ + μ B̄)(Ā Āᵀ + μ I)⁻¹,
    μ = λ · tr(Ā Āᵀ) / r,  λ = ``LoRAFAIR.regularisation`` = 0.01,

(ΔW and the products without the LoRA scaling, which cancels). ``ΔW Āᵀ = Σ w_i B_i (A_i Āᵀ)`` is
formed from r×r pieces, never the d×k product.

Exactness: no. What is left, ``‖ΔW − B̄'Ā‖ / ‖ΔW‖`` (the part of ΔW outside Ā's row space, plus
what the regulariser holds back), is ``agg_error``. It is never above FedIT's for the same uploads (B̄
is a candidate X with no penalty), and at λ = 0 it is the least-squares minimum over B.

Messages per client and round, per adapted layer (W0 d×k, rank r; plus the head where
``method.train_head``): up ``r·(d+k)`` (A_i, B_i); down ``r·(d+k)`` (Ā, B̄'). The correction costs
no bytes.

Where fedsim departs from the paper: the paper measures the match with cosine similarity,
``min S(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖``, and solves it with SGD on the server (λ = 0.01); fedsim uses the
Frobenius distance, which is the quantity ``agg_error`` reports, the squared norm in the regulariser,
and its exact minimiser: no server optimiser, its step size or its iterations to choose, and the same
result on every machine. λ is made scale-free by the mean eigenvalue of ĀĀᵀ; λ = 0.01 keeps the
paper's number, not its units. The paper's clients share one rank; with ``clients.ranks`` the
averages are zero-padded as for FedIT and ΔW uses each client's own rank.
"""

from collections.abc import Sequence

import torch

from fedsim.methods import register
from fedsim.methods.base import Method, RoundResult, State, Upload, layer_names_of, state_key


@register("lora-fair", paper="https://arxiv.org/abs/2411.14961", trains="A, B", rule="FedIT, then B corrected toward `Σ w_i B_i A_i`", exact="no (error reported)")
class LoRAFAIR(Method):
    regularisation = 0.01  # λ: how far B̄' may move from B̄, relative to the mean eigenvalue of ĀĀᵀ

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)
        for layer in layer_names_of(state):
            B_key, A_key = state_key(layer, "lora_B"), state_key(layer, "lora_A")
            A_mean = averaged[A_key].to(torch.float64)
            if A_mean.is_meta:  # counting bytes (analysis.comm): B's shape is all there is, and meta arithmetic is slow
                continue
            target = sum(w * B @ (A @ A_mean.T) for w, (B, _, A) in zip(weights, (self.client_factors(state, u, layer) for u in uploads)))
            averaged[B_key] = corrected_B(target, averaged[B_key], A_mean, self.regularisation).to(state[B_key].dtype)
        return self.finish(state, {**state, **averaged}, averaged, uploads, weights)


def corrected_B(target: torch.Tensor, B_mean: torch.Tensor, A_mean: torch.Tensor, regularisation: float) -> torch.Tensor:
    """``argmin_X ‖ΔW − X Ā‖² + μ‖X − B̄‖²`` given ``target = ΔW Āᵀ`` (float64); B̄ itself if Ā is zero."""
    if A_mean.is_meta:  # counting bytes (analysis.comm): shapes only
        return B_mean.to(torch.float64)
    gram = A_mean @ A_mean.T
    mu = regularisation * torch.trace(gram) / gram.shape[0]
    if mu <= 0:
        return B_mean.to(torch.float64)
    system = gram + mu * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, (target + mu * B_mean.to(torch.float64)).T).T
