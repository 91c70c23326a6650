"""The state vocabulary: how adapter and head tensors are keyed wherever they travel or are stored.

The global state (and every message: an upload, a broadcast, what a client keeps) is a flat ``dict[str, Tensor]``:

- ``"<layer>.lora_A"`` (r×k), ``"<layer>.lora_B"`` (d×r), ``"<layer>.lora_R"`` (r×r, LoRA-SB only),
  ``"<layer>.base_delta"`` (d×k, float32; methods that fold updates into W0), where ``<layer>`` is
  the module path in the base model;
- ``"head:<param>"`` for the classification head, where it is trained and averaged.

A client of adapter rank r_i < r holds the leading block of each adapter tensor (``rank_block``); the server
zero-pads it back to the global shape (``pad_to``).
"""

from __future__ import annotations

import torch
from torch import nn

State = dict[str, torch.Tensor]
ADAPTER_KINDS = ("lora_A", "lora_B", "lora_R")
HEAD_PREFIX = "head:"
HEAD_MODULE_NAMES = ("classifier", "score")


def state_key(layer: str, kind: str) -> str:
    return f"{layer}.{kind}"


def key_kind(key: str) -> str:
    """``"lora_A"`` of ``"<layer>.lora_A"``; ``"head"`` for a head parameter."""
    return "head" if key.startswith(HEAD_PREFIX) else key.rsplit(".", 1)[1]


def layer_names_of(state: State) -> list[str]:
    """Adapted layer names in the state, in insertion (module) order."""
    names: dict[str, None] = {}
    for key in state:
        if not key.startswith(HEAD_PREFIX):
            names[key.rsplit(".", 1)[0]] = None
    return list(names)


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The classification head's parameters (``classifier`` for BERT-like, ``score`` for Llama-like).

    Looked up on the head modules themselves, not by walking every parameter of the model.
    """
    return {
        f"{head}.{name}": param
        for head in HEAD_MODULE_NAMES
        if isinstance(getattr(model, head, None), nn.Module)
        for name, param in getattr(model, head).named_parameters()
    }


def nbytes(tensors: State) -> int:
    """Bytes of a message as sent: every tensor's data plus its key (UTF-8)."""
    return sum(t.numel() * t.element_size() + len(k.encode()) for k, t in tensors.items())


def rank_shape(kind: str, shape: torch.Size, rank: int) -> tuple[int, ...]:
    """The shape of a rank-``rank`` client's block of an adapter tensor of ``kind`` (A: r×k, B: d×r, R: r×r)."""
    if kind == "lora_A":
        return (rank, shape[1])
    if kind == "lora_B":
        return (shape[0], rank)
    if kind == "lora_R":
        return (rank, rank)
    return tuple(shape)


def rank_block(state: State, rank: int) -> State:
    """``state`` as a rank-``rank`` client holds it: the first ``rank`` rows of every A and columns of every B
    (and the leading block of every R); every other tensor as it is. The truncation HetLoRA and FlexLoRA send."""
    blocks = {"lora_A": (slice(0, rank),), "lora_B": (slice(None), slice(0, rank)), "lora_R": (slice(0, rank), slice(0, rank))}
    return {key: value[blocks[key_kind(key)]].contiguous() if key_kind(key) in blocks else value for key, value in state.items()}


def pad_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero-pad ``tensor`` at the end of each dimension to ``shape`` (a lower-rank client's block in the global tensor)."""
    if tensor.shape == shape:
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return padded
