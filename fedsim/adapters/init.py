"""LoRA-SB initialisation by update approximation (Ponkshe et al., arXiv:2411.19557, §3).

The first step of Adam on a full fine-tuning gradient is ``−η·sign(g)``. LoRA-SB takes that step's
best rank-r approximation as the adapter's starting point: ``G = −η·sign(Σ ∇W)``, ``G ≈ U S Vᵀ``,
``B = U_r``, ``R = diag(S_r)``, ``A = V_rᵀ`` (in the layer's out×in orientation, scaling 1), so that
``B R A`` is the truncated SVD of ``G``.

Memory, at the papers' scale (Mistral-7B: 224 target matrices, 7.0B numbers): the gradient sum lives
in the target weights' own ``.grad`` buffers, on the model's device, in their dtype (autograd adds
each batch into them); a layer's factors are then computed on that device from its sign, taken in
float32 a block of rows at a time, so the extra memory at any time is a block (16 MiB) plus the
randomized SVD's (d+k)·q — well under one float32 copy of the largest target weight. Only B, R, A
(r·(d+k+r) numbers a layer) ever leave the device.

LoRA's own initialisation (``kaiming_uniform_A``, with B = 0) is here too: the methods that train A and B start from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

# The randomized SVD's oversampling p (q = r + p columns) and power (subspace) iterations; see lora_sb_factors.
OVERSAMPLE = 10
POWER_ITERATIONS = 2


def kaiming_uniform_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's A initialisation (PEFT and Hu et al.): U(−1/√k, 1/√k), from a seeded generator."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def accumulate_gradients(model: nn.Module, layer_names: list[str], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """``Σ_batches ∂loss/∂W`` for the weight of each named ``nn.Linear``, keyed by name.

    The sums are the weights' own gradient buffers, accumulated by autograd over the batches: on the
    model's device, in the weights' dtype (float32 for a float32 model; a bfloat16 model sums in
    bfloat16, as its gradients are bfloat16 anyway — rounding can flip a sign only where the sum is
    within rounding of zero, an entry whose sign the calibration sample does not decide), with no
    copy beyond the model's own gradients. The model runs in eval mode (no dropout), so the sum
    depends on the data alone. Only the named weights take gradients; ``requires_grad`` flags are
    restored and every ``.grad`` is detached from the model afterwards.
    """
    weights = {name: model.get_submodule(name).weight for name in layer_names}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            model(**batch).loss.backward()  # autograd adds into each weight's .grad
        for name, w in weights.items():
            sums[name] = w.grad if w.grad is not None else torch.zeros_like(w)
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return sums


def lora_sb_factors(grad_sum: torch.Tensor, rank: int, lr: float, seed: int = 0, oversample: int = OVERSAMPLE,
                    niter: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, R, A)``, float32 on ``grad_sum``'s device, with ``B R A`` the rank-``rank`` truncated SVD of ``−lr·sign(grad_sum)``.

    A d×k matrix with ``2(rank + oversample) ≥ min(d, k)`` gets the exact SVD (float64). A larger one
    gets the randomized SVD of Halko, Martinsson and Tropp (2011, Algorithms 4.4 and 5.1; what
    ``torch.svd_lowrank`` computes, and LoRA-SB's code uses): q = rank + ``oversample`` Gaussian test
    vectors (drawn on the CPU from ``seed``, so every device starts from the same ones), ``niter``
    subspace iterations, 2·niter + 2 passes over the sign matrix — 6 at the defaults, against the
    O(d·k·min(d,k)) of a full SVD (bench/llm_scale.py times both at Mistral-7B's shapes). The passes
    read the sign a block of rows at a time (``sign_products``), so the extra memory is a block and
    the (d+k)·q of the sketch, never a d×k copy.

    The accuracy this keeps depends on the sign matrix's singular gap. Its spectrum is a few leading
    singular values carried by the gradient's structure, then a flat Marchenko–Pastur-like bulk (the
    sign of many tokens' sum is nearly ±1 noise). A component j above σ_{q+1} is found with an error
    that shrinks as (σ_{q+1}/σ_j)^(2·niter+1): where σ_{q+1}/σ_r is small, ``B R A`` equals the exact
    truncation to float32 precision (tests/adapters/test_lora_sb.py). Inside the flat bulk no method
    can match the exact SVD's vectors (there, a perturbation of one entry rotates them); what is kept
    is near-optimality: measured on the sign of a 2048×2048 sum of 8,192 random tokens' outer products
    at r = 100 (a flat bulk), ‖G − B R A‖_F is within 1.3% of the Eckart–Young optimum ‖G − G_r‖_F
    and ``B R A`` carries 88% of ‖G_r‖²_F; of 128 tokens' (a gap), within 1.0% and 98.6%;
    bench/llm_scale.py reports both at Mistral-7B's shapes. Raise ``niter`` or ``oversample`` for
    more, at proportional cost. The sign (±1, exact in any dtype) is taken in float32; −lr scales S.
    """
    d, k = grad_sum.shape
    q = min(rank + oversample, d, k)
    grad_sum = grad_sum.detach()
    if 2 * q >= min(d, k):
        U, S, Vh = torch.linalg.svd(torch.sign(grad_sum).to(torch.float64), full_matrices=False)
        U, S, V = U.float(), S.float(), Vh.mH.float()
    else:
        tall = d >= k  # the range finder works on the tall side, as torch.svd_lowrank does: G, or Gᵀ
        times, times_transposed = sign_products(grad_sum)
        if not tall:
            times, times_transposed = times_transposed, times
        test = torch.randn(min(d, k), q, generator=torch.Generator().manual_seed(seed)).to(grad_sum.device)
        Q = torch.linalg.qr(times(test)).Q
        for _ in range(niter):
            Q = torch.linalg.qr(times(torch.linalg.qr(times_transposed(Q)).Q)).Q
        U_small, S, Vh = torch.linalg.svd(times_transposed(Q).mT, full_matrices=False)  # Qᵀ G = U_s S Vh
        U, V = Q @ U_small, Vh.mT
        if not tall:
            U, V = V, U
    # −lr·sign = U (lr·S) (−V)ᵀ: the step's own SVD, with the sign carried by A.
    return U[:, :rank].contiguous(), torch.diag(lr * S[:rank]), (-V[:, :rank]).mT.contiguous()


def sign_products(matrix: torch.Tensor, block_elements: int = 1 << 22):
    """``(X ↦ sign(M) X, Y ↦ sign(M)ᵀ Y)`` in float32, computing the sign of ``block_elements`` entries of M at a time."""
    rows = min(matrix.shape[0], max(1, block_elements // matrix.shape[1]))
    starts = range(0, matrix.shape[0], rows)
    buffer = torch.empty(rows, matrix.shape[1], dtype=torch.float32, device=matrix.device)  # one block, reused

    def block(start: int) -> torch.Tensor:
        part = matrix[start:start + rows]
        return buffer[:len(part)].copy_(part).sign_()

    def times(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(start) @ x for start in starts])

    def times_transposed(y: torch.Tensor) -> torch.Tensor:
        out = y.new_zeros(matrix.shape[1], y.shape[1])
        for start in starts:
            out.addmm_(block(start).mT, y[start:start + rows])
        return out

    return times, times_transposed


def layer_seed(seed: int, index: int) -> int:
    """The randomized SVD's seed for the ``index``-th adapted layer of a run seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index), 7]).generate_state(1, np.uint32)[0])
