"""Every setting reaches the code that should read it: change one key at a time and watch that code's output change.

Each probe builds what the runtime builds from a config (the data preparation, the plan, a ClientWorker as a plain
object, the method, the privacy plan, the driver's own decisions) and reports what the key should change. A key that
is validated but never read (as `clients.rank_aggregation` once was) makes its probe see no change, and fails here;
so does a change that validation refuses (a UsageError is not the key reaching its reader).
No Ray: the driver's Ray calls take their arguments from `ray_init_args` and `worker_actors`, probed directly.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from tiny_models import tiny_bert_with_tokenizer

from analysis.comm import meta_state, meta_upload
from fedsim.config import Config, config_from_dict, config_to_dict, field_paths
from fedsim.errors import UsageError
from fedsim.methods import Upload, option_owners
from fedsim.modeling import checkpointing_on
from fedsim.runtime.driver import Experiment, ray_init_args, worker_actors
from fedsim.runtime.worker import ClientWorker
from fedsim.shapes import Linear, ModelShapes
from fedsim.storage import Location

TEXTS = [("a good film, warm and funny", 1), ("dull and far too long", 0), ("the best acting of the year", 1),
         ("I want my two hours back", 0), ("sharp, kind and beautifully shot", 1), ("a mess from start to end", 0)] * 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    tiny_bert_with_tokenizer(root / "model")
    other = root / "other-model"
    tiny_bert_with_tokenizer(other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    for name, sep in (("a.tsv", "\t"), ("b.tsv", "\t")):
        rows = TEXTS if name == "a.tsv" else TEXTS[:30]
        (root / name).write_text("sentence\tlabel\tother\n" + "".join(f"{t}\t{y}\t{t[::-1]}\n" for t, y in rows))
    return root


def base(files, **overrides) -> dict:
    config = config_to_dict(Config())
    for key, value in {
        "output_dir": str(files / "runs" / "base"), "model.name": str(files / "model"), "workload.name": "text-file",
        "workload.path": str(files / "a.tsv"), "workload.options": {"text_column": "sentence", "label_column": "label"},
        "workload.train_limit": 40, "workload.eval_limit": 12, "workload.max_length": 16, "clients.count": 4,
        "clients.per_round": 2, "train.local_steps": 2, "train.batch_size": 4, "adapters.init_samples": 8,
        "adapters.init_batch_size": 4, "eval.batch_size": 4, **overrides,
    }.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    return config


def build(files, config: dict, name: str) -> Experiment:
    """Prepare a run of ``config`` (data written under its own folder) as `fedsim run` does, before Ray starts."""
    cfg = config_from_dict({**config, "output_dir": str(files / "runs" / name)})
    experiment = Experiment(cfg, Location(cfg.output_dir), resumed=False, progress=False)
    Location(cfg.output_dir).delete()
    experiment.prepare()
    return experiment


# -- probes: what each part of the code does with a config ------------------------------------------------------------


def data_probe(files, config, name):
    plan = build(files, config, name).plan
    d = plan.data
    public = Location(d.data_dir) / "public.parquet"
    return (d.workload, d.num_labels, d.train_rows, d.eval_rows, d.client_sizes, d.client_eval_sizes, d.eval_chunks,
            public.read_table().num_rows if public.exists() else None, Location(plan.output_dir).name)


def worker(files, config, name):
    return ClientWorker(build(files, config, name).plan, 0)


def training_probe(files, config, name, round_idx=0):
    """Two clients trained for one round (round ``round_idx``) from the round-0 state: their uploads and rows."""
    w = worker(files, config, name)
    state = w.initial_state()
    uploads, rows = w.train(round_idx, state, [0, 1], build(files, config, name + "-s").privacy.noise_multiplier)
    rows = [{k: v for k, v in row.items() if k != "train_s"} for row in rows]
    return [{k: v.tolist() for k, v in u["tensors"].items()} for u in uploads], rows, sorted(w.model.state_dict())[:3]


def later_round_probe(files, config, name):
    """training_probe in round 2, for a setting that acts on the round's index (train.lr_decay)."""
    return training_probe(files, config, name, round_idx=2)


def init_probe(files, config, name):
    return {k: v.tolist() for k, v in worker(files, config, name).initial_state().items()}


def eval_probe(files, config, name):
    w = worker(files, config, name)
    return w.evaluate(w.initial_state(), list(range(w.plan.data.eval_chunks)))


def task_probe(files, config, name):
    """The class of the base model ``modeling.load_model`` builds (the worker's call), from the config alone: the data
    check that refuses a task the workload does not fit is validation, not the key's reader."""
    from fedsim.modeling import load_model

    return type(load_model(config_from_dict(config), num_labels=2)).__name__


def model_probe(files, config, name):
    w = worker(files, config, name)
    dropouts = sorted({m.p for m in w.model.modules() if isinstance(m, torch.nn.Dropout)})
    return type(w.model).__name__, str(next(w.model.parameters()).dtype), w.model.config.num_hidden_layers, \
        sorted(n for n, _ in w.model.named_modules() if n.endswith(("lora_A", "lora_R"))), dropouts, checkpointing_on(w.model)


def cohort_probe(files, config, name):
    """How many clients each training pass of a round holds (``fedsim.training.engine.train_clients``, spied on)."""
    from unittest import mock

    from fedsim.runtime import worker as worker_module

    sizes = []
    real = worker_module.train_clients

    def spy(model, method, round_idx, states, *args, **kwargs):
        sizes.append(len(states))
        return real(model, method, round_idx, states, *args, **kwargs)

    w = worker(files, config, name)
    with mock.patch.object(worker_module, "train_clients", spy):
        w.train(0, w.initial_state(), [0, 1, 2, 3])
    return sizes


def rows_probe(files, config, name):
    w = worker(files, config, name)
    rows = w.client_rows([0])[0][0]
    return [len(f["input_ids"]) for f in rows.features]


def method_probe(files, config, name):
    """The method the plan carries: its messages on meta tensors for two clients of ranks (r, 1), and how it weighs them."""
    plan = build(files, config, name).plan
    method = plan.method
    shapes = ModelShapes("probe", (Linear("layer", 6, 5),), head=(("classifier.weight", (2, 5)),))
    state = meta_state(method, shapes)
    real = {key: torch.randn(value.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            for key, value in state.items()}
    uploads = [Upload(0, 3, meta_upload(method, real, 1, method.rank)), Upload(1, 9, meta_upload(method, real, 1, 1))]
    uploads = [Upload(u.client_id, u.num_samples, {k: v + u.client_id for k, v in u.tensors.items()}) for u in uploads]
    result = method.aggregate(real, uploads, 1)
    return (type(method).__name__, method.scaling, {k: tuple(v.shape) for k, v in state.items()}, method.trained_kinds(1),
            method.client_weights(uploads), {k: v.tolist() for k, v in result.state.items()}, sorted(result.broadcast),
            plan.client_ranks)


def downlink_probe(files, config, name):
    """Bytes two clients receive at their first contact in round 0, from the aggregator holding the round-0 state."""
    from fedsim.runtime.aggregator import Aggregator

    experiment = build(files, config, name)
    aggregator = Aggregator(experiment.plan)
    aggregator.set_state(ClientWorker(experiment.plan, 0).initial_state())
    return aggregator.downlink_bytes([0, 1], 0)


def server_probe(files, config, name):
    """The aggregator's state after two rounds of the same two uploads (the round-0 state moved by fixed offsets)."""
    from fedsim.runtime.aggregator import Aggregator

    experiment = build(files, config, name)
    aggregator = Aggregator(experiment.plan)
    aggregator.set_state(ClientWorker(experiment.plan, 0).initial_state())
    method = experiment.plan.method
    for round_idx in range(2):
        uploads = [{"client_id": cid, "num_samples": 3 + cid, "tensors": {key: value + 0.01 * (cid + 1) * (round_idx + 1) for key, value in
                                                                          meta_upload(method, aggregator.state, round_idx).items()}}
                   for cid in (0, 1)]
        aggregator.aggregate(round_idx, [0, 1], uploads)
    return {key: value.tolist() for key, value in aggregator.state.items()}


def driver_probe(files, config, name):
    experiment = build(files, config, name)
    return [experiment.sample(t) for t in range(3)], [experiment.evaluates(t) for t in range(6)], experiment.privacy.noise_multiplier


def privacy_probe(files, config, name):
    """σ of the privacy plan, and ε a client's history spends."""
    experiment = build(files, config, name)
    privacy = experiment.privacy
    rows = [{"client_id": 0, "noise_multiplier": privacy.noise_multiplier or 1.0, "sample_rate": 0.5, "steps": 4}]
    privacy.account(rows)
    return privacy.noise_multiplier, rows[0]["epsilon"]


def ray_probe(files, config, name):
    cfg = config_from_dict(config)
    args = ray_init_args(cfg)
    args.pop("runtime_env")
    return args, worker_actors(cfg.runtime)


def straggler_probe(files, config, name):
    w = worker(files, config, name)
    return [row["status"] for row in w.train(0, w.initial_state(), [0, 1, 2])[1]]


def causal_eval_probe(files, config, name):
    """How many new tokens the evaluation asks generation for (``fedsim.data.generate``, spied on)."""
    from unittest import mock

    import fedsim.data

    asked = []
    real = fedsim.data.generate

    def spy(model, rows, indices, max_new_tokens, device="cpu"):
        asked.append(max_new_tokens)
        return real(model, rows, indices, max_new_tokens, device)

    with mock.patch.object(fedsim.data, "generate", spy):
        eval_probe(files, config, name)
    return sorted(set(asked))


def presum_probe(files, config, name):
    """What a worker sends of its round: each upload, or one weighted sum."""
    w = worker(files, config, name)
    return [type(item).__name__ for item in w.train(0, w.initial_state(), [0, 1, 2])[0]]


def output_probe(files, config, name):
    """Where `fedsim.runtime.run` writes a run (stopped where Ray would start)."""
    from unittest import mock

    from fedsim.runtime import driver

    outputs = Location(str(files / "outputs"))
    outputs.delete()
    cfg = config_from_dict({**config, "output_dir": str(files / "outputs" / config["output_dir"])})
    with mock.patch.object(driver, "ray_session", side_effect=RuntimeError("stop before Ray")):
        with pytest.raises(RuntimeError, match="stop before Ray"):
            driver.run(cfg, overwrite=True, progress=False)
    return [(run.name, sorted(child.name for child in run.iterdir())) for run in outputs.iterdir()]


def kill_probe(files, config, name):
    """Worker 0 dies after its first client of ``runtime.kill_worker_round`` (os._exit, caught here)."""
    import os

    import ray

    w = worker(files, config, name)
    died = []
    context = type("Context", (), {"was_current_actor_reconstructed": False})()
    original_exit, original_context = os._exit, ray.get_runtime_context
    os._exit, ray.get_runtime_context = (lambda code: died.append(code)), (lambda: context)
    try:
        for round_idx in range(3):
            w._maybe_die(round_idx, 1)
    finally:
        os._exit, ray.get_runtime_context = original_exit, original_context
    return died


# Every leaf key: (a value other than the base's, the probe that must see it). Keys not here fail the completeness test.
PROBES = {
    "seed": (7, driver_probe),
    "output_dir": ("elsewhere", "output"),
    "model.name": ("other-model", model_probe),
    "model.target_modules": (["query", "key"], model_probe),
    "model.task": ("causal-lm", task_probe),
    "model.dtype": ("bfloat16", model_probe),
    "model.dropout": (0.0, model_probe),
    "model.gradient_checkpointing": (True, model_probe),
    "workload.name": ("bbc-news", data_probe),
    "workload.path": ("b.tsv", data_probe),
    "workload.max_length": (6, rows_probe),
    "workload.train_limit": (30, data_probe),
    "workload.eval_limit": (8, data_probe),
    "workload.validation": (10, data_probe),
    "workload.options": ({"text_column": "other", "label_column": "label"}, rows_probe),
    "workload.loss_on": ("all", "causal"),
    "method.name": ("fedit", method_probe),
    "method.rank": (3, method_probe),
    "method.alpha": (8.0, "lora"),
    "method.train_head": (False, method_probe),
    "method.head_rounds": (1, method_probe),  # round 1 is after the warm-up: no head goes up
    "method.local_head": (True, method_probe),
    "method.switch_round": (1, "fra-then-ffa"),
    "method.adapter": ("lora", "central"),
    "method.fedex_downlink": ("stacked", "fedex-lora"),
    "method.lora_fair_correction": ("closed-form", "lora-fair"),
    "method.ravan_heads": (2, "ravan"),
    "method.ravan_init": ("lora-sb", "ravan-init"),
    "adapters.init_data": ("public", data_probe),
    "adapters.init_samples": (4, init_probe),
    "adapters.init_batch_size": (2, "uneven-init"),
    "adapters.init_lr": (0.5, init_probe),
    "adapters.init_at": ("client", "public-downlink"),
    "adapters.head_init": ("public", init_probe),
    "clients.count": (3, data_probe),
    "clients.per_round": (3, driver_probe),
    "clients.partition": ("iid", data_probe),
    "clients.alpha": (50.0, data_probe),
    "clients.weights": ("uniform", method_probe),
    "clients.dropout": (0.9, driver_probe),
    "clients.dominant_share": (0.95, "imbalanced"),
    "clients.corrupt": ([1], training_probe),
    "clients.ranks": ([1, 2, 3, 4], method_probe),
    "clients.rank_aggregation": ("partitioned", "ranked"),
    "clients.rank_scaling": ("own", "ranked-training"),  # the rank-1 client trains at r/1: its upload changes
    "train.rounds": (2, "rounds"),
    "train.local_steps": (3, training_probe),
    "train.local_epochs": (1.0, training_probe),  # with train.local_steps=null (see COMPANIONS)
    "train.batch_size": (2, training_probe),
    "train.micro_batch_size": (1, training_probe),
    "train.lr": (0.05, training_probe),
    "train.weight_decay": (0.5, training_probe),
    "train.schedule": ("linear", training_probe),
    "train.warmup_steps": (2, training_probe),
    "train.lr_decay": (0.5, later_round_probe),
    "train.max_grad_norm": (1e-4, training_probe),
    "train.prox_mu": (1.0, training_probe),
    "train.control_variates": (True, training_probe),
    "privacy.enabled": (True, "public-init"),  # with privacy.epsilon=3: DP needs a target (see COMPANIONS)
    "privacy.epsilon": (1.0, "private"),
    "privacy.delta": (1e-3, "private"),
    "privacy.noise_multiplier": (0.7, "private-fixed"),
    "privacy.max_grad_norm": (0.01, "private-training"),
    "privacy.accountant": ("prv", "private"),
    "privacy.init_noise_multiplier": (9.0, "private-init"),
    "runtime.workers": (3, ray_probe),
    "runtime.cpus_per_worker": (0.5, ray_probe),
    "runtime.gpus_per_worker": (0.25, ray_probe),
    "runtime.aggregator_gpus": (0.5, ray_probe),
    "runtime.address": ("ray://head:10001", ray_probe),
    "runtime.max_restarts": (0, ray_probe),
    "runtime.placement_timeout_s": (5.0, ray_probe),
    "runtime.deadline_s": (1e-9, straggler_probe),
    "runtime.kill_worker_round": (1, kill_probe),
    "runtime.cohort_size": (3, cohort_probe),
    "runtime.presum": (True, presum_probe),
    "server.optimizer": ("adam", server_probe),
    "server.lr": (0.5, server_probe),
    "server.momentum": (0.5, "avgm"),
    "server.betas": ([0.5, 0.9], "adam"),
    "server.tau": (0.1, "adam"),
    "eval.every": (2, driver_probe),
    "eval.batch_size": (8, eval_probe),
    "eval.max_new_tokens": (2, "causal-eval"),
    "eval.per_client": (0.25, data_probe),
}

# Keys that only act in a setting other than the base's: (the base's overrides, the probe).
CONTEXTS = {
    "output": ({"output_dir": "base"}, output_probe),
    "rounds": ({"eval.every": 4}, driver_probe),
    "uneven-init": ({"adapters.init_samples": 12}, init_probe),  # 3 rows a client: batches of 2 weigh them unevenly
    "public-init": ({"adapters.init_data": "public"}, privacy_probe),
    "public-downlink": ({"adapters.init_data": "public"}, downlink_probe),
    "lora": ({"method.name": "fedit"}, method_probe),
    "fra-then-ffa": ({"method.name": "fra-then-ffa"}, method_probe),
    "central": ({"method.name": "central"}, method_probe),
    "fedex-lora": ({"method.name": "fedex-lora"}, method_probe),
    "lora-fair": ({"method.name": "lora-fair"}, method_probe),
    "ravan": ({"method.name": "ravan"}, method_probe),
    "ravan-init": ({"method.name": "ravan"}, init_probe),
    "imbalanced": ({"clients.partition": "imbalanced"}, data_probe),
    "avgm": ({"server.optimizer": "avgm"}, server_probe),
    "adam": ({"server.optimizer": "adam", "server.lr": 0.01}, server_probe),
    "ranked": ({"clients.ranks": [1, 4, 4, 4]}, method_probe),
    "ranked-training": ({"clients.ranks": [1, 4, 4, 4]}, training_probe),
    "private": ({"privacy.enabled": True, "privacy.epsilon": 3.0, "adapters.init_data": "public"}, privacy_probe),
    "private-fixed": ({"privacy.enabled": True, "privacy.noise_multiplier": 1.0, "adapters.init_data": "public"}, privacy_probe),
    "private-training": ({"privacy.enabled": True, "privacy.noise_multiplier": 0.0, "adapters.init_data": "public"},
                         training_probe),
    "private-init": ({"privacy.enabled": True, "privacy.epsilon": 20.0, "privacy.init_noise_multiplier": 2.0}, privacy_probe),
}
# A key whose change is only valid with another: the companions change with it.
COMPANIONS = {"privacy.enabled": {"privacy.epsilon": 3.0}, "method.local_head": {"eval.per_client": 0.25}, "train.local_epochs": {"train.local_steps": None},
              "workload.name": {"workload.path": None, "workload.options": {}}}  # bbc-news: its own files, no text-file options
CAUSAL = {"model.task": "causal-lm", "workload.name": "gsm8k", "workload.options": {}, "method.train_head": False,
          "model.target_modules": ["q_proj", "v_proj"], "workload.max_length": 48, "eval.max_new_tokens": 6}


def comparable(seen):
    """``seen`` with every float NaN as the string "nan": NaN != NaN, so a probe that returns one (a row's
    noise_multiplier without DP) would differ from itself and see every key change."""
    if isinstance(seen, float) and math.isnan(seen):
        return "nan"
    if isinstance(seen, dict):
        return {key: comparable(value) for key, value in seen.items()}
    if isinstance(seen, (list, tuple)):
        return type(seen)(comparable(value) for value in seen)
    return seen


def observe(files, probe, config, name):
    """What ``probe`` sees of ``config``, NaN-safe to compare. A UsageError is no observation: a value that validation
    refuses never reaches the code that would read it."""
    try:
        return comparable(probe(files, config, name))
    except UsageError as error:
        pytest.fail(f"{name}: refused, so never read: {error}")


def test_every_key_has_a_probe():
    """Every key of the config, and every method's own setting (declared in its file: ``fedsim.methods``)."""
    assert sorted(PROBES) == sorted(field_paths() + [f"method.{key}" for key in option_owners()])


@pytest.mark.parametrize("key", sorted(PROBES))
def test_the_code_that_reads_a_key_sees_it_change(key, files, request):
    value, probe = PROBES[key]
    overrides = {}
    if isinstance(probe, str) and probe.startswith("causal"):
        pytest.importorskip("transformers")
        gsm8k = request.config.rootpath.parent / "shared" / "data" / "gsm8k"
        if not gsm8k.is_dir():
            pytest.skip(f"{gsm8k} is absent: the real data sets are not shipped with the project (see shared/data/README.md)")
        overrides = {**CAUSAL, "workload.path": str(gsm8k), "model.name": str(causal_model(files))}
        probe = causal_eval_probe if probe == "causal-eval" else rows_probe_labels
    elif isinstance(probe, str):
        overrides, probe = CONTEXTS[probe]
    if key in ("model.name", "workload.path"):
        value = str(files / value)
    config = base(files, **overrides)
    changed = base(files, **{**overrides, key: value, **COMPANIONS.get(key, {})})
    name = key.replace(".", "-")
    before = observe(files, probe, config, name + "-base")
    after = observe(files, probe, changed, name + "-changed")
    assert after != before, key


@functools.cache
def causal_model(files):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedsim.config import resolve_model_path

    path = files / "llama"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rows_probe_labels(files, config, name):
    rows = worker(files, config, name).client_rows([0])[0][0]
    return [sum(label != -100 for label in labels) for labels in rows.labels]
