"""A run's data, prepared once before Ray starts: the workload read, the public calibration sample held out,
the training set partitioned over the clients (with each client's held-out share) — ``split_data``, which
checks everything and writes nothing — then written under ``output_dir/data`` as Parquet — ``write_data``,
which returns what the actors need to know of it as a ``DataPlan``.

Any problem with the input (a workload, a file, a partition that cannot be made) is a one-line
``UsageError`` from ``split_data``, before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from fedsim.config import Config
from fedsim.errors import UsageError
from fedsim.partition import HELD_OUT, hold_out_per_client, label_counts, partition, write_partitioned
from fedsim.seeds import derive_seed, rng
from fedsim.storage import Location

EVAL_CHUNK_BATCHES = 4  # evaluation rows are cut into chunks of this many eval batches, whatever the number of workers
TEXT_COLUMNS = ("text", "text_pair", "prompt", "response")


@dataclass(frozen=True)
class DataPlan:
    """What the actors need to know of a run's data (``output_dir/data/meta.json``)."""

    data_dir: str  # where train.parquet, eval.parquet (and public.parquet) are: a local path or a URI
    workload: str
    num_labels: int
    label_names: list[str]
    train_rows: int
    eval_rows: int
    client_sizes: list[int]  # training rows of each client (its held-out rows excluded)
    client_eval_sizes: list[int]  # each client's held-out rows (eval.per_client)
    client_chars: list[int]  # characters of each client's training rows: the scheduler's first guess at its work
    eval_chunks: int  # eval.parquet is partitioned into this many fixed chunks (see EVAL_CHUNK_BATCHES)
    eval_sets: list[str] = field(default_factory=list)  # causal-LM evaluation subsets; [] for classification

    def write(self) -> None:
        (Location(self.data_dir) / "meta.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, data_dir) -> "DataPlan":
        meta = json.loads((Location(data_dir) / "meta.json").read_text())
        return cls(**{**meta, "data_dir": str(data_dir)})


@dataclass
class Split:
    """A run's data in memory, split over the clients: nothing written yet."""

    config: Config
    workload: object  # workloads.Workload
    public: pa.Table | None  # the public calibration sample (adapters.init_data=public), held out of every client
    client_ids: np.ndarray  # the client of each training row
    held_out: np.ndarray  # rows held out as their client's own evaluation data (eval.per_client)

    @property
    def num_labels(self) -> int:
        return self.workload.num_labels

    @property
    def client_sizes(self) -> list[int]:
        return np.bincount(self.client_ids[~self.held_out], minlength=self.config.clients.count).tolist()


def split_data(config: Config, public_sample: bool) -> Split:
    """Read the workload, hold out the public calibration sample (``public_sample``: LoRA-SB's init from public data)
    and partition the rest over the clients. Every check of the data, no writes."""
    from workloads import load_workload

    c = config
    workload = load_workload(c.workload.name, c.workload.path, c.workload.train_limit, c.workload.eval_limit,
                             c.seed, validation=c.workload.validation, **c.workload.options)
    if workload.task != c.model.task:
        raise UsageError(f"model.task: {c.model.task} does not fit workload {workload.name}, a {workload.task} task; "
                         f"set model.task={workload.task}")
    public = hold_out_public(workload, c) if public_sample else None  # before partitioning: it belongs to no client
    client_ids = partition(workload.train_labels, c.clients.count, c.clients.partition, alpha=c.clients.alpha,
                           seed=derive_seed(c.seed, "partition"), dominant_share=c.clients.dominant_share)
    return Split(c, workload, public, client_ids, hold_out_per_client(client_ids, c.eval.per_client, c.seed))


def write_data(split: Split, output_dir: Location) -> DataPlan:
    """Write the split under ``output_dir/data`` (train, eval and public Parquet files, ``meta.json``) and
    ``output_dir/label_counts.parquet``; return what the actors need to know of it."""
    c, workload, client_ids, held_out = split.config, split.workload, split.client_ids, split.held_out
    data_dir = output_dir / "data"
    train = workload.train.append_column(HELD_OUT, pa.array(held_out)) if held_out.any() else workload.train
    write_partitioned(train, client_ids, data_dir / "train.parquet")
    if split.public is not None:
        write_partitioned(split.public, np.zeros(split.public.num_rows, dtype=np.int64), data_dir / "public.parquet")
    eval_chunks = np.arange(workload.eval.num_rows) // (EVAL_CHUNK_BATCHES * c.eval.batch_size)
    write_partitioned(workload.eval, eval_chunks, data_dir / "eval.parquet")
    labels = workload.train_labels
    (output_dir / "label_counts.parquet").write_table(label_counts(client_ids, labels, c.clients.count, workload.num_labels))
    trained = ~held_out
    plan = DataPlan(
        data_dir=str(data_dir), workload=workload.name, num_labels=workload.num_labels, label_names=workload.label_names,
        train_rows=workload.train.num_rows, eval_rows=workload.eval.num_rows,
        client_sizes=split.client_sizes,
        client_eval_sizes=np.bincount(client_ids[held_out], minlength=c.clients.count).tolist(),
        client_chars=np.bincount(client_ids[trained], weights=_chars(workload.train)[trained],
                                 minlength=c.clients.count).astype(np.int64).tolist(),
        eval_chunks=int(eval_chunks.max()) + 1 if len(eval_chunks) else 0,
        eval_sets=sorted(set(workload.eval.column("subset").to_pylist())) if workload.task == "causal-lm" else [],
    )
    plan.write()
    return plan


def hold_out_public(workload, config: Config) -> pa.Table:
    """``adapters.init_data: public``: a seeded sample of ``adapters.init_samples`` training rows, taken out of the
    training data before it is partitioned, is the public calibration set of the LoRA-SB init. It belongs to no client,
    so reading it costs no client any privacy."""
    a = config.adapters
    rows = workload.train.num_rows
    if a.init_samples >= rows:
        raise UsageError(f"adapters.init_samples: {a.init_samples} public rows would leave no training data ({rows} rows); use fewer")
    public_index = np.sort(rng(config.seed, "public-sample").choice(rows, size=a.init_samples, replace=False))
    public = workload.train.take(public_index)
    workload.train = workload.train.take(np.setdiff1d(np.arange(rows), public_index))
    return public


def _chars(table: pa.Table) -> np.ndarray:
    """Characters of each row's text columns (a cheap stand-in for its tokens)."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in TEXT_COLUMNS:
        if name in table.column_names:
            total += np.asarray([len(text) if text else 0 for text in table.column(name).to_pylist()], dtype=np.int64)
    return total
