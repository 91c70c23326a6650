"""What a workload is: a task, its label names, and a train and an eval table of real examples.

Classification tables are Arrow, with the columns of `CLASSIFICATION_SCHEMA`: `text` (string),
`text_pair` (string; all null for single-sentence tasks) and `label` (int64, an index into
`label_names`).

Instruction (causal-LM) tables have the columns of `INSTRUCTION_SCHEMA`: `prompt` (the model's input,
template applied), `response` (the target text the loss is computed on), `answer` (the gold final
answer the evaluation compares with: a number for GSM8K, a boxed expression for MATH, an answer word
such as `option2` for the commonsense sets), `subset` (the data set a row comes from: `gsm8k`,
`boolq`, ...; evaluation scores each subset apart), `scorer` (how a completion is scored: `gsm8k`,
`math` or `choice`, see `workloads.extract`) and `label` (int64, the index of `subset` in
`label_names`, so the partitioner can split by data set as it splits by class).

The loaders in this package build them; the partitioner adds `client_id` and writes them to Parquet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

CLASSIFICATION_SCHEMA = pa.schema(
    [("text", pa.string()), ("text_pair", pa.string()), ("label", pa.int64())]
)
INSTRUCTION_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("response", pa.string()), ("answer", pa.string()), ("subset", pa.string()),
     ("scorer", pa.string()), ("label", pa.int64())]
)


@dataclass
class Workload:
    """A loaded task: `train` and `eval` tables with the columns of `CLASSIFICATION_SCHEMA` (task
    "classification") or `INSTRUCTION_SCHEMA` (task "causal-lm"; `label_names` are then the subsets)."""

    name: str
    task: str  # "classification" | "causal-lm" (the values of model.task)
    label_names: list[str]
    train: pa.Table
    eval: pa.Table
    info: dict = field(default_factory=dict)  # where it came from: paths, split seed, limits

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def train_labels(self) -> np.ndarray:
        """The train labels as an int64 numpy array (what the partitioner takes)."""
        return self.train.column("label").to_numpy().astype(np.int64, copy=False)


def classification_table(texts, labels, text_pairs=None) -> pa.Table:
    """Build a table with the classification schema; `text_pairs=None` gives an all-null column."""
    if text_pairs is None:
        text_pairs = pa.nulls(len(texts), pa.string())
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "text_pair": pa.array(text_pairs, pa.string()),
            "label": pa.array(labels, pa.int64()),
        },
        schema=CLASSIFICATION_SCHEMA,
    )


def instruction_table(prompts, responses, answers, subsets, scorers, label_names) -> pa.Table:
    """Build a table with the instruction schema; `label` is the index of each row's subset in `label_names`."""
    index = {name: i for i, name in enumerate(label_names)}
    return pa.table(
        {
            "prompt": pa.array(prompts, pa.string()),
            "response": pa.array(responses, pa.string()),
            "answer": pa.array(answers, pa.string()),
            "subset": pa.array(subsets, pa.string()),
            "scorer": pa.array(scorers, pa.string()),
            "label": pa.array([index[s] for s in subsets], pa.int64()),
        },
        schema=INSTRUCTION_SCHEMA,
    )
