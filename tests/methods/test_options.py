"""A method owns its settings: a dataclass in its own file declares them (``method.<key>``), checks them when built, and
`fedsim config --list`, `fedsim config` and `fedsim methods` show them; ``fedsim.config`` imports no method. No Ray."""

import ast
import re
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.config import describe_settings, load_config, method_section
from fedsim.errors import UsageError
from fedsim.methods import METHODS, build_method, method_names, options_table, resolved

ROOT = Path(__file__).resolve().parents[2]

# (method, its setting, the default it had in the shared MethodConfig (a new method's: its own), a bad value, the one line
# that names it)
OWN = [
    ("fra-then-ffa", "switch_round", 3, -1, "method.switch_round: must be >= 0, got -1"),
    ("central", "adapter", "lora-sb", "dora", "method.adapter: unknown 'dora'; did you mean 'lora'? valid: lora-sb, lora"),
    ("fedex-lora", "fedex_downlink", "residual", "both", "method.fedex_downlink: unknown 'both'; valid: residual, stacked, auto"),
    ("lora-fair", "lora_fair_correction", "paper", "exact", "method.lora_fair_correction: unknown 'exact'; valid: paper, closed-form"),
    ("ravan", "ravan_heads", 4, 0, "method.ravan_heads: must be a positive integer, got 0"),
    ("ravan", "ravan_init", "orthogonal", "svd", "method.ravan_init: unknown 'svd'; valid: orthogonal, lora-sb"),
]


@pytest.mark.parametrize("name, key, default, bad, message", OWN)
def test_a_method_s_setting_is_declared_and_checked_in_its_own_file(name, key, default, bad, message):
    cls = METHODS[name]
    options = cls.options_class
    assert options.__module__ == cls.__module__  # declared in the method's file
    assert "arXiv" in options.__doc__  # and says where it comes from
    assert options().__dict__[key] == default  # the default it always had (Ravan's: its own from the start)
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        options(**{key: bad})  # the dataclass checks itself
    for build in (lambda: build_method(method_section(name=name, **{key: bad})),
                  lambda: resolved(load_config(None, [f"method.name={name}", f"method.{key}={bad}"]).method)):
        with pytest.raises(UsageError) as error:
            build()
        assert str(error.value) == message
    assert main(["config", f"method.name={name}", f"method.{key}={bad}"]) == 2


def test_a_method_reads_its_own_settings_and_records_their_defaults():
    assert build_method(method_section(name="fra-then-ffa", switch_round=1)).steady_round() == 2
    assert build_method(method_section(name="central", adapter="lora")).trained_kinds(0) == ("lora_A", "lora_B")
    assert resolved(load_config(None, ["method.name=lora-fair"]).method).options == {"lora_fair_correction": "paper"}
    assert resolved(load_config(None, ["method.name=fed-sb"]).method).options == {}


def test_another_method_s_setting_is_valid_and_ignored_but_still_checked():
    """Configs (and every run's config.yaml before this change) carry other methods' settings: they stay valid."""
    fed_sb = method_section(name="fed-sb", switch_round=1, adapter="lora", fedex_downlink="stacked")
    assert resolved(fed_sb).options == {"switch_round": 1, "adapter": "lora", "fedex_downlink": "stacked"}
    assert build_method(fed_sb).trained_kinds(0) == ("lora_R",)
    with pytest.raises(UsageError, match="^method.switch_round: must be >= 0, got -1$"):
        build_method(method_section(name="fed-sb", switch_round=-1))


def test_unknown_method_and_unknown_setting():
    def error_of(*overrides):
        with pytest.raises(UsageError) as error:
            build_method(load_config(None, list(overrides)).method)
        assert "\n" not in str(error.value)
        return str(error.value)

    message = error_of("method.name=fedx")
    assert message.startswith("method.name: unknown method 'fedx'; ")
    assert all(name in message for name in ("fed-sb", "fedit", "central"))
    assert "did you mean 'fed-sb'" in error_of("method.name=fedsb")
    assert error_of("method.lr=0.1") == "unknown config key 'method.lr'; did you mean one of: train.lr, server.lr?"
    assert error_of("method.swich_round=1") == "unknown config key 'method.swich_round'; did you mean 'method.switch_round'?"
    for name in method_names():
        assert build_method(load_config(None, [f"method.name={name}"]).method).name == name


def test_config_list_and_methods_show_each_method_s_settings(capsys):
    assert main(["config", "--list"]) == 0
    listed = capsys.readouterr().out
    for name, key, default, _, _ in OWN:
        line = next(line for line in listed.splitlines() if line.startswith(f"method.{key} "))
        help_text = METHODS[name].options_class.__dataclass_fields__[key].metadata["help"]
        assert help_text in line and str(default) in line
    assert "residual | stacked | auto" in listed and "paper | closed-form" in listed and "lora-sb | lora" in listed
    method_rows = [line.split()[0] for line in listed.splitlines() if line.startswith("method.")]
    assert method_rows[:4] == ["method.name", "method.rank", "method.alpha", "method.train_head"]  # then the methods' own
    assert "fed-sb | fedit" in next(line for line in listed.splitlines() if line.startswith("method.name "))
    assert len(listed.splitlines()) == 1 + len(describe_settings()) + len(OWN)

    assert main(["config", "method.name=fra-then-ffa"]) == 0
    assert "  switch_round: 3" in capsys.readouterr().out  # the resolved config: the method's own, with its help

    assert main(["methods"]) == 0
    shown = capsys.readouterr().out
    assert options_table() in shown and options_table() in (ROOT / "README.md").read_text()
    for name, key, _, _, _ in OWN:
        assert f"| `method.{key}` | `{name}` |" in options_table()


def test_config_imports_no_method():
    """The circle config ↔ methods is gone: the schema names no method, the methods build on it."""
    tree = ast.parse((ROOT / "fedsim" / "config.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("fedsim.methods")}, imported
