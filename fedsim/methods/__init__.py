"""Aggregation methods, one file each, behind the interface of ``fedsim.methods.base.Method``, and their registry.

A method is one class in one file, registered with ``@register``; that makes it a valid ``method.name``,
runnable, counted by ``fedsim comm`` (which runs the method's own upload and aggregate on meta tensors),
listed in reports and in the README's method table (``fedsim methods``). The runtime never asks which
method it runs.
"""

from __future__ import annotations

from fedsim.config import ClientsConfig, MethodConfig
from fedsim.methods.base import About, Method, RoundResult, Upload

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


def build_method(config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0) -> Method:
    """The method named by ``config.name`` (the ``method`` section), with ``clients.weights``,
    ``clients.rank_aggregation`` and the run seed. ``config`` was validated when it was built."""
    return METHODS[config.name](config, clients, seed)


def methods_table() -> str:
    """Every registered method as a Markdown table (README.md's method table is this, ``fedsim methods``)."""
    lines = ["| `method.name` | client trains | server aggregate | exact? | paper |", "|---|---|---|---|---|"]
    for name, cls in METHODS.items():
        paper = f"[{cls.paper.rsplit('/', 1)[-1]}]({cls.paper})" if cls.paper else "reference"
        lines.append(f"| `{name}` | {cls.about.trains} | {cls.about.rule} | {cls.about.exact} | {paper} |")
    return "\n".join(lines)


# The built-in methods register themselves on import.
from fedsim.methods import (  # noqa: E402,F401,I001
    fed_sb, fedit, fedex_lora, ffa_lora, flora, fra_lora, fra_then_ffa, fedsa_lora, rolora, fedsvd, flexlora, hetlora,
    lora_fair, central,
)

__all__ = ["METHODS", "Method", "RoundResult", "Upload", "build_method", "method_names", "methods_table", "register"]
