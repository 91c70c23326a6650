"""A step's batches: the clients' batches side by side, micro-batches, and the passes a step is cut into."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.data import IGNORE_INDEX

# What one more pass of a step costs, counted in padded tokens: a pass's fixed work (kernel launches, Python) against
# the work of a token. Rough: on a CPU a token of MiniLM is ~0.5 ms and a pass's overhead a few ms; on a GPU a pass of
# a 1B model costs some ms of launches, the time of a few thousand tokens. bench/cohort.py and bench/gpu.py measure.
PASS_COST_TOKENS = {"cpu": 32, "cuda": 2048}


def cohort_batch(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
    """The clients' batches one after the other, right-padded to the longest: (inputs, labels, rows per client)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    merged = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() >= 2:
            parts = [F.pad(p, (0, width - p.shape[1]), value=pad_values.get(key, 0)) for p in parts]
        merged[key] = torch.cat(parts)
    labels = merged.pop("labels")
    return merged, labels, [len(b["input_ids"]) for b in batches]



def plan_passes(widths: Sequence[int], rows: Sequence[int], pass_cost: int) -> list[list[int]]:
    """Split a step's clients into passes (lists of positions in ``widths``), each holding whole clients.

    Every pass pads to its longest batch, so clients of very different lengths waste work together; a pass costs
    ``pass_cost`` padded tokens of its own. The clients, sorted by their batch's length, are cut into runs that
    minimise Σ (pass_cost + rows × longest width) (dynamic programming over the sorted order). Clients of equal
    lengths always share a pass. The passes' gradients add up to the one pass's: nothing else changes.
    """
    order = sorted(range(len(widths)), key=lambda i: (widths[i], i))
    best = [0.0] + [float("inf")] * len(order)
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        count = 0
        for first in range(end, 0, -1):  # the pass order[first - 1 : end]
            count += rows[order[first - 1]]
            cost = best[first - 1] + pass_cost + count * widths[order[end - 1]]
            if cost < best[end]:
                best[end], start[end] = cost, first - 1
    passes, end = [], len(order)
    while end > 0:
        passes.append(sorted(order[start[end] : end]))
        end = start[end]
    return passes[::-1]



def record_widths(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Each row's own length (CPU, long): one past its last attended (or labelled) position; the positions after it are
    padding, which can be cut off without changing the row's outputs (right padding; a left-padded row keeps it all)."""
    ids = inputs["input_ids"]
    used = inputs["attention_mask"] != 0 if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
    if labels.dim() >= 2:
        used = used | (labels != IGNORE_INDEX)
    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return (used * positions).amax(1).clamp(min=1).cpu()


def record_passes(widths: Sequence[int], pass_cost: int, max_rows: int | None = None) -> list[list[int]]:
    """Records (their positions in ``widths``) in passes of similar lengths: `plan_passes` over the distinct widths, each
    with its number of records; each pass's records in ascending order, a pass cut into runs of at most ``max_rows``."""
    distinct = sorted(set(widths))
    counts = [0] * len(distinct)
    place = {width: i for i, width in enumerate(distinct)}
    for width in widths:
        counts[place[width]] += 1
    passes = []
    for group in plan_passes(distinct, counts, pass_cost):
        chosen = {distinct[i] for i in group}
        rows = [r for r, width in enumerate(widths) if width in chosen]
        step = max_rows or len(rows)
        passes += [rows[i : i + step] for i in range(0, len(rows), step)]
    return passes


def row_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).sum(1)



def pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    pad = getattr(text_config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
