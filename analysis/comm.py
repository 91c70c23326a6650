"""Communication cost, analytic: what each method sends per client per round, from a model's shapes.

    from analysis.comm import comm_table, format_table
    rows = comm_table("llama-3.2-3b", methods="all", ranks=[32, 120], clients=[10, 100, 1000])
    print(format_table(rows))

    fedsim comm --model mistral-7b --method all --rank 200 --clients 10,100,1000

A model's shapes come from its architecture facts — an HF ``config.json`` (a file, or a model
folder) or a built-in preset (``PRESETS``) — never from its weights. What each method sends is not
modelled here a second time: ``MessageReplay`` runs the method's own code (``aggregate``, ``downlink``:
``fedsim.methods``) on meta tensors of those shapes (``meta_state``, ``meta_upload``), the way the runtime's
aggregator runs it on real tensors, and counts the bytes as ``fedsim.adapters.state.nbytes`` does (``numel × element size + len(key)`` for every tensor). A client taking
part for the first time receives the whole global state; a returning client the last round's broadcast.
A method registered with ``fedsim.methods.register`` is counted with no change here.

``predict_run(run_dir)`` replays a finished run's schedule (its ``clients.parquet``: who took part,
who was new, who was aggregated, at which rank) through the same code and sets the prediction beside
the measured bytes of ``rounds.parquet``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fedsim.adapters.layers import leading_block
from fedsim.adapters.state import HEAD_PREFIX, State, head_parameters, key_kind, nbytes, rank_shape, state_key
from fedsim.config import method_section
from fedsim.errors import UsageError
from fedsim.methods import Method, Upload, build_method, method_names
from fedsim.methods.downlink import Downlinks
from fedsim.shapes import DTYPES, Linear, ModelShapes
from fedsim.storage import Location
from fedsim.training.scaffold import PREFIX as CONTROL, without_controls

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
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

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
    if dtype not in DTYPES or dtype == "float64":
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
# Messages: the method's own code on meta tensors
# ---------------------------------------------------------------------------------------------


def method_of(name: str, rank: int, **settings) -> Method:
    """A method as the runtime builds it, from ``method.*`` settings (``train_head``, ``alpha``; a method's own:
    ``switch_round``, ``adapter``, ``fedex_downlink``, …)."""
    if name not in method_names():
        raise UsageError(f"--method: unknown method {name!r}; valid: {', '.join(method_names())}, all")
    if not isinstance(rank, int) or rank <= 0:
        raise UsageError(f"--rank: must be a positive integer, got {rank!r}")
    return build_method(method_section(name=name, rank=rank, **settings))


def meta_state(method: Method, shapes: ModelShapes) -> State:
    """The round-0 global state as meta tensors (shapes and dtypes, no data): what ``method.init_state`` builds for a
    model of these shapes; the head where the shapes have one (trained, or fitted once and frozen: ``adapters.head_init``)."""
    meta = {"device": "meta", "dtype": shapes.torch_dtype}
    state: State = {}
    for layer in shapes.layers:
        d, k, r = layer.out_features, layer.in_features, method.rank
        if method.adapter == "lora-sb":
            state[state_key(layer.name, "lora_R")] = torch.empty(r, r, **meta)
        state[state_key(layer.name, "lora_A")] = torch.empty(r, k, **meta)
        state[state_key(layer.name, "lora_B")] = torch.empty(d, r, **meta)
    if shapes.head:
        state.update({HEAD_PREFIX + name: torch.empty(shape, **meta) for name, shape in shapes.head})
    return state


def meta_upload(method: Method, state: State, round_idx: int, rank: int | None = None) -> State:
    """A client's upload, as ``method.upload`` builds it from a model at rank ``rank``, built from a (meta) state (and
    packed as the method sends it: ``Method.pack``)."""
    rank = rank or method.rank
    kinds = method.uploaded_kinds(round_idx)
    return method.pack({key: leading_block(value, rank_shape(key_kind(key), value.shape, rank))
                        for key, value in state.items() if key_kind(key) in kinds})


class MessageReplay:
    """What a schedule of rounds sends, as the runtime's aggregator sends it, from the method's own code on meta
    tensors: what a client receives follows ``fedsim.methods.downlink``'s rule (the whole state at first contact, the
    last broadcast after a round it took part in, what changed otherwise); a client that trained sends
    ``meta_upload`` at its rank; a round's broadcast is the method's ``aggregate`` over the clients aggregated in it."""

    def __init__(self, method: Method, shapes: ModelShapes, built_at_client: bool = False, control_variates: bool = False):
        self.method = method
        self.state: State = meta_state(method, shapes)
        self.downlinks = Downlinks(method, built_at_client)  # adapters.init_at: client
        self.control_variates = control_variates  # train.control_variates: SCAFFOLD's c down, each client's Δc up
        self.controls: State = {}  # the server's c: every tensor a client has trained, at the global shape

    @property
    def broadcast(self) -> State:
        return self.downlinks.broadcast

    def down(self, client_id: int, rank: int, round_idx: int) -> State:
        message = self.downlinks.message(self.state, client_id, rank, round_idx)
        return {**message, **{CONTROL + key: value for key, value in self.controls.items()}}

    def up(self, round_idx: int, rank: int) -> State:
        upload = meta_upload(self.method, self.state, round_idx, rank)
        if self.control_variates:  # Δc_i: one per tensor the client trained, kept ones too, at its rank
            upload.update({CONTROL + key: value for key, value in self.trained(round_idx, rank).items()})
        return upload

    def trained(self, round_idx: int, rank: int) -> State:
        """The tensors a client of rank ``rank`` trains in ``round_idx`` (what it uploads and what it keeps), as meta."""
        kinds = set(self.method.trained_kinds(round_idx)) | ({"head"} if self.method.trains_head(round_idx) else set())
        return {key: leading_block(value, rank_shape(key_kind(key), value.shape, rank))
                for key, value in self.state.items() if key_kind(key) in kinds}

    def aggregate(self, round_idx: int, ranks: dict[int, int]) -> None:
        """Aggregate the clients ``{client_id: rank}`` of round ``round_idx``."""
        old_state, broadcast = self.state, {}
        if ranks:
            messages = {rank: self.up(round_idx, rank) for rank in set(ranks.values())}  # meta: one serves every client
            uploads = [Upload(cid, 1, messages[rank]) for cid, rank in sorted(ranks.items())]
            if self.control_variates:
                self.controls.update({key: self.state[key] for key in self.trained(round_idx, self.method.rank)})
                uploads = [Upload(u.client_id, u.num_samples, without_controls(u.tensors)) for u in uploads]
            result = self.method.aggregate(self.state, uploads, round_idx)
            self.state, broadcast = dict(sorted(result.state.items())), result.broadcast
        self.downlinks.aggregated(old_state, self.state, broadcast, round_idx)


def numel_of(message: State) -> int:
    return sum(t.numel() for t in message.values())


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
    first_down_params: int  # a client's first round: the whole global state; built at the client, what changed since round 0
    first_down_bytes: int
    round_bytes: int  # all clients of one steady-state round, up + down
    rounds: int
    total_bytes: int  # over `rounds` rounds, the same clients every round (round 0: first contact)
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def parse_methods(text) -> list[str]:
    valid = method_names()
    if text is None or text == "all" or text == ["all"]:
        return list(valid)
    items = text.split(",") if isinstance(text, str) else list(text)
    methods = [m.strip() for m in items if m.strip()]
    for m in methods:
        if m not in valid:
            raise UsageError(f"--method: unknown method {m!r}; valid: {', '.join(valid)}, all")
    if not methods:
        raise UsageError(f"--method: give a method or 'all'; valid: {', '.join(valid)}")
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


def _schedule(method: Method, shapes: ModelShapes, clients: int, rounds: int, built_at_client: bool = False,
              control_variates: bool = False) -> list[dict[str, int]]:
    """Per round: what one of ``clients`` clients (all taking part and aggregated every round, at the full rank) sends
    and receives — ``up``, ``down`` (``first`` at round 0) — in bytes and numbers (``up_n``, ``down_n``); and
    ``joining``, ``joining_n``: what a client new in that round receives.

    The clients are alike (same rounds, same rank), so client 0's messages are every client's: its downlink and upload
    are built once a round, and the aggregate still sees all ``clients`` uploads (the stacked downlinks grow with them).
    """
    replay = MessageReplay(method, shapes, built_at_client, control_variates)
    ranks = dict.fromkeys(range(clients), method.rank)
    rows = []
    for round_idx in range(rounds):
        down = replay.down(0, method.rank, round_idx)
        joining = replay.down(clients + round_idx, method.rank, round_idx)  # a client of no other round
        up = replay.up(round_idx, method.rank)
        rows.append({"up": nbytes(up), "down": nbytes(down), "up_n": numel_of(up), "down_n": numel_of(down),
                     "joining": nbytes(joining), "joining_n": numel_of(joining)})
        replay.aggregate(round_idx, ranks)
    return rows


def schedules(method: Method, shapes: ModelShapes, rounds: int, built_at_client: bool = False, control_variates: bool = False):
    """``clients -> _schedule(method, shapes, clients, rounds, built_at_client, control_variates)``, each count run once."""
    return functools.cache(lambda clients: _schedule(method, shapes, clients, rounds, built_at_client, control_variates))


def method_cost(shapes: ModelShapes, method: Method, clients: int, rounds: int = 1, notes: str = "", at=None,
                built_at_client: bool = False) -> CommRow:
    """The cost of one method for ``clients`` clients a round over ``rounds`` rounds (``at``: its ``schedules``, if made).

    ``built_at_client`` (``adapters.init_at: client``): the first contact is a client's joining in the steady round,
    which receives what changed since round 0 (in round 0 it receives nothing)."""
    if clients < 1:
        raise UsageError(f"--clients: must be ≥ 1, got {clients}")
    if rounds < 1:
        raise UsageError(f"--rounds: must be ≥ 1, got {rounds}")
    c = method.num_clients or clients
    steady = method.steady_round()
    schedule = (at or schedules(method, shapes, max(rounds, steady + 1), built_at_client))(c)
    row = schedule[steady]
    first = {"down": row["joining"], "down_n": row["joining_n"]} if built_at_client else schedule[0]
    if method.num_clients is not None:
        notes = "; ".join(filter(None, [notes, f"{c} client"]))
    return CommRow(
        model=shapes.name, method=method.name, rank=method.rank, clients=c, layers=len(shapes.layers),
        up_params=row["up_n"], down_params=row["down_n"], up_bytes=row["up"], down_bytes=row["down"],
        first_down_params=first["down_n"], first_down_bytes=first["down"], round_bytes=c * (row["up"] + row["down"]),
        rounds=rounds, total_bytes=sum(c * (r["up"] + r["down"]) for r in schedule[:rounds]), notes=notes,
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
    init_at: str | None = None,
    control_variates: bool = False,
    **settings,
) -> list[CommRow]:
    """Rows for every (method, rank, client count). ``model``: a preset, config.json, folder or ``ModelShapes``.

    ``settings``: ``method.*`` settings (``switch_round``, ``adapter``, ``fedex_downlink``, …). A method's
    ``comm_variants`` (FedEx-LoRA: its residual and its stacked downlink) each get a row unless a setting fixes them.
    ``init_at`` (``adapters.init_at``): ``server``, ``client``, or None for both where they differ beyond round 0 (a
    method whose state keeps tensors no aggregation changes, as Fed-SB's B and A: a client can build them itself).
    ``control_variates`` (``train.control_variates``, SCAFFOLD): each client's Δc up and the server's c down as well.
    """
    shapes = model if isinstance(model, ModelShapes) else model_shapes(
        model, target_modules, task=task, num_labels=num_labels, head=head, dtype=dtype)
    rows = []
    for name in parse_methods(methods):
        for rank in ranks:
            for variant in _variants(name, settings):
                method = method_of(name, int(rank), train_head=bool(shapes.head), **{**settings, **variant})
                notes = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in variant.items())
                steady = method.steady_round()
                at = schedules(method, shapes, max(rounds, steady + 1), control_variates=control_variates)
                protocols = [init_at] if init_at else ["server", "client"] if keeps_initial_tensors(method, shapes) else ["server"]
                for protocol in protocols:
                    built = protocol == "client"
                    where = at if not built else schedules(method, shapes, max(rounds, steady + 1), True, control_variates)
                    label = ", ".join(filter(None, [notes, "init at client" if built else "", "SCAFFOLD" if control_variates else ""]))
                    for count in clients:
                        rows.append(method_cost(shapes, method, int(count), rounds, label, where, built_at_client=built))
    return rows


def keeps_initial_tensors(method: Method, shapes: ModelShapes) -> bool:
    """Whether some tensor of the method's round-0 state is never changed by its aggregation (Fed-SB's B and A, FFA-LoRA's
    A): one client's schedule past the steady round, replayed on meta tensors."""
    replay = MessageReplay(method, shapes)
    for round_idx in range(method.steady_round() + 2):
        replay.aggregate(round_idx, {0: method.rank})
    return bool(set(replay.state) - set(replay.downlinks.changed))


def _variants(name: str, settings: dict) -> list[dict]:
    from fedsim.methods import METHODS

    variants = [v for v in METHODS[name].comm_variants if not set(v) & set(settings)]
    return variants or [{}]


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


def per_round_vs_clients(shapes: ModelShapes, methods, rank: int, clients: Sequence[int], **settings) -> dict[str, list[CommRow]]:
    """For plots: each method's steady-state row at every client count."""
    out = {}
    for name in parse_methods(methods):
        method = method_of(name, rank, train_head=bool(shapes.head), **settings)
        at = schedules(method, shapes, method.steady_round() + 1)
        out[name] = [method_cost(shapes, method, c, at=at) for c in clients]
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


def run_shapes(run_dir, config: dict | None = None) -> tuple[ModelShapes, Method]:
    """The model shapes and the method of a run folder (its config.yaml, and the number of labels it trained)."""
    import yaml

    from fedsim.config import config_from_dict, resolve_model_path

    run_dir = Location(run_dir)
    if config is None:
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise UsageError(f"results: {run_dir} has no config.yaml; the prediction needs the run's config")
        config = yaml.safe_load(path.read_text()) or {}
    model_cfg = config.get("model", {})
    num_labels = None
    meta = run_dir / "data" / "meta.json"
    if meta.is_file():
        num_labels = json.loads(meta.read_text()).get("num_labels")
    elif (run_dir / "label_counts.parquet").is_file():
        labels = (run_dir / "label_counts.parquet").read_table(columns=["label"])["label"].to_pylist()
        num_labels = len(set(labels)) or None
    source = resolve_model_path(model_cfg.get("name", "minilm"))
    if not Path(source).exists() and _preset_key(source) is None:
        raise UsageError(f"results: the model {model_cfg.get('name')!r} of {run_dir} is neither a local folder nor a preset")
    full = config_from_dict({key: config[key] for key in ("seed", "method", "clients", "adapters", "eval") if key in config})
    shapes = model_shapes(
        source if Path(source).exists() else _preset_key(source), model_cfg.get("target_modules"),
        task=model_cfg.get("task", "classification"), num_labels=num_labels,
        head=full.method.train_head or full.adapters.head_init == "public", dtype=model_cfg.get("dtype", "float32"),
    )  # known families by formula (tests check it against the model built on the meta device), others on meta
    shapes = replace(shapes, name=str(model_cfg.get("name", shapes.name)))
    return shapes, build_method(full.method, full.clients, full.seed)


def predict_run(run_dir, tolerance: float = TOLERANCE) -> RunPrediction:
    """Replay a run's schedule (``clients.parquet``) through the method's own messages; compare with ``rounds.parquet``.

    A sampled client receives the whole state at its first round and the last round's broadcast after that
    (dropped clients too); a client that trained (``ok`` or ``nonfinite``, or a straggler that trained)
    sends its upload at its rank; the broadcast of round t comes from the clients aggregated in round t (``ok``).
    """
    run_dir = Location(run_dir)
    for name in ("rounds.parquet", "clients.parquet"):
        if not (run_dir / name).is_file():
            raise UsageError(f"results: {run_dir} has no {name}; pass the output_dir of a finished fedsim run")
    shapes, method = run_shapes(run_dir)
    clients = (run_dir / "clients.parquet").read_table().to_pylist()
    rounds = sorted((run_dir / "rounds.parquet").read_table().to_pylist(), key=lambda r: r["round"])
    by_round: dict[int, list[dict]] = {}
    for row in clients:
        by_round.setdefault(row["round"], []).append(row)
    replay = MessageReplay(method, shapes, built_at_client=_init_at(run_dir) == "client",
                           control_variates=_control_variates(run_dir))
    prediction = RunPrediction(run_dir, method.name, tolerance=tolerance)
    for measured in rounds:
        t = measured["round"]
        rows = sorted(by_round.get(t, []), key=lambda r: r["client_id"])
        pred = {"pred_bytes_up": 0, "pred_bytes_down": 0, "pred_params_up": 0, "pred_params_down": 0}
        for row in rows:
            rank = _client_rank(row, method.rank)
            down = replay.down(row["client_id"], rank, t)
            pred["pred_bytes_down"] += nbytes(down)
            pred["pred_params_down"] += numel_of(down)
            if row["status"] in TRAINED_STATUSES or (row["status"] == "straggler" and (row.get("steps") or 0) > 0):
                up = replay.up(t, rank)
                pred["pred_bytes_up"] += nbytes(up)
                pred["pred_params_up"] += numel_of(up)
        replay.aggregate(t, {row["client_id"]: _client_rank(row, method.rank) for row in rows if row["status"] == "ok"})
        entry = {"round": t, "bytes_up": int(measured["bytes_up"]), "bytes_down": int(measured["bytes_down"]), **pred}
        entry["rel_err_up"] = _rel(entry["bytes_up"], pred["pred_bytes_up"])
        entry["rel_err_down"] = _rel(entry["bytes_down"], pred["pred_bytes_down"])
        entry["flag"] = max(entry["rel_err_up"], entry["rel_err_down"]) > tolerance
        prediction.rounds.append(entry)
    return prediction


def _init_at(run_dir: Location) -> str:
    """The run's ``adapters.init_at`` (its config.yaml; ``server`` where it predates the setting)."""
    import yaml

    adapters = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("adapters") or {}
    return adapters.get("init_at", "server")


def _control_variates(run_dir: Location) -> bool:
    """Whether the run trained with SCAFFOLD's control variates (``train.control_variates``)."""
    import yaml

    train = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train") or {}
    return bool(train.get("control_variates", False))


def _client_rank(row: dict, full_rank: int) -> int:
    rank = row.get("rank")
    return int(rank) if rank and 0 < int(rank) <= full_rank else full_rank
