"""The LoRA-SB layer: ``W0 x + B R A x`` with frozen B (d×r) and A (r×k) and a trainable R (r×r).

LoRA-SB: Ponkshe et al., "Initialization using update approximation is a silver bullet for
extreme efficient low-rank fine-tuning", arXiv:2411.19557. Fed-SB: Singhal et al., "Fed-SB: A Silver
Bullet for Extreme Communication Efficiency and Performance in (Private) Federated LoRA
Fine-Tuning", arXiv:2502.15436.

Why an injector of our own rather than a PEFT tuner: PEFT has no LoRA-SB, and a PEFT custom layer
would have to live inside ``LoraLayer``'s ModuleDicts, adapter names and merge logic, none of which
LoRA-SB needs. What we need is narrow: three bias-free ``nn.Linear`` leaves, so that Opacus computes
per-sample gradients of R with its stock ``nn.Linear`` sampler (A and B are frozen and live in
modules of their own, so R's module owns no buffers and no frozen tensors). Saving goes through PEFT
all the same: a LoRA-SB layer exports as a plain LoRA adapter with ``lora_B = B·R``, ``lora_A = A``
(see ``fedsim.adapters.export``).

Ravan (``fedsim.methods.ravan``) uses the same layer with ``head_rank`` set: only R's diagonal blocks of that size (its
heads' cores) enter the product, so ``B R A = Σ_i B_i R_i A_i`` over the heads; an entry off the blocks gets no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.errors import UsageError


class LoraSBLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``lora_B(lora_R(lora_A(x)))``; only ``lora_R`` is trainable."""

    def __init__(self, base_layer: nn.Linear, rank: int):
        super().__init__()
        out_features, in_features = base_layer.weight.shape
        factory = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)  # weight: A, r×k
        self.lora_R = nn.Linear(rank, rank, bias=False, **factory)  # weight: R, r×r
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)  # weight: B, d×r
        nn.init.zeros_(self.lora_R.weight)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)
        self.base_layer.requires_grad_(False)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        self.scaling = 1.0
        self.head_rank: int | None = None  # Ravan's heads: only R's diagonal blocks of this size enter (None: all of R)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads ``module.weight`` (e.g. dtype checks) still works
        return self.base_layer.weight

    @property
    def rank(self) -> int:
        """The rank in use: R may be a leading block of the full rank (rank-heterogeneous clients)."""
        return self.lora_R.in_features

    def set_rank(self, rank: int) -> None:
        """Use the leading ``rank`` components only: a fresh r_i×r_i R; B and A are sliced in ``forward``."""
        if rank != self.rank:
            weight = self.lora_R.weight
            self.lora_R = nn.Linear(rank, rank, bias=False, dtype=weight.dtype, device=weight.device)

    def head_masks(self, rank: int) -> list[torch.Tensor]:
        """Ravan's heads among R's first ``rank`` components: a 0/1 vector a head (the last one cut at ``rank``)."""
        weight = self.lora_R.weight
        masks = []
        for start in range(0, rank, self.head_rank):
            mask = torch.zeros(rank, dtype=weight.dtype, device=weight.device)
            mask[start:start + self.head_rank] = 1
            masks.append(mask)
        return masks

    def block_mask(self, rank: int) -> torch.Tensor | None:
        """(rank, rank): 1 on the heads' diagonal blocks of R, the entries that enter the product; None where all do."""
        return None if self.head_rank is None else sum(torch.outer(mask, mask) for mask in self.head_masks(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.rank
        full = rank == self.lora_A.out_features  # else a rank-r_i client: B[:, :r_i] R_i A[:r_i]
        hidden = self.lora_A(x) if full else nn.functional.linear(x, self.lora_A.weight[:rank])
        if self.head_rank is None:
            hidden = self.lora_R(hidden)  # Opacus samples R's gradient as a plain nn.Linear's
        else:  # Ravan: Σ_i m_i ⊙ R(m_i ⊙ h) = blockdiag(R) h, one call of lora_R a head so that Opacus still can
            hidden = sum(self.lora_R(hidden * mask) * mask for mask in self.head_masks(rank))
        delta = self.lora_B(hidden) if full else nn.functional.linear(hidden, self.lora_B.weight[:, :rank])
        # 1 but for a rank-r_i client under clients.rank_scaling=own (r/r_i: Method.client_scaling)
        return self.base_layer(x) + (delta if self.scaling == 1.0 else delta * self.scaling)


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def target_linear_names(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose last name component (or full name) is a target.

    Matches as PEFT does for a list: ``query`` matches ``bert.encoder.layer.0.attention.self.query``.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (name.split(".")[-1] in target_modules or name in target_modules)
    ]
    if not names:
        linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UsageError(
            f"model.target_modules: none of {list(target_modules)} names a linear layer of this model; "
            f"its linear layers are: {', '.join(linear_names)}"
        )
    return names


def inject_lora_sb(model: nn.Module, target_modules: list[str], rank: int) -> list[str]:
    """Replace each target ``nn.Linear`` by a ``LoraSBLinear`` in place; return the adapted layer names."""
    names = target_linear_names(model, target_modules)
    for name in names:
        parent, child = _get_parent(model, name)
        setattr(parent, child, LoraSBLinear(getattr(parent, child), rank))
    return names
