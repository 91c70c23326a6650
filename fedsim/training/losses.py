"""The one loss definition of local training: each record's own loss. The engine weighs the records of a client so that
their sum is the model's own loss on the client's batch (``fedsim.training.engine``): classification, the mean
cross-entropy over its examples (HF's ``CrossEntropyLoss``); causal LM, the next-token cross-entropy over its labelled
tokens (HF's ``ForCausalLMLoss``). DP-SGD clips each record's gradient of it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedsim.data import per_example_loss

TASKS = ("classification", "causal-lm")


def record_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Each record's own loss (rows,), what DP-SGD clips (``fedsim.privacy.mean_record_loss`` for one client):
    classification, its cross-entropy; causal-lm, its own mean token loss (``fedsim.data.per_example_loss``)."""
    if task == "causal-lm":
        return per_example_loss(logits, labels)
    if labels.dim() != 1 or labels.dtype not in (torch.long, torch.int) or logits.shape[-1] < 2:
        raise ValueError("cohort: classification needs integer labels, one per example, and at least 2 classes")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none")


