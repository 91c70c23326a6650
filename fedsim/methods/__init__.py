"""Aggregation methods, one file each, behind the interface of ``fedsim.methods.base.Method``, and their registry.

A method is one class in one file, registered with ``@register``; that makes it a valid ``method.name``,
runnable, counted by ``fedsim comm`` (which runs the method's own upload and aggregate on meta tensors),
listed in reports and in the README's method table (``fedsim methods``). The runtime never asks which
method it runs.

A method's own settings are a ``MethodOptions`` dataclass in its file (its ``options_class``), written in a config
beside the shared ones (``method.switch_round: 2``). ``fedsim.config`` keeps them as given; they are checked here,
where methods are built, with ``method.name`` (``check_settings``): a setting of another method is valid, and ignored.
"""

from __future__ import annotations

import dataclasses

from fedsim.config import ClientsConfig, MethodConfig, Rule, describe_section, unknown_key_message
from fedsim.errors import UsageError
from fedsim.methods.base import About, Method, MethodOptions, RoundResult, Upload

METHODS: dict[str, type[Method]] = {}


def register(name: str, paper: str = "", **about: str):
    """A class decorator: the method class under ``name`` in the registry, with its paper's link and its ``About``
    (``trains``, ``rule``, ``exact``: what the README's table says of it).

        @register("fed-sb", paper="https://arxiv.org/abs/2502.15436", trains="R (r×r); B, A frozen", rule="`R = Σ w_i R_i`")
        class FedSB(Method): ...
    """

    def add(cls: type[Method]) -> type[Method]:
        cls.name, cls.paper, cls.about = name, paper, About(**about)
        METHODS[name] = cls
        return cls

    return add


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in registration order."""
    return tuple(METHODS)


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; one line naming ``method.name`` and the valid names otherwise."""
    problem = Rule(choices=method_names, what="method ").problem(name, optional=False)
    if problem:
        raise UsageError(f"method.name: {problem}")
    return METHODS[name]


def option_owners() -> dict[str, list[str]]:
    """Each setting a registered method declares (``method.<key>``), with the names of the methods that declare it."""
    owners: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.options_class):
            owners.setdefault(f.name, []).append(name)
    return owners


def check_settings(config: MethodConfig) -> type[Method]:
    """The class of ``method.name``, once it and every method's own setting given (``config.options``) are valid: each
    setting is checked by the dataclass of a method that declares it. One line naming the key otherwise."""
    cls = method_class(config.name)
    owners = option_owners()
    shared = [f.name for f in dataclasses.fields(MethodConfig) if f.name != MethodConfig.rest]
    for key in config.options:
        if key not in owners:
            raise UsageError(unknown_key_message(MethodConfig.prefix, key, [*shared, *owners]))
    for options_class in dict.fromkeys(METHODS[name].options_class for key in config.options for name in owners[key]):
        options_class.from_settings(config.options)
    return cls


def resolved(config: MethodConfig) -> MethodConfig:
    """``config`` checked (``check_settings``), with its method's own settings complete, defaults included: what
    ``fedsim config`` shows and a run records in its config.yaml."""
    own = check_settings(config).options_class.from_settings(config.options)
    return dataclasses.replace(config, options={**config.options, **dataclasses.asdict(own)})


def build_method(config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0) -> Method:
    """The method named by ``config.name`` (the ``method`` section), with ``clients.weights``,
    ``clients.rank_aggregation`` and the run seed; ``method.name`` and the method settings are checked first."""
    return check_settings(config)(config, clients, seed)


def methods_table() -> str:
    """Every registered method as a Markdown table (README.md's method table is this, ``fedsim methods``)."""
    lines = ["| `method.name` | client trains | server aggregate | exact? | paper |", "|---|---|---|---|---|"]
    for name, cls in METHODS.items():
        paper = f"[{cls.paper.rsplit('/', 1)[-1]}]({cls.paper})" if cls.paper else "reference"
        lines.append(f"| `{name}` | {cls.about.trains} | {cls.about.rule} | {cls.about.exact} | {paper} |")
    return "\n".join(lines)


def option_settings() -> list[dict[str, str]]:
    """Every registered method's own settings, one ``fedsim config --list`` row each (key, type, default, valid, help)."""
    classes = dict.fromkeys(cls.options_class for cls in METHODS.values())
    return [row for options_class in classes for row in describe_section(options_class)]


def options_table() -> str:
    """Every method's own settings as a Markdown table (``fedsim methods`` prints it under ``methods_table``)."""
    owners = option_owners()
    lines = ["| setting | of | default | valid | what it does |", "|---|---|---|---|---|"]
    for row in option_settings():
        cells = [f"`{row['key']}`", ", ".join(f"`{name}`" for name in owners[row["key"].removeprefix(MethodConfig.prefix)]),
                 f"`{row['default'].strip(chr(39))}`", row["valid"], row["help"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


# The built-in methods register themselves on import.
from fedsim.methods import (  # noqa: E402,F401,I001
    fed_sb, fedit, fedex_lora, ffa_lora, flora, fra_lora, fra_then_ffa, fedsa_lora, rolora, fedsvd, flexlora, hetlora,
    lora_fair, ravan, central,
)

__all__ = ["METHODS", "Method", "MethodOptions", "RoundResult", "Upload", "build_method", "check_settings", "method_class",
           "method_names", "methods_table", "option_owners", "option_settings", "options_table", "register", "resolved"]
