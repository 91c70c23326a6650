"""Communication cost, analytic: what each method sends per client per round, from a model's shapes.

    from analysis.comm import comm_table, format_table
    rows = comm_table("llama-3.2-3b", methods="all", ranks=[32, 120], clients=[10, 100, 1000])
    print(format_table(rows))

    fedsim comm --model mistral-7b --method all --rank 200 --clients 10,100,1000

A model's shapes come from its architecture facts — an HF ``config.json`` (a file, or a model
folder) or a built-in preset (``PRESETS``) — never from its weights. For each adapted layer
(``d`` out × ``k`` in) and rank ``r``: ``A`` is r×k, ``B`` d×r, ``R`` r×r, a folded ``base_delta`` /
``residual`` d×k (float32). What goes up and down is exactly what the runtime sends
(``fedsim.runtime.aggregator.downlink_bytes`` and each method's ``aggregate``):

==============  ============================  ==============================================================
method          up (per client, per round)    down (per returning client, per round: last round's broadcast)
==============  ============================  ==============================================================
fed-sb          Σ r²                          Σ r²
fedit           Σ r(d+k)                      Σ r(d+k)
fedex-lora      Σ r(d+k)                      Σ r(d+k) + Σ d·k residual (``fedex_down="residual"``, as the
                                              runtime sends it), or c·Σ r(d+k) (``"adapters"``, the papers')
ffa-lora        Σ r·d                         Σ r·d
flora           Σ r(d+k)                      c·Σ r(d+k) (+ c float64 weights + 1 int64 round)
fra-lora        Σ r(d+k)                      Σ r(d+k)
fra-then-ffa    Σ r(d+k), then Σ r·d          same, one round later
central         Σ r² (lora-sb) or Σ r(d+k)    same (one client)
==============  ============================  ==============================================================

plus the classification head (``head:<param>``) both ways where it is trained. A client taking part
for the first time receives the whole global state instead: A and B (and R), the folded
``base_delta`` (d×k a layer) for fedex-lora and flora once a round has been aggregated, and the
head. Bytes are ``numel × element size + len(key)`` for every tensor, as ``fedsim.methods.nbytes``.

``predict_run(run_dir)`` replays a finished run's schedule (its ``clients.parquet``: who took part,
who was new, who was aggregated) through the same messages and sets the prediction beside the
measured bytes of ``rounds.parquet``; ``check_run`` flags rounds that differ by more than a few
percent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fedsim.errors import UsageError
from fedsim.storage import Location

METHOD_NAMES = ("fed-sb", "fedit", "fedex-lora", "ffa-lora", "flora", "fra-lora", "fra-then-ffa", "central")
FEDEX_DOWN = ("residual", "adapters")
CENTRAL_ADAPTERS = ("lora-sb", "lora")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
FOLD_BYTES = 4  # base_delta and residual are float32 whatever the model's dtype
TOLERANCE = 0.03  # measured vs predicted: a larger relative difference is flagged

# Architecture facts (the fields of each model's HF config.json that fix the linear layers' shapes).
PRESETS: dict[str, dict] = {
    "bert-base": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072,
                  "num_attention_heads": 12, "_name_or_path": "bert-base-uncased"},
    "roberta-base": {"model_type": "roberta", "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072,
                     "num_attention_heads": 12, "_name_or_path": "roberta-base"},
    "roberta-large": {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096,
                      "num_attention_heads": 16, "_name_or_path": "roberta-large"},
    "minilm-l6": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536,
                  "num_attention_heads": 12, "_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
    "llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "_name_or_path": "meta-llama/Llama-3.2-3B"},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "_name_or_path": "mistralai/Mistral-7B-v0.1"},
    "gemma-2-9b": {"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 42, "intermediate_size": 14336,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "_name_or_path": "google/gemma-2-9b"},
}
ENCODER_TYPES = ("bert", "roberta")
DECODER_TYPES = ("llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3")
ENCODER_LINEARS = ("query", "key", "value", "dense")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], **{t: list(DECODER_LINEARS) for t in DECODER_TYPES}}


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """One adapted layer: its module path and weight shape (out × in)."""

    name: str
    out_features: int  # d
    in_features: int  # k


@dataclass(frozen=True)
class ModelShapes:
    """What the cost model needs from a model: the adapted layers and (optionally) the head's parameters."""

    name: str
    layers: tuple[Linear, ...]
    head: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (parameter name, shape); empty when no head is trained
    dtype: str = "float32"

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def sum_dk(self) -> int:
        """Σ (d + k): LoRA's A and B hold r·Σ(d+k) numbers."""
        return sum(l.out_features + l.in_features for l in self.layers)

    def sum_d(self) -> int:
        return sum(l.out_features for l in self.layers)

    def sum_dxk(self) -> int:
        return sum(l.out_features * l.in_features for l in self.layers)

    def head_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.head)


def _preset_key(name: str) -> str | None:
    key = name.lower().replace("_", "-")
    aliases = {"minilm": "minilm-l6", "bert": "bert-base", "llama-3.2-3b-instruct": "llama-3.2-3b",
               "mistral-7b-v0.1": "mistral-7b", "gemma2-9b": "gemma-2-9b"}
    key = aliases.get(key, key)
    return key if key in PRESETS else None


def read_hf_config(source) -> tuple[str, dict]:
    """(display name, config dict) from a preset name, a config.json, a model folder or a model alias.

    The dict gets ``_config_path`` (the config.json read) where it came from a file.
    """
    if isinstance(source, dict):
        return str(source.get("_name_or_path", source.get("model_type", "model"))), dict(source)
    text = str(source)
    preset = _preset_key(text)
    path = Path(text).expanduser()
    if preset is not None and not path.exists():
        if preset == "minilm-l6" and text == "minilm":  # the packaged model: read its real config when installed
            try:
                from fedsim.config import resolve_model_path

                path = Path(resolve_model_path("minilm"))
            except UsageError:
                return preset, dict(PRESETS[preset])
        else:
            return preset, dict(PRESETS[preset])
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UsageError(
            f"--model: {text!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or model folder"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--model: cannot read {path} as JSON ({error})") from None
    data["_config_path"] = str(path)
    return (preset or text), data


def _num_labels(cfg: dict, num_labels: int | None) -> int:
    if num_labels is not None:
        return int(num_labels)
    if cfg.get("num_labels"):
        return int(cfg["num_labels"])
    return len(cfg.get("id2label") or {}) or 2


def _linears_from_formula(cfg: dict, task: str, num_labels: int) -> tuple[list[Linear], list[tuple[str, tuple[int, ...]]]]:
    """Every linear layer of a known family, named as in its HF (sequence-classification) model, and its head."""
    kind = cfg.get("model_type")
    h, layers, inter = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    linears: list[Linear] = []
    if kind in ENCODER_TYPES:
        prefix = kind
        for i in range(layers):
            base = f"{prefix}.encoder.layer.{i}"
            linears += [Linear(f"{base}.attention.self.{n}", h, h) for n in ("query", "key", "value")]
            linears += [Linear(f"{base}.attention.output.dense", h, h), Linear(f"{base}.intermediate.dense", inter, h),
                        Linear(f"{base}.output.dense", h, inter)]
        if kind == "bert" and task == "classification":
            linears.append(Linear("bert.pooler.dense", h, h))
        if kind == "roberta" and task == "classification":
            linears += [Linear("classifier.dense", h, h), Linear("classifier.out_proj", num_labels, h)]
            head = [("classifier.dense.weight", (h, h)), ("classifier.dense.bias", (h,)),
                    ("classifier.out_proj.weight", (num_labels, h)), ("classifier.out_proj.bias", (num_labels,))]
        else:
            head = [("classifier.weight", (num_labels, h)), ("classifier.bias", (num_labels,))]
    elif kind in DECODER_TYPES:
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or h // heads)
        for i in range(layers):
            base = f"model.layers.{i}"
            linears += [Linear(f"{base}.self_attn.q_proj", heads * head_dim, h), Linear(f"{base}.self_attn.k_proj", kv * head_dim, h),
                        Linear(f"{base}.self_attn.v_proj", kv * head_dim, h), Linear(f"{base}.self_attn.o_proj", h, heads * head_dim),
                        Linear(f"{base}.mlp.gate_proj", inter, h), Linear(f"{base}.mlp.up_proj", inter, h),
                        Linear(f"{base}.mlp.down_proj", h, inter)]
        if task == "classification":
            linears.append(Linear("score", num_labels, h))
            head = [("score.weight", (num_labels, h))]
        else:
            head = []
    else:
        raise ValueError(kind)
    return linears, head


def _linears_from_meta(cfg: dict, task: str, num_labels: int):
    """Any architecture transformers knows: build it on the meta device (no weights) and read its linear layers."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedsim.methods.base import head_parameters

    kind = cfg.get("model_type")
    try:
        if cfg.get("_config_path"):
            config = AutoConfig.from_pretrained(str(Path(cfg["_config_path"]).parent))
        else:
            config = AutoConfig.for_model(kind, **{k: v for k, v in cfg.items() if k not in ("model_type", "_config_path")})
    except (KeyError, ValueError, OSError) as error:
        raise UsageError(f"--model: unknown model_type {kind!r} ({error}); give a config.json transformers knows") from None
    config.num_labels = num_labels
    with torch.device("meta"):
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        model = auto.from_config(config)
    linears = [Linear(n, m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = [(n, tuple(p.shape)) for n, p in head_parameters(model).items()] if task == "classification" else []
    return linears, head


def model_shapes(
    model,
    target_modules: Sequence[str] | None = None,
    *,
    task: str = "classification",
    num_labels: int | None = None,
    head: bool = False,
    dtype: str = "float32",
    exact: bool = False,
) -> ModelShapes:
    """The adapted layers of ``model`` (a preset, config.json, folder, alias or config dict) for ``target_modules``.

    Targets match as PEFT (and ``fedsim.adapters.target_linear_names``) match them: the last part of
    a linear layer's name, or its full name. ``head`` adds the classification head's parameters
    (what ``method.train_head`` sends). Known families (BERT, RoBERTa, Llama, Mistral, Gemma-2,
    Qwen-2) are read by formula; others (or ``exact=True``) are built on the meta device.
    """
    if dtype not in DTYPE_BYTES or dtype == "float64":
        raise UsageError(f"--dtype: unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
    if task not in ("classification", "causal-lm"):
        raise UsageError(f"model.task: unknown task {task!r}; valid: classification, causal-lm")
    name, cfg = read_hf_config(model)
    labels = _num_labels(cfg, num_labels)
    kind = cfg.get("model_type")
    if target_modules is None or len(target_modules) == 0:
        target_modules = DEFAULT_TARGETS.get(kind, list(DECODER_LINEARS))
    if not exact and kind in ENCODER_TYPES + DECODER_TYPES:
        try:
            linears, head_params = _linears_from_formula(cfg, task, labels)
        except KeyError as error:
            raise UsageError(f"--model: {name} config lacks the field {error}; give a complete config.json") from None
    else:
        linears, head_params = _linears_from_meta(cfg, task, labels)
    targets = set(target_modules)
    chosen = tuple(l for l in linears if l.name.split(".")[-1] in targets or l.name in targets)
    if not chosen:
        available = sorted({l.name.split(".")[-1] for l in linears})
        raise UsageError(f"--targets: none of {list(target_modules)} names a linear layer of {name}; its linear layers are: {', '.join(available)}")
    return ModelShapes(name=name, layers=chosen, head=tuple(head_params) if head else (), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Messages: (key, numel, bytes per element) of every tensor, as the runtime builds them
# ---------------------------------------------------------------------------------------------

Item = tuple[str, int, int]


@dataclass(frozen=True)
class MethodSpec:
    """What of a method the cost depends on."""

    name: str
    rank: int
    switch_round: int = 3  # fra-then-ffa
    adapter: str = "lora-sb"  # central
    fedex_down: str = "residual"  # fedex-lora: what its broadcast is counted as

    def __post_init__(self):
        if self.name not in METHOD_NAMES:
            raise UsageError(f"--method: unknown method {self.name!r}; valid: {', '.join(METHOD_NAMES)}, all")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise UsageError(f"--rank: must be a positive integer, got {self.rank!r}")
        if self.adapter not in CENTRAL_ADAPTERS:
            raise UsageError(f"method.adapter: unknown adapter {self.adapter!r}; valid: {', '.join(CENTRAL_ADAPTERS)}")
        if self.fedex_down not in FEDEX_DOWN:
            raise UsageError(f"--fedex-down: unknown value {self.fedex_down!r}; valid: {', '.join(FEDEX_DOWN)}")

    @property
    def lora_sb(self) -> bool:
        return self.name == "fed-sb" or (self.name == "central" and self.adapter == "lora-sb")

    @property
    def folds(self) -> bool:
        """Methods whose global state holds a ``base_delta`` once a round is aggregated."""
        return self.name in ("fedex-lora", "flora")

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        if self.lora_sb:
            return ("lora_R",)
        if self.name == "ffa-lora" or (self.name == "fra-then-ffa" and round_idx >= self.switch_round):
            return ("lora_B",)
        return ("lora_A", "lora_B")


def _numel(kind: str, layer: Linear, rank: int) -> int:
    return {"lora_A": rank * layer.in_features, "lora_B": layer.out_features * rank, "lora_R": rank * rank,
            "base_delta": layer.out_features * layer.in_features, "residual": layer.out_features * layer.in_features,
            "stack_A": rank * layer.in_features, "stack_B": layer.out_features * rank}[kind]


def _head_items(shapes: ModelShapes) -> list[Item]:
    return [(f"head:{name}", math.prod(shape), shapes.itemsize) for name, shape in shapes.head]


def upload_items(shapes: ModelShapes, spec: MethodSpec, round_idx: int, rank: int | None = None) -> list[Item]:
    """One client's upload in round ``round_idx``: its trained tensors (and the head).

    ``rank``: a rank-heterogeneous client's own rank r_i ≤ r (it sends its leading block); default r.
    """
    r = rank or spec.rank
    items = [(f"{l.name}.{kind}", _numel(kind, l, r), shapes.itemsize)
             for l in shapes.layers for kind in spec.trained_kinds(round_idx)]
    return items + _head_items(shapes)


def broadcast_items(shapes: ModelShapes, spec: MethodSpec, round_idx: int, aggregated: int | Sequence[int]) -> list[Item]:
    """What the aggregation of round ``round_idx`` sends every returning client.

    ``aggregated``: how many clients were aggregated, or their ranks (FLoRA stacks them as they are).
    """
    ranks = [spec.rank] * aggregated if isinstance(aggregated, int) else list(aggregated)
    if not ranks:
        return []
    r, size = spec.rank, shapes.itemsize
    if spec.name == "flora":
        # weights (float64), ranks (int64) and the round (int64), then every client's A and B stacked along the rank
        items = [("flora.weights", len(ranks), 8), ("flora.ranks", len(ranks), 8), ("flora.round", 1, 8)]
        for l in shapes.layers:
            items += [(f"{l.name}.stack_A", sum(_numel("stack_A", l, ri) for ri in ranks), size),
                      (f"{l.name}.stack_B", sum(_numel("stack_B", l, ri) for ri in ranks), size)]
        return items + _head_items(shapes)
    aggregated = len(ranks)
    items = upload_items(shapes, spec, round_idx)
    if spec.name == "fedex-lora":
        if spec.fedex_down == "residual":
            items += [(f"{l.name}.residual", _numel("residual", l, r), FOLD_BYTES) for l in shapes.layers]
        else:  # the clients' adapters, stacked, as the papers count it: c·Σ r(d+k)
            items = [(k, n * aggregated, s) if not k.startswith("head:") else (k, n, s) for k, n, s in items]
    return items


def state_items(shapes: ModelShapes, spec: MethodSpec, folded: bool) -> list[Item]:
    """The whole global state (what a client receives the first time it takes part)."""
    kinds = ("lora_A", "lora_B", "lora_R") if spec.lora_sb else ("lora_A", "lora_B")
    if folded and spec.folds:
        kinds = kinds + ("base_delta",)
    items = [(f"{l.name}.{kind}", _numel(kind, l, spec.rank), FOLD_BYTES if kind == "base_delta" else shapes.itemsize)
             for l in shapes.layers for kind in kinds]
    return items + _head_items(shapes)


def numel_of(items: Iterable[Item]) -> int:
    return sum(n for _, n, _ in items)


def bytes_of(items: Iterable[Item]) -> int:
    """As ``fedsim.methods.nbytes``: data plus UTF-8 keys."""
    return sum(n * size + len(key.encode()) for key, n, size in items)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass
class CommRow:
    """One method at one rank and client count. Per client per round, steady state (a returning client)."""

    model: str
    method: str
    rank: int
    clients: int  # clients taking part (and aggregated) each round
    layers: int
    up_params: int
    down_params: int
    up_bytes: int
    down_bytes: int
    first_down_params: int  # the whole global state, at a client's first round
    first_down_bytes: int
    round_bytes: int  # all clients of one steady-state round, up + down
    rounds: int
    total_bytes: int  # over `rounds` rounds, the same clients every round (round 0: first contact)
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def parse_methods(text) -> list[str]:
    if text is None or text == "all" or text == ["all"]:
        return list(METHOD_NAMES)
    items = text.split(",") if isinstance(text, str) else list(text)
    methods = [m.strip() for m in items if m.strip()]
    for m in methods:
        if m not in METHOD_NAMES:
            raise UsageError(f"--method: unknown method {m!r}; valid: {', '.join(METHOD_NAMES)}, all")
    if not methods:
        raise UsageError(f"--method: give a method or 'all'; valid: {', '.join(METHOD_NAMES)}")
    return methods


def parse_ints(text, flag: str, minimum: int = 1) -> list[int]:
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            raise UsageError(f"{flag}: expected comma-separated integers ≥ {minimum}, got {item!r}") from None
        if value < minimum:
            raise UsageError(f"{flag}: expected comma-separated integers ≥ {minimum}, got {value}")
        values.append(value)
    if not values:
        raise UsageError(f"{flag}: expected comma-separated integers ≥ {minimum}")
    return values


def method_cost(shapes: ModelShapes, spec: MethodSpec, clients: int, rounds: int = 1) -> CommRow:
    """The cost of one method for ``clients`` clients a round over ``rounds`` rounds."""
    if clients < 1:
        raise UsageError(f"--clients: must be ≥ 1, got {clients}")
    if rounds < 1:
        raise UsageError(f"--rounds: must be ≥ 1, got {rounds}")
    c = 1 if spec.name == "central" else clients
    steady = max(spec.switch_round + 1, 1) if spec.name == "fra-then-ffa" else 1
    up = upload_items(shapes, spec, steady)
    down = broadcast_items(shapes, spec, steady - 1, c)
    first = state_items(shapes, spec, folded=False)
    total = 0
    for round_idx in range(rounds):
        up_r = bytes_of(upload_items(shapes, spec, round_idx))
        down_r = bytes_of(state_items(shapes, spec, folded=False)) if round_idx == 0 else bytes_of(broadcast_items(shapes, spec, round_idx - 1, c))
        total += c * (up_r + down_r)
    notes = []
    if spec.name == "fedex-lora":
        notes.append(f"down: {spec.fedex_down}")
    if spec.name == "fra-then-ffa":
        notes.append(f"FFA from round {spec.switch_round}")
    if spec.name == "central":
        notes.append(f"{spec.adapter}, 1 client")
    return CommRow(
        model=shapes.name, method=spec.name, rank=spec.rank, clients=c, layers=len(shapes.layers),
        up_params=numel_of(up), down_params=numel_of(down), up_bytes=bytes_of(up), down_bytes=bytes_of(down),
        first_down_params=numel_of(first), first_down_bytes=bytes_of(first),
        round_bytes=c * (bytes_of(up) + bytes_of(down)), rounds=rounds, total_bytes=total, notes="; ".join(notes),
    )


def comm_table(
    model,
    methods="all",
    ranks: Sequence[int] = (4,),
    clients: Sequence[int] = (10,),
    *,
    target_modules: Sequence[str] | None = None,
    rounds: int = 1,
    task: str = "classification",
    head: bool = False,
    num_labels: int | None = None,
    dtype: str = "float32",
    switch_round: int = 3,
    adapter: str = "lora-sb",
    fedex_down: str = "residual",
) -> list[CommRow]:
    """Rows for every (method, rank, client count). ``model``: a preset, config.json, folder or ``ModelShapes``."""
    shapes = model if isinstance(model, ModelShapes) else model_shapes(
        model, target_modules, task=task, num_labels=num_labels, head=head, dtype=dtype)
    rows = []
    for method in parse_methods(methods):
        for rank in ranks:
            spec = MethodSpec(method, int(rank), switch_round=switch_round, adapter=adapter, fedex_down=fedex_down)
            for count in clients:
                rows.append(method_cost(shapes, spec, int(count), rounds))
    return rows


def human(value: float, unit: str = "") -> str:
    """1234567 → '1.23M' (parameters) or '1.23 MB' (bytes, unit='B'; powers of 1000)."""
    for factor, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{' ' if unit else ''}{suffix}{unit}"
    return f"{value:.0f}{' ' + unit if unit else ''}"


def format_table(rows: Sequence[CommRow]) -> str:
    """A plain-text table (parameters in millions as the papers give them, bytes in MB = 10⁶ B)."""
    header = ["method", "rank", "clients", "up params", "down params", "up MB", "down MB", "first down MB",
              "round MB (all clients)", f"total MB ({rows[0].rounds if rows else 1} rounds)", "notes"]
    body = [[r.method, str(r.rank), str(r.clients), f"{r.up_params / 1e6:.4f}M", f"{r.down_params / 1e6:.4f}M",
             f"{r.up_bytes / 1e6:.3f}", f"{r.down_bytes / 1e6:.3f}", f"{r.first_down_bytes / 1e6:.3f}",
             f"{r.round_bytes / 1e6:.3f}", f"{r.total_bytes / 1e6:.3f}", r.notes] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = []
    if rows:
        lines.append(f"model {rows[0].model}: {rows[0].layers} adapted layers; params = numbers per client per round "
                     "(steady state); bytes include keys")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if 0 < i < 10 else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))).rstrip() for b in body]
    return "\n".join(lines)


def per_round_vs_clients(shapes: ModelShapes, methods, rank: int, clients: Sequence[int], **spec_args) -> dict[str, list[CommRow]]:
    """For plots: each method's steady-state row at every client count."""
    out = {}
    for method in parse_methods(methods):
        spec = MethodSpec(method, rank, **spec_args)
        out[method] = [method_cost(shapes, spec, c) for c in clients]
    return out


# ---------------------------------------------------------------------------------------------
# Measured against predicted
# ---------------------------------------------------------------------------------------------

TRAINED_STATUSES = ("ok", "nonfinite")


@dataclass
class RunPrediction:
    """Per round: predicted and measured bytes (and predicted parameters) of one run."""

    path: Location
    method: str
    rounds: list[dict] = field(default_factory=list)
    tolerance: float = TOLERANCE

    @property
    def flagged(self) -> list[dict]:
        return [r for r in self.rounds if r["flag"]]

    def totals(self) -> dict:
        keys = ("bytes_up", "bytes_down", "pred_bytes_up", "pred_bytes_down", "pred_params_up", "pred_params_down")
        t = {k: sum(r[k] for r in self.rounds) for k in keys}
        for d in ("up", "down"):
            t[f"rel_err_{d}"] = _rel(t[f"bytes_{d}"], t[f"pred_bytes_{d}"])
        return t

    def max_rel_err(self) -> float:
        return max((max(r["rel_err_up"], r["rel_err_down"]) for r in self.rounds), default=0.0)


def _rel(measured: float, predicted: float) -> float:
    if predicted == 0:
        return 0.0 if measured == 0 else math.inf
    return abs(measured - predicted) / predicted


def run_shapes(run_dir, config: dict | None = None) -> tuple[ModelShapes, MethodSpec]:
    """The model shapes and method of a run folder (its config.yaml, and the number of labels it trained)."""
    import yaml

    run_dir = Location(run_dir)
    if config is None:
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise UsageError(f"results: {run_dir} has no config.yaml; the prediction needs the run's config")
        config = yaml.safe_load(path.read_text()) or {}
    model_cfg, method_cfg = config.get("model", {}), config.get("method", {})
    num_labels = None
    meta = run_dir / "data" / "meta.json"
    if meta.is_file():
        num_labels = json.loads(meta.read_text()).get("num_labels")
    elif (run_dir / "label_counts.parquet").is_file():
        labels = (run_dir / "label_counts.parquet").read_table(columns=["label"])["label"].to_pylist()
        num_labels = len(set(labels)) or None
    from fedsim.config import resolve_model_path

    source = resolve_model_path(model_cfg.get("name", "minilm"))
    if not Path(source).exists() and _preset_key(source) is None:
        raise UsageError(f"results: the model {model_cfg.get('name')!r} of {run_dir} is neither a local folder nor a preset")
    shapes = model_shapes(
        source if Path(source).exists() else _preset_key(source), model_cfg.get("target_modules"),
        task=model_cfg.get("task", "classification"), num_labels=num_labels,
        head=bool(method_cfg.get("train_head", True)), dtype=model_cfg.get("dtype", "float32"),
    )  # known families by formula (tests check it against the model built on the meta device), others on meta
    shapes = replace(shapes, name=str(model_cfg.get("name", shapes.name)))
    spec = MethodSpec(method_cfg.get("name", "fed-sb"), int(method_cfg.get("rank", 4)),
                      switch_round=int(method_cfg.get("switch_round", 3)), adapter=method_cfg.get("adapter", "lora-sb"))
    return shapes, spec


def predict_run(run_dir, tolerance: float = TOLERANCE) -> RunPrediction:
    """Replay a run's schedule (``clients.parquet``) through the runtime's messages; compare with ``rounds.parquet``.

    A sampled client receives the whole state at its first round and the last round's broadcast
    after that (dropped clients too); a client that trained (``ok`` or ``nonfinite``, or a
    straggler that trained) sends its upload; the broadcast of round t is built over the clients
    aggregated in round t (those ``ok``).
    """
    run_dir = Location(run_dir)
    for name in ("rounds.parquet", "clients.parquet"):
        if not (run_dir / name).is_file():
            raise UsageError(f"results: {run_dir} has no {name}; pass the output_dir of a finished fedsim run")
    shapes, spec = run_shapes(run_dir)
    clients = (run_dir / "clients.parquet").read_table().to_pylist()
    rounds = sorted((run_dir / "rounds.parquet").read_table().to_pylist(), key=lambda r: r["round"])
    by_round: dict[int, list[dict]] = {}
    for row in clients:
        by_round.setdefault(row["round"], []).append(row)
    seen: set[int] = set()
    folded = False
    broadcast: list[Item] = []
    prediction = RunPrediction(run_dir, spec.name, tolerance=tolerance)
    for measured in rounds:
        t = measured["round"]
        rows = by_round.get(t, [])
        state = state_items(shapes, spec, folded)
        pred = {"pred_bytes_up": 0, "pred_bytes_down": 0, "pred_params_up": 0, "pred_params_down": 0}
        for row in rows:
            down = broadcast if row["client_id"] in seen else state
            pred["pred_bytes_down"] += bytes_of(down)
            pred["pred_params_down"] += numel_of(down)
            trained = row["status"] in TRAINED_STATUSES or (row["status"] == "straggler" and (row.get("steps") or 0) > 0)
            if trained:
                up = upload_items(shapes, spec, t, _client_rank(row, spec))
                pred["pred_bytes_up"] += bytes_of(up)
                pred["pred_params_up"] += numel_of(up)
        seen.update(row["client_id"] for row in rows)
        aggregated = [_client_rank(row, spec) for row in sorted(rows, key=lambda r: r["client_id"]) if row["status"] == "ok"]
        broadcast = broadcast_items(shapes, spec, t, aggregated)
        folded = folded or bool(aggregated)
        entry = {"round": t, "bytes_up": int(measured["bytes_up"]), "bytes_down": int(measured["bytes_down"]), **pred}
        entry["rel_err_up"] = _rel(entry["bytes_up"], pred["pred_bytes_up"])
        entry["rel_err_down"] = _rel(entry["bytes_down"], pred["pred_bytes_down"])
        entry["flag"] = max(entry["rel_err_up"], entry["rel_err_down"]) > tolerance
        prediction.rounds.append(entry)
    return prediction


def _client_rank(row: dict, spec: MethodSpec) -> int:
    rank = row.get("rank")
    return int(rank) if rank and 0 < int(rank) <= spec.rank else spec.rank


def check_run(run_dir, tolerance: float = TOLERANCE) -> RunPrediction:
    """``predict_run``, printing nothing; the flagged rounds are in ``.flagged``."""
    return predict_run(run_dir, tolerance)
