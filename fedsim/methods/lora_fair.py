"""LoRA-FAIR: FedIT's averages, then a server-side correction of B toward ``Σ w_i B_i A_i`` (inexact, reported).

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv:2411.14961.

Rule, per adapted layer: ``Ā = Σ w_i A_i``, ``B̄ = Σ w_i B_i`` (FedIT), the ideal update
``ΔW = Σ w_i B_i A_i``; the server keeps Ā and sends ``B̄' = B̄ + ΔB``. Clients start the next round
from Ā and B̄' (the paper's "Avg-Initial"). B, not A, carries the correction (the paper's ablation).

``method.lora_fair_correction`` chooses ΔB:

- ``paper`` (default), the paper's objective (its Eq. 8), with S the cosine similarity read as a
  distance and λ = 0.01::

      ΔB = argmin 1 − cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖_F      (cos of the flattened matrices)

  solved as the paper does, by SGD on the server: here plain gradient descent (the objective holds no
  data, so every step is the full gradient), ΔB₀ = 0, ``steps`` = 1000 fixed steps of size
  ``‖B̄Ā‖²_F / (2 λ_max(ĀĀᵀ))``, float64, no randomness. The iterates are those of gradient descent on
  the d×r matrix ΔB, computed exactly in the span of ``[ΔWĀᵀ, B̄]`` (every gradient lies there), so a
  step costs O(r³) and no d×k matrix is formed. ΔB = 0 where the cosine is undefined (ΔW = 0 or
  B̄Ā = 0) or where 0 is already the minimiser (``‖∇cos‖ ≤ λ`` there).
- ``closed-form``: fedsim's earlier Frobenius ridge, exact,
  ``B̄' = argmin_X ‖ΔW − XĀ‖²_F + μ‖X − B̄‖²_F = (ΔWĀᵀ + μB̄)(ĀĀᵀ + μI)⁻¹``, ``μ = λ·tr(ĀĀᵀ)/r``.

(ΔW and the products without the LoRA scaling, which cancels in both.) ``ΔWĀᵀ = Σ w_i B_i (A_i Āᵀ)`` and
``‖ΔW‖_F`` are formed from r×r pieces.

Exactness: no. ``agg_error`` is ``‖ΔW − B̄'Ā‖ / ‖ΔW‖``. The closed form is never above FedIT's error (B̄
is a candidate). The paper's correction matches ΔW's direction, not its size: the cosine ignores the
scale of B̄'Ā, which only the regulariser pins (near B̄'s), so nothing bounds its ``agg_error`` by FedIT's.
Where λ‖ΔB‖ is weak against the cosine (small B, as early in training), the objective is nearly flat
along that scale and 1000 steps stop short of the minimiser there (the test measures by how much).

Messages per client and round, per adapted layer (W0 d×k, rank r; plus the head where
``method.train_head``): up ``r·(d+k)`` (A_i, B_i); down ``r·(d+k)`` (Ā, B̄'). The correction costs
no bytes.

Where fedsim departs from the paper, or could not check it: the paper's S is "cosine similarity" to be
minimised, read here as ``1 − cos``; its ‖ΔB‖ taken as the Frobenius norm, not squared, as printed.
The server's learning rate, step count, momentum and ΔB's initialisation were not found in the text
read (its official code was not available): the step size, 1000 steps, no momentum and ΔB₀ = 0 are
fedsim's. The paper's clients share one rank; with ``clients.ranks`` the averages are zero-padded as for
FedIT and ΔW uses each client's own rank.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsim.adapters.state import State, layer_names_of, state_key
from fedsim.config import setting
from fedsim.methods import register
from fedsim.methods.agg_error import client_factors, squared_norm
from fedsim.methods.base import Method, MethodOptions, RoundResult, Upload


@dataclass
class LoRAFAIROptions(MethodOptions):
    """Which server correction of B̄ LoRA-FAIR applies: its paper's (Bian, Wang, Zhang, Xu, arXiv:2411.14961, Eq. 8) or
    fedsim's closed-form ridge (this module's docstring)."""

    lora_fair_correction: str = setting("paper", "lora-fair: the server's correction ΔB of B̄ — paper (min 1 − cos(ΔW, (B̄+ΔB)Ā) "
                                        "+ 0.01‖ΔB‖_F by gradient descent from ΔB = 0, fixed steps, float64) or closed-form "
                                        "(fedsim's Frobenius ridge, solved exactly)", choices=("paper", "closed-form"))


@register("lora-fair", paper="https://arxiv.org/abs/2411.14961", trains="A, B",
          rule="FedIT, then B corrected toward `Σ w_i B_i A_i` (the paper's cosine objective, or a closed-form ridge)",
          exact="no (error reported)")
class LoRAFAIR(Method):
    options_class = LoRAFAIROptions
    regularisation = 0.01  # the paper's λ
    steps = 1000  # gradient steps of the paper's correction (the paper does not give its count)

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        averaged = self.average(state, uploads, weights)
        for layer in layer_names_of(state):
            B_key, A_key = state_key(layer, "lora_B"), state_key(layer, "lora_A")
            A_mean = averaged[A_key].to(torch.float64)
            if A_mean.is_meta:  # counting bytes (analysis.comm): B's shape is all there is, and meta arithmetic is slow
                continue
            factors = [client_factors(state, u, layer) for u in uploads]
            target = sum(w * B @ (A @ A_mean.T) for w, (B, _, A) in zip(weights, factors))
            B_mean = averaged[B_key].to(torch.float64)
            if self.options.lora_fair_correction == "closed-form":
                corrected = corrected_B(target, B_mean, A_mean, self.regularisation)
            else:
                ideal_norm = math.sqrt(squared_norm([(w, B, None, A) for w, (B, _, A) in zip(weights, factors)]))
                corrected = B_mean + paper_correction(target, ideal_norm, B_mean, A_mean, self.regularisation, self.steps)
            averaged[B_key] = corrected.to(state[B_key].dtype)
        return self.finish(state, {**state, **averaged}, averaged, uploads, weights)


def paper_objective(delta_B: torch.Tensor, ideal: torch.Tensor, B_mean: torch.Tensor, A_mean: torch.Tensor,
                    regularisation: float) -> float:
    """``1 − cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖_F`` written out on the d×k matrices (float64): for checking, not for solving."""
    product = (B_mean + delta_B) @ A_mean
    cos = (ideal * product).sum() / (torch.linalg.matrix_norm(ideal) * torch.linalg.matrix_norm(product))
    return float(1 - cos + regularisation * torch.linalg.matrix_norm(delta_B))


def paper_correction(target: torch.Tensor, ideal_norm: float, B_mean: torch.Tensor, A_mean: torch.Tensor,
                     regularisation: float, steps: int) -> torch.Tensor:
    """ΔB of the paper's objective by ``steps`` gradient steps from 0, given ``target = ΔWĀᵀ`` and ``ideal_norm = ‖ΔW‖_F``.

    Gradient descent on ΔB (d×r), run on its coefficients in ``S = [ΔWĀᵀ, B̄]``: ΔB = S M, (B̄ + ΔB) = S C,
    and every gradient is S H, so ``M ← M − η H`` gives the same iterates in O(r³) a step (float64).
    """
    gram = A_mean @ A_mean.T  # G = ĀĀᵀ
    r = gram.shape[0]
    span = torch.cat([target, B_mean], dim=1)
    K = span.T @ span  # SᵀS
    eye = torch.eye(r, dtype=torch.float64, device=B_mean.device)
    start, pull = torch.cat([torch.zeros_like(eye), eye]), torch.cat([eye, torch.zeros_like(eye)])  # B̄ = S [0; I], ΔWĀᵀ = S [I; 0]
    size2 = float((K @ start * (start @ gram)).sum())  # ‖B̄Ā‖²_F
    top = float(torch.linalg.eigvalsh(gram)[-1]) if r else 0.0
    zero = torch.zeros_like(B_mean)
    if ideal_norm <= 0 or size2 <= 0 or top <= 0:  # the cosine is undefined: no correction
        return zero
    step = size2 / (2 * top)
    K_start, M = K @ start, torch.zeros_like(start)
    KM = torch.zeros_like(M)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # r×r steps: threads only add synchronisation (10-40x slower on 2 busy cores)
    try:
        for _ in range(steps):
            C = start + M
            CG = C @ gram
            n = math.sqrt(float(((K_start + KM) * CG).sum()))  # ‖(B̄ + ΔB)Ā‖_F
            a = float(torch.trace((K_start + KM)[:r]))  # <ΔW, (B̄ + ΔB)Ā> = <ΔWĀᵀ, B̄ + ΔB>
            H = -pull / (ideal_norm * n) + (a / (ideal_norm * n**3)) * CG  # the cosine term's gradient, in S's coefficients
            norm_dB = math.sqrt(max(0.0, float((M * KM).sum())))
            if norm_dB > 0:
                H = H + (regularisation / norm_dB) * M
            elif math.sqrt(max(0.0, float((H * (K @ H)).sum()))) <= regularisation:  # at ΔB = 0, and 0 is the minimiser
                return zero
            M = M - step * H
            KM = K @ M
    finally:
        torch.set_num_threads(threads)
    return span @ M


def corrected_B(target: torch.Tensor, B_mean: torch.Tensor, A_mean: torch.Tensor, regularisation: float) -> torch.Tensor:
    """``argmin_X ‖ΔW − X Ā‖² + μ‖X − B̄‖²`` given ``target = ΔW Āᵀ`` (float64); B̄ itself if Ā is zero."""
    gram = A_mean @ A_mean.T
    mu = regularisation * torch.trace(gram) / gram.shape[0]
    if mu <= 0:
        return B_mean.to(torch.float64)
    system = gram + mu * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, (target + mu * B_mean.to(torch.float64)).T).T
