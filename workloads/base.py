"""What a workload is: a task, its label names, and a train and an eval table of real examples.

Tables are Arrow, with the columns of `CLASSIFICATION_SCHEMA`: `text` (string), `text_pair`
(string; all null for single-sentence tasks) and `label` (int64, an index into `label_names`).
The loaders in this package build them; the partitioner adds `client_id` and writes them to Parquet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

CLASSIFICATION_SCHEMA = pa.schema(
    [("text", pa.string()), ("text_pair", pa.string()), ("label", pa.int64())]
)


@dataclass
class Workload:
    """A loaded task: `train` and `eval` tables with the columns of `CLASSIFICATION_SCHEMA`."""

    name: str
    task: str  # "classification" for now
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
