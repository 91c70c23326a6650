"""One view over the adapted layers of a model, whichever injector made them (PEFT LoRA or LoRA-SB).

The methods read and write adapter tensors by *layer name* (the module path in the base model, e.g.
``bert.encoder.layer.0.attention.self.query``) and *kind* (``lora_A``, ``lora_B``, ``lora_R``,
``base``), never by the injector's own parameter names. This is the one place that knows both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsim.adapters.lora_sb import LoraSBLinear

PEFT_PREFIX = "base_model.model."


@dataclass
class AdaptedLayer:
    """The modules of one adapted linear layer: ``W x + scaling · B [R] A x``."""

    name: str
    base: nn.Linear
    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_R: nn.Linear | None
    scaling: float

    def module(self, kind: str) -> nn.Linear:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_R": self.lora_R, "base": self.base}[kind]

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``scaling · B [R] A`` (d×k), computed in ``dtype``, over the rank in use."""
        R = None if self.lora_R is None else self.lora_R.weight.detach().to(dtype)
        rank = self.lora_A.weight.shape[0] if R is None else R.shape[0]
        B = self.lora_B.weight.detach()[:, :rank].to(dtype)
        return adapter_product(B, R, self.lora_A.weight.detach()[:rank].to(dtype), self.scaling)


def adapter_product(B: torch.Tensor, R: torch.Tensor | None, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling · B R A`` (or ``scaling · B A`` without R), associating the cheap way."""
    inner = A if R is None else R @ A
    return (B @ inner) * scaling


def set_rank(model: nn.Module, rank: int, scaling: float | None = None) -> None:
    """Let every adapted layer use only its leading ``rank`` components (HetLoRA-style truncation), and multiply its
    product by ``scaling`` where given (the client's, ``Method.client_scaling``).

    LoRA-SB layers swap in an r_i×r_i R; PEFT LoRA layers swap in r_i-sized A and B modules. The
    values are set afterwards from the global state (``Method.load_state``), so nothing is lost.
    """
    for _, module in adapted_modules(model):
        if isinstance(module, LoraSBLinear):
            module.set_rank(rank)
            if scaling is not None:
                module.scaling = scaling
        else:
            for adapter in module.lora_A:
                if scaling is not None:
                    module.scaling[adapter] = scaling
                A, B = module.lora_A[adapter], module.lora_B[adapter]
                if A.out_features != rank:
                    factory = {"dtype": A.weight.dtype, "device": A.weight.device}
                    module.lora_A[adapter] = nn.Linear(A.in_features, rank, bias=False, **factory)
                    module.lora_B[adapter] = nn.Linear(rank, B.out_features, bias=False, **factory)


def leading_block(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading ``shape`` block of ``tensor`` (the components a lower-rank client uses)."""
    return tensor[tuple(slice(0, n) for n in shape)]


def strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adapted modules of ``model`` (LoRA-SB or PEFT LoRA layers) with their base-model names.

    Found by one walk over the model, then remembered on it: a worker swaps adapter values for
    every client, and walking a large model's modules each time would cost more than the swap.
    """
    cached = model.__dict__.get("_fedsim_adapted_modules")
    if cached is None:
        cached = [(strip_peft_prefix(name), module) for name, module in model.named_modules()
                  if isinstance(module, LoraSBLinear) or _is_peft_lora_linear(module)]
        if cached:  # nothing is remembered before the adapters are injected
            model.__dict__["_fedsim_adapted_modules"] = cached
    return cached


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Every adapted layer of ``model``, keyed by its name in the base model, in module order."""
    layers: dict[str, AdaptedLayer] = {}
    for name, module in adapted_modules(model):
        if isinstance(module, LoraSBLinear):
            layers[name] = AdaptedLayer(name, module.base_layer, module.lora_A, module.lora_B, module.lora_R, module.scaling)
        else:
            adapter = module.active_adapters[0]
            layers[name] = AdaptedLayer(name, module.get_base_layer(), module.lora_A[adapter], module.lora_B[adapter],
                                        None, float(module.scaling[adapter]))
    return layers


def _is_peft_lora_linear(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), nn.Linear)
