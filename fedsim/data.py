"""Turning a client's rows into batches: tokenise once, then seeded shuffles, dynamic padding.

Two kinds of rows, one interface (``len``, ``batch(indices)``, ``batches(batch_size, seed)``,
``in_order(batch_size)``): `TokenizedRows` for classification tables (``text``, ``text_pair``,
``label``) and `InstructionRows` for instruction tables (``prompt``, ``response``, ``answer``, ...:
see ``workloads.base``), whose batches carry ``input_ids``, ``attention_mask`` and ``labels`` for a
causal LM (``-100`` on padding, and on the prompt when the loss is on the response only).
`make_rows` picks the kind from ``model.task``; `evaluate` scores either kind.
"""

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

    def by_length(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, shortest first: each batch pads to its own longest row, not to the longest of rows drawn at
        random (SST-2's phrases: 13 tokens on average, 52 the longest of 256). For sums over the rows (evaluation)."""
        order = np.argsort([len(feature["input_ids"]) for feature in self.features], kind="stable")
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])


IGNORE_INDEX = -100  # labels the loss skips (PyTorch's and transformers' convention)
LOSS_ON = ("response", "all")


def _keep_last(ids: list[int], n: int, bos: int | None) -> list[int]:
    """The last ``n`` tokens of ``ids``, keeping a leading BOS token where there is one."""
    if len(ids) <= n:
        return ids
    if bos is not None and ids and ids[0] == bos and n > 1:
        return [bos] + ids[len(ids) - (n - 1):]
    return ids[len(ids) - n:]


class InstructionRows:
    """Rows of an instruction table, tokenised once for causal-LM training, loss and generation.

    A row's sequence is ``prompt tokens`` (with the tokenizer's special tokens, e.g. BOS) ``+ response
    tokens + EOS``. Longer than ``max_length``: the response keeps ``max(max_length - prompt, max_length // 2)``
    tokens at most (cut at its end) and the prompt is cut at its start (BOS kept), so that every row
    keeps part of its response and the end of its prompt (``### Response:``). ``loss_on="response"``
    puts ``-100`` on the prompt's labels; ``"all"`` trains on the prompt too. Batches are right-padded
    for training; `generation_batch` left-pads prompts for batched generation.
    """

    def __init__(self, table: pa.Table, tokenizer, max_length: int, loss_on: str = "response"):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        prompts = table.column("prompt").to_pylist()
        responses = table.column("response").to_pylist()
        self.answers = table.column("answer").to_pylist()
        self.subsets = table.column("subset").to_pylist()
        self.scorers = table.column("scorer").to_pylist()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
        self.input_ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.prompt_ids: list[list[int]] = []
        self.truncated = 0
        for p, r in zip(prompt_ids, response_ids):
            r = r + ([eos] if eos is not None else [])
            if len(p) + len(r) > max_length:
                self.truncated += 1
                r = r[: min(len(r), max(max_length - len(p), max_length // 2, 1))]
                p = _keep_last(p, max_length - len(r), bos)
            self.input_ids.append(p + r)
            self.labels.append(([IGNORE_INDEX] * len(p) if loss_on == "response" else list(p)) + r)
            self.prompt_ids.append(_keep_last(p, max_length, bos))

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss is taken)."""
        indices = [int(i) for i in indices]
        width = max(len(self.input_ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            input_ids[row, :n] = torch.tensor(self.input_ids[i])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(self.labels[i])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def generation_batch(self, indices) -> dict[str, torch.Tensor]:
        """The prompts alone, left-padded (what batched generation needs): ``input_ids``, ``attention_mask``."""
        indices = [int(i) for i in indices]
        width = max(len(self.prompt_ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.prompt_ids[i])
            input_ids[row, width - n:] = torch.tensor(self.prompt_ids[i])
            attention_mask[row, width - n:] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    batches = TokenizedRows.batches
    in_order = TokenizedRows.in_order


def make_rows(table: pa.Table, tokenizer, config) -> TokenizedRows | InstructionRows:
    """The rows class of ``config.model.task``, with ``workload.max_length`` (and ``workload.loss_on``)."""
    if config.model.task == "causal-lm":
        return InstructionRows(table, tokenizer, config.workload.max_length, config.workload.loss_on)
    return TokenizedRows(table, tokenizer, config.workload.max_length)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row over its labelled (``!= -100``) positions."""
    logits, labels = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), labels[:, 1:]  # float32 at least
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return losses.sum(-1) / counts


@torch.no_grad()
def generate(model: torch.nn.Module, rows: InstructionRows, indices, max_new_tokens: int, device: str = "cpu") -> list[str]:
    """Greedy completions of the prompts of ``indices`` (batched, left-padded), decoded without special tokens."""
    batch = {k: v.to(device) for k, v in rows.generation_batch(indices).items()}
    tokenizer = rows.tokenizer
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=rows.pad_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def evaluate_generation(model: torch.nn.Module, rows: InstructionRows, batch_size: int, device: str = "cpu",
                        max_new_tokens: int = 32) -> dict:
    """Greedy generation with a length cap, the answer extracted and scored per row (``workloads.extract``).

    Returns sums, so that shards evaluated apart add up: ``correct``, ``loss_sum`` (each row's mean
    response loss under teacher forcing), ``count``, and ``sets``: ``{subset: {"correct", "count"}}``.
    """
    from workloads.extract import cut_at_stop, score

    model.eval()
    correct = loss_sum = 0.0
    sets: dict[str, dict[str, float]] = {}
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        batch = {k: v.to(device) for k, v in rows.batch(indices).items()}
        loss_sum += per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"]).sum().item()
        for i, completion in zip(indices, generate(model, rows, indices, max_new_tokens, device)):
            right = score(rows.scorers[i], rows.subsets[i], cut_at_stop(completion), rows.answers[i])
            correct += right
            tally = sets.setdefault(rows.subsets[i], {"correct": 0.0, "count": 0.0})
            tally["correct"] += right
            tally["count"] += 1
    return {"correct": correct, "loss_sum": loss_sum, "count": float(len(rows)), "sets": sets}


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows, batch_size: int, device: str = "cpu", max_new_tokens: int = 32) -> dict:
    """Sums over the rows (so shards evaluated apart add up): ``correct``, ``loss_sum``, ``count``.

    Classification rows: argmax accuracy and the mean cross-entropy. Instruction rows: see
    `evaluate_generation` (which also returns per-subset sums under ``sets``).
    """
    if isinstance(rows, InstructionRows):
        return evaluate_generation(model, rows, batch_size, device, max_new_tokens)
    model.eval()
    correct = loss_sum = 0.0
    for batch in rows.by_length(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        loss_sum += output.loss.item() * len(batch["labels"])
    return {"correct": correct, "loss_sum": loss_sum, "count": float(len(rows))}
