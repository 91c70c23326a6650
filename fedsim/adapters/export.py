"""Export a global state as a standard PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Stock ``PeftModel.from_pretrained(base_model, path)`` loads it and reproduces fedsim's model:
- LoRA: ``lora_A = A``, ``lora_B = scaling·B`` (saved with ``lora_alpha = r``, scaling 1);
- LoRA-SB: ``lora_A = A``, ``lora_B = B·R``;
- methods that fold updates into W0 (FedEx-LoRA, FLoRA): the layer's whole update
  ``base_delta + scaling·B A`` is re-factored exactly by SVD at its numerical rank, so the adapter
  is of higher rank than the method's r (it has to be: that is the point of those methods);
- the classification head, where trained, as PEFT's ``modules_to_save``.
PEFT writes the files; we only choose the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedsim.adapters.layers import adapted_layers, adapter_product
from fedsim.adapters.state import HEAD_PREFIX, State, head_parameters, layer_names_of, state_key


def lora_factors(state: State, scaling: float, tolerance: float = 1e-7) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(lora_B, lora_A)`` in float64 whose product is the layer's whole update."""
    factors = {}
    for layer in layer_names_of(state):
        B = state[state_key(layer, "lora_B")].to(torch.float64)
        A = state[state_key(layer, "lora_A")].to(torch.float64)
        R = state.get(state_key(layer, "lora_R"))
        delta = state.get(state_key(layer, "base_delta"))
        if delta is None:
            factors[layer] = ((B if R is None else B @ R.to(torch.float64)) * scaling, A)
            continue
        update = adapter_product(B, None if R is None else R.to(torch.float64), A, scaling) + delta.to(torch.float64)
        U, S, Vh = torch.linalg.svd(update, full_matrices=False)
        keep = max(1, int((S > tolerance * S[0]).sum())) if S[0] > 0 else 1
        factors[layer] = (U[:, :keep] * S[:keep], Vh[:keep])
    return factors


def export_peft(base_model: nn.Module, state: State, scaling: float, path: str | Path) -> Path:
    """Write ``state`` as a PEFT LoRA adapter for ``base_model`` (an un-adapted model, modified in place)."""
    from peft import LoraConfig, get_peft_model

    factors = lora_factors(state, scaling)
    rank = max(A.shape[0] for _, A in factors.values())
    head_names = sorted({key[len(HEAD_PREFIX):].split(".")[0] for key in state if key.startswith(HEAD_PREFIX)})
    heads = head_parameters(base_model)
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(HEAD_PREFIX):
                heads[key[len(HEAD_PREFIX):]].copy_(value)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(factors),
        modules_to_save=head_names or None,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base_model, config)
    layers = adapted_layers(peft_model)
    with torch.no_grad():
        for layer, (B, A) in factors.items():
            pad = rank - A.shape[0]
            lora_B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            lora_A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
            layers[layer].lora_B.weight.copy_(lora_B)
            layers[layer].lora_A.weight.copy_(lora_A)
    path = Path(path)
    peft_model.save_pretrained(str(path))
    return path
