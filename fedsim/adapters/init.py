"""LoRA-SB initialisation by update approximation (Ponkshe et al., arXiv:2411.19557, §3).

The first step of Adam on a full fine-tuning gradient is ``−η·sign(g)``. LoRA-SB takes that step's
best rank-r approximation as the adapter's starting point: ``G = −η·sign(Σ ∇W)``, ``G ≈ U S Vᵀ``,
``B = U_r``, ``R = diag(S_r)``, ``A = V_rᵀ`` (in the layer's out×in orientation, scaling 1), so that
``B R A`` is the truncated SVD of ``G``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def accumulate_gradients(model: nn.Module, layer_names: list[str], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """``Σ_batches ∂loss/∂W`` (float64, on CPU) for the weight of each named ``nn.Linear`` of the un-adapted model.

    The model runs in eval mode (no dropout), so the sum depends on the data alone. Only the named
    weights take gradients; ``requires_grad`` flags are restored afterwards.
    """
    weights = {name: model.get_submodule(name).weight for name in layer_names}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    sums = {name: torch.zeros(w.shape, dtype=torch.float64) for name, w in weights.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            for w in weights.values():
                w.grad = None
            model(**batch).loss.backward()
            for name, w in weights.items():
                sums[name] += w.grad.detach().to("cpu", torch.float64)
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return sums


def lora_sb_factors(grad_sum: torch.Tensor, rank: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, R, A)`` with ``B R A`` the rank-``rank`` truncated SVD of ``−lr·sign(grad_sum)``, in float64."""
    sign_step = -lr * torch.sign(grad_sum.to(torch.float64))
    U, S, Vh = torch.linalg.svd(sign_step, full_matrices=False)
    return U[:, :rank].contiguous(), torch.diag(S[:rank]), Vh[:rank].contiguous()
