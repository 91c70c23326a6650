"""Workloads by name: `load_workload("sst2", path=...)` returns a `Workload` (see `workloads.base`).

Every loader reads real files in their standard format; options beyond `path` are keyword
arguments of the loader (listed in its docstring) and come from the config's `workload.options`;
error messages name them `workload.options.<name>`.
"""

from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa

from fedsim.errors import UsageError
from fedsim.seeds import derive_seed
from workloads.base import CLASSIFICATION_SCHEMA, INSTRUCTION_SCHEMA, Workload, classification_table, instruction_table
from workloads.classification import load_bbc_news, load_mnli, load_snli, load_sst2, load_text_file, option_field
from workloads.instruction import load_commonsense, load_gsm8k, load_math, load_metamathqa

LOADERS = {
    "bbc-news": load_bbc_news,
    "commonsense": load_commonsense,
    "gsm8k": load_gsm8k,
    "math": load_math,
    "metamathqa": load_metamathqa,
    "mnli": load_mnli,
    "snli": load_snli,
    "sst2": load_sst2,
    "text-file": load_text_file,
}
# The task of each workload's tables (model.task must agree).
TASKS = {name: "causal-lm" if name in ("commonsense", "gsm8k", "math", "metamathqa") else "classification" for name in LOADERS}
WORKLOAD_NAMES = tuple(sorted(LOADERS))

__all__ = [
    "CLASSIFICATION_SCHEMA",
    "INSTRUCTION_SCHEMA",
    "LOADERS",
    "TASKS",
    "WORKLOAD_NAMES",
    "Workload",
    "classification_table",
    "instruction_table",
    "carve_validation",
    "limit_rows",
    "load_workload",
]


def limit_rows(table: pa.Table, limit: int | None, seed: int | list[int]) -> pa.Table:
    """A random subset of `limit` rows drawn with `numpy.random.default_rng(seed)`, kept in their
    original order; the table itself if it has no more than `limit` rows."""
    if limit is None or limit >= table.num_rows:
        return table
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(table.num_rows, size=limit, replace=False))
    return table.take(pa.array(keep, pa.int64()))


def carve_validation(train: pa.Table, rows: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(training rows left, validation rows): a seeded draw of `rows` training rows, both in their original order."""
    if rows >= train.num_rows:
        raise UsageError(f"workload.validation: {rows} validation rows would leave no training data "
                         f"({train.num_rows} training rows); use fewer")
    chosen = np.zeros(train.num_rows, dtype=bool)
    chosen[np.random.default_rng(seed).choice(train.num_rows, size=rows, replace=False)] = True
    return train.filter(pa.array(~chosen)), train.filter(pa.array(chosen))


def _check_limit(field: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"workload.{field}: must be a positive integer or null, got {value!r}")
    return int(value)


def load_workload(
    name: str,
    path: str | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    validation: int | None = None,
    **options,
) -> Workload:
    """Load workload `name`, then keep at most `train_limit` / `eval_limit` rows of each split.

    `validation`: that many training rows, drawn seeded by `seed` before the limits, become the evaluation
    split and leave the training split; the workload's own evaluation split is then not scored (choosing
    settings on it would leak the test set into the choice).
    The limits take a random subset seeded by `seed` (train and eval drawn independently), in the
    original row order, so the same arguments give the same rows. `options` go to the loader;
    an option it does not take is a UsageError listing the ones it does.
    """
    if name not in LOADERS:
        raise UsageError(f"workload.name: unknown workload {name!r}; valid: {', '.join(WORKLOAD_NAMES)}")
    train_limit = _check_limit("train_limit", train_limit)
    eval_limit = _check_limit("eval_limit", eval_limit)
    validation = _check_limit("validation", validation)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed: must be a non-negative integer, got {seed!r}")
    loader = LOADERS[name]
    valid = [p for p in inspect.signature(loader).parameters if p != "path"]
    for key in options:
        if key not in valid:
            raise UsageError(
                f"{option_field(key)}: not an option of {name}; valid: {', '.join(valid) if valid else '(none besides path)'}"
            )
    workload = loader(path, **options)
    if validation is not None:
        workload.train, workload.eval = carve_validation(workload.train, validation, derive_seed(seed, "validation"))
        workload.info.update(validation=validation, eval_split="validation rows carved from the training split")
    train = limit_rows(workload.train, train_limit, seed=derive_seed(seed, "train-limit"))
    eval_ = limit_rows(workload.eval, eval_limit, seed=derive_seed(seed, "eval-limit"))
    if train_limit is not None or eval_limit is not None:
        workload.info.update(train_limit=train_limit, eval_limit=eval_limit, limit_seed=int(seed))
    workload.train, workload.eval = train, eval_
    return workload
