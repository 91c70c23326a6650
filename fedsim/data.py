"""Turning a client's rows into batches: tokenise once, then seeded shuffles, dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch


class TokenizedRows:
    """Rows of a classification table (``text``, ``text_pair``, ``label``), tokenised once."""

    def __init__(self, table: pa.Table, tokenizer, max_length: int):
        texts = table.column("text").to_pylist()
        pairs = table.column("text_pair").to_pylist() if "text_pair" in table.column_names else [None] * len(texts)
        has_pairs = any(p is not None for p in pairs)
        encoded = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
        self.features = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
        self.labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad([self.features[i] for i in indices], return_tensors="pt")
        batch["labels"] = torch.from_numpy(self.labels[np.asarray(indices)])
        return dict(batch)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches: a fresh seeded permutation each pass over the rows."""
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(self))
            for start in range(0, len(order), batch_size):
                yield self.batch(order[start : start + batch_size])

    def in_order(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: TokenizedRows, batch_size: int, device: str = "cpu") -> dict[str, float]:
    """Sums over the rows (so shards evaluated apart add up): ``correct``, ``loss_sum``, ``count``."""
    model.eval()
    correct = loss_sum = 0.0
    for batch in rows.in_order(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        loss_sum += output.loss.item() * len(batch["labels"])
    return {"correct": correct, "loss_sum": loss_sum, "count": float(len(rows))}
