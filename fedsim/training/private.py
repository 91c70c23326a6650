"""DP-SGD for K clients at once (Abadi et al. 2016, arXiv:1607.00133): each record's gradient clipped to its client's C,
each client's sum noised from its own generator and divided by its expected batch size, as Opacus's ``DPOptimizer``
does for that client alone (``loss_reduction="mean"``); the tests compare the two."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.adapters.layers import leading_block
from fedsim.privacy import PrivacySettings
from fedsim.training.stacking import Cohort, Segments


def clipped_records(segments: Segments, gradients: Sequence[torch.Tensor | None], max_norms: Sequence[float]) -> dict[str, torch.Tensor]:
    """Each record's gradient clipped to its client's C over all of that client's trained tensors together: key →
    (rows, …), row n in its client's slice.

    ``gradients``: of Σ_records loss with respect to ``segments.samples`` (each row's own copy: each record's own
    gradient; overwritten). ``max_norms``: C per client (indexed as the stacked tensors). The factor is Opacus's
    (``DPOptimizer.clip_and_accumulate``): min(1, C / (‖g‖ + 1e-6)).
    """
    per_key: dict[str, torch.Tensor] = {}
    for (key, _), gradient in zip(segments.samples, gradients):
        if gradient is not None:  # a layer used twice in a pass (tied weights) adds up
            per_key[key] = gradient if key not in per_key else per_key[key] + gradient
    if not per_key:
        return {}
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in per_key.values()], dim=1).norm(2, dim=1)
    limits = torch.tensor(list(max_norms), dtype=norms.dtype).to(norms.device).index_select(0, segments.row_client)
    factors = (limits / (norms + 1e-6)).clamp(max=1.0)
    return {key: gradient.mul_(factors.to(gradient.dtype).reshape(-1, *[1] * (gradient.dim() - 1))) for key, gradient in per_key.items()}


def noise_client_sums(cohort: Cohort, sums: dict[str, torch.Tensor], clients: Sequence[int], privacy: Sequence[PrivacySettings],
                      generators: Sequence[torch.Generator]) -> None:
    """Each of ``clients``' clipped sums + N(0, (σ_k C_k)²) on each of its own tensors, divided by its expected batch
    size: Opacus's ``DPOptimizer.add_noise`` and ``scale_grad`` (``loss_reduction="mean"``), client by client.

    Client k's noise is drawn from its own generator (seeded with its training seed, as ``PrivateStep`` seeds Opacus's),
    tensor by tensor in the method's order, each at the client's own shape (its rank's block; the padding gets none):
    the very numbers Opacus draws for the client trained alone, whichever clients share its cohort. An empty Poisson
    batch has a zero sum and still gets its noise.
    """
    for k in clients:
        std = privacy[k].noise_multiplier * privacy[k].max_grad_norm
        if std == 0:  # Opacus's _generate_noise: zeros, nothing drawn
            continue
        for key in cohort.order:
            block = leading_block(sums[key][k], cohort.shapes[k][key])
            block += torch.normal(0.0, std, size=block.shape, generator=generators[k], dtype=block.dtype, device=block.device)
    divisors = [1.0] * len(privacy)
    for k in clients:
        divisors[k] = float(privacy[k].expected_batch_size)
    for total in sums.values():
        total /= torch.tensor(divisors, dtype=total.dtype).to(total.device).reshape(-1, *[1] * (total.dim() - 1))


