"""The one loss definition of local training: each client's own mean loss, and each record's own loss (what DP-SGD clips).

What the model's own loss is on a client's batch alone: classification, the mean cross-entropy over its examples
(HF's ``CrossEntropyLoss``); causal LM, the next-token cross-entropy over its labelled tokens (HF's ``ForCausalLMLoss``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedsim.data import IGNORE_INDEX, per_example_loss

TASKS = ("classification", "causal-lm")
from fedsim.training.stacking import Segments


def client_losses(logits: torch.Tensor, labels: torch.Tensor, segments: Segments, task: str) -> torch.Tensor:
    """Each client's own mean loss (clients,): what the model's loss is on that client's batch alone.

    classification: mean cross-entropy over the client's examples (single-label, as HF's
    ``CrossEntropyLoss``); causal-lm: next-token cross-entropy (logits in float32 at least, as HF's
    ``ForCausalLMLoss`` upcasts them) summed over the client's labelled tokens, divided by their number.
    """
    if task == "causal-lm":
        shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(shifted.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).to(per_token.dtype)
        return segments.sum(per_token.sum(1)) / segments.sum(counts)
    per_example = record_losses(logits, labels, task)
    return segments.sum(per_example) / torch.tensor(segments.sizes, dtype=per_example.dtype, device=per_example.device)


def record_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Each record's own loss (rows,), what DP-SGD clips (``fedsim.privacy.mean_record_loss`` for one client):
    classification, its cross-entropy; causal-lm, its own mean token loss (``fedsim.data.per_example_loss``)."""
    if task == "causal-lm":
        return per_example_loss(logits, labels)
    if labels.dim() != 1 or labels.dtype not in (torch.long, torch.int) or logits.shape[-1] < 2:
        raise ValueError("cohort: classification needs integer labels, one per example, and at least 2 classes")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none")


