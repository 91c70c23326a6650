"""The shapes a message's size depends on: the adapted layers (out × in) and the trained head, with the dtype.

``analysis.comm`` reads them off a model's architecture (a preset, an HF ``config.json``, a model folder);
``shapes_of_state`` reads them off a global state. ``analysis.comm`` builds meta tensors of these shapes and runs
the methods' own code on them to say what they send (``meta_state``), without any weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


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
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def sum_dk(self) -> int:
        """Σ (d + k): LoRA's A and B hold r·Σ(d+k) numbers."""
        return sum(l.out_features + l.in_features for l in self.layers)

    def sum_d(self) -> int:
        return sum(l.out_features for l in self.layers)

    def sum_dxk(self) -> int:
        return sum(l.out_features * l.in_features for l in self.layers)

    def head_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.head)
