"""The aggregation error, ``‖Σ w_i s B_i R_i A_i − s B R A‖_F / ‖Σ w_i s B_i R_i A_i‖_F``, from the factors alone.

A sum of low-rank products is held as terms ``(coef, B, R, A)`` (R None: ``coef · B A``), float64. With the terms'
factors stacked (``L R = Σ_t T_t``, n columns) its squared norm is ``Σ (LᵀL) ∘ (R Rᵀ)``: O((d+k)·n²), never a d×k
matrix per client. The ideal (what exact aggregation must produce) is ``ideal_terms``; the new adapter product one
more (negated) term; where the two share a factor (Fed-SB, FFA) the difference is taken inside it, so an exact
method's error is measured to float64 precision, not lost in the cancellation of two equal norms.

The arithmetic serves the methods that need the ideal itself too: FRA-LoRA's SVD of the stacked factors
(``stacked``), LoRA-FAIR's ‖ΔW‖ (``squared_norm``), FedEx-LoRA's and FLoRA's d×k fold (``ideal_update``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fedsim.adapters.layers import leading_block
from fedsim.adapters.state import ADAPTER_KINDS, State, layer_names_of, pad_to, rank_shape, state_key

if TYPE_CHECKING:
    from fedsim.methods.base import Upload

Term = tuple[float, torch.Tensor, "torch.Tensor | None", torch.Tensor]  # coef · B R A (R None: coef · B A), float64


def weighted_sum64(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ w_i t_i`` in float64, in the order given, on the inputs' device."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights):
        total += weight * tensor.to(torch.float64)
    return total


def client_rank(upload: Upload, layer: str) -> int | None:
    """A client's rank, read off the shapes of what it uploaded for ``layer``; None if it uploaded no adapter of it."""
    tensors = upload.tensors
    if state_key(layer, "lora_R") in tensors:
        return tensors[state_key(layer, "lora_R")].shape[0]
    if state_key(layer, "lora_A") in tensors:
        return tensors[state_key(layer, "lora_A")].shape[0]
    if state_key(layer, "lora_B") in tensors:
        return tensors[state_key(layer, "lora_B")].shape[1]
    return None


def client_factors(state: State, upload: Upload, layer: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(B_i, R_i, A_i)`` of one client in float64: its uploaded tensors over the global ones, at its rank."""
    rank = client_rank(upload, layer)

    def get(kind: str) -> torch.Tensor | None:
        key = state_key(layer, kind)
        tensor = upload.tensors.get(key, state.get(key))
        if tensor is None:
            return None
        block = tensor if rank is None else leading_block(tensor, rank_shape(kind, tensor.shape, rank))
        return block.to(torch.float64)

    return get("lora_B"), get("lora_R"), get("lora_A")


def ideal_terms(state: State, uploads: Sequence[Upload], weights: Sequence[float], layer: str, scaling: float) -> list[Term]:
    """``Σ w_i · scaling · B_i R_i A_i`` (what exact aggregation must produce) as terms ``(coef, B, R, A)``, float64.

    Where the clients upload one kind and share the others (Fed-SB: R; FFA: B), the weighted sum is
    taken inside, one term a layer; a lower-rank client's block is zero-padded to the full shape,
    which leaves its product unchanged. Otherwise one term a client. No d×k matrix is formed.
    """
    uploaded = {kind for kind in ADAPTER_KINDS if state_key(layer, kind) in uploads[0].tensors}
    shared = {kind: state[state_key(layer, kind)].to(torch.float64)
              for kind in ADAPTER_KINDS if kind not in uploaded and state_key(layer, kind) in state}

    def summed(kind: str) -> torch.Tensor:
        key = state_key(layer, kind)
        return weighted_sum64([pad_to(u.tensors[key], state[key].shape) for u in uploads], weights)

    if uploaded == {"lora_R"}:
        return [(scaling, shared["lora_B"], summed("lora_R"), shared["lora_A"])]
    if uploaded == {"lora_B"} and "lora_R" not in shared:
        return [(scaling, summed("lora_B"), None, shared["lora_A"])]
    if uploaded == {"lora_A"} and "lora_R" not in shared:
        return [(scaling, shared["lora_B"], None, summed("lora_A"))]
    return [(weight * scaling, *client_factors(state, upload, layer)) for upload, weight in zip(uploads, weights)]


def ideal_update(state: State, uploads: Sequence[Upload], weights: Sequence[float], layer: str, scaling: float) -> torch.Tensor:
    """``Σ w_i · scaling · B_i R_i A_i`` as one d×k matrix (float64), for a method that folds it into W0."""
    if state[state_key(layer, "lora_A")].is_meta:  # counting bytes (analysis.comm): the shape is all there is
        d, k = state[state_key(layer, "lora_B")].shape[0], state[state_key(layer, "lora_A")].shape[1]
        return torch.empty(d, k, dtype=torch.float64, device="meta")
    return dense(ideal_terms(state, uploads, weights, layer, scaling))


def adapter_term(state: State, layer: str, scaling: float) -> Term:
    """The adapter product ``scaling · B R A`` of a state, as a term (float64)."""
    R = state.get(state_key(layer, "lora_R"))
    return (scaling, state[state_key(layer, "lora_B")].to(torch.float64), None if R is None else R.to(torch.float64),
            state[state_key(layer, "lora_A")].to(torch.float64))


def layer_error(old_state: State, new_state: State, uploads: Sequence[Upload], weights: Sequence[float], layer: str,
                scaling: float) -> tuple[float, float]:
    """``(‖Σ w_i s B_i R_i A_i − s B R A‖²_F, ‖Σ w_i s B_i R_i A_i‖²_F)`` from the factors alone, exactly.

    For a layer whose W0 the round left alone: a method that folds into W0 measures that layer itself
    (``aggregation_error``'s ``layer_terms``).
    """
    delta_key = state_key(layer, "base_delta")
    if new_state.get(delta_key) is not old_state.get(delta_key):
        raise ValueError(f"the round folded into W0 in layer {layer}: the method must measure that layer's error itself "
                         "(layer_terms)")
    ideal = ideal_terms(old_state, uploads, weights, layer, scaling)
    terms = difference(ideal, adapter_term(new_state, layer, scaling))
    if len(terms) == len(ideal) + 1:  # nothing merged: the ideal's norm is a block of the same Gram matrices
        return squared_norms(terms, len(ideal))
    return squared_norm(terms), squared_norm(ideal)


def aggregation_error(old_state: State, new_state: State, uploads: Sequence[Upload], weights: Sequence[float], scaling: float,
                      layer_terms: dict[str, tuple[float, float]] | None = None,
                      layer_weights: dict[str, Sequence[float]] | None = None) -> tuple[float, dict[str, float]]:
    """``(agg_error over all layers, each layer's)``: the relative error of ``new_state``'s adapter product against the ideal.

    ``layer_terms`` (``{layer: (squared error, squared ideal norm)}``) come from a method that folds into W0 and so
    holds the d×k fold already (FedEx-LoRA, FLoRA); ``layer_weights``, a layer's ideal weights where they are not the
    clients' ``weights`` (HetLoRA's sparsity weights). Every other layer is measured from the factors (``layer_error``).
    """
    squared_error = squared_ideal = 0.0
    layer_errors: dict[str, float] = {}
    for layer in layer_names_of(new_state):
        if layer_terms is not None and layer in layer_terms:
            error2, norm2 = layer_terms[layer]
        else:
            ideal_weights = (layer_weights or {}).get(layer, weights)
            error2, norm2 = layer_error(old_state, new_state, uploads, ideal_weights, layer, scaling)
        error2 = max(0.0, error2)  # a Gram trace of an error at rounding level can come out a hair below zero
        layer_errors[layer] = math.sqrt(error2 / norm2) if norm2 > 0 else 0.0
        squared_error += error2
        squared_ideal += norm2
    return (math.sqrt(squared_error / squared_ideal) if squared_ideal > 0 else 0.0), layer_errors


def stacked(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L R = Σ_t coef_t B_t R_t A_t``: the left factors side by side (d×n), the right ones stacked (n×k)."""
    left = torch.cat([coef * (B if R is None else B @ R) for coef, B, R, _ in terms], dim=1)
    right = torch.cat([A for _, _, _, A in terms], dim=0)
    return left, right


def dense(terms: Sequence[Term]) -> torch.Tensor:
    """``Σ_t coef_t B_t R_t A_t`` as one d×k matrix: one product of the stacked factors."""
    left, right = stacked(terms)
    return left @ right


def squared_norm(terms: Sequence[Term]) -> float:
    """``‖Σ_t coef_t B_t R_t A_t‖²_F`` exactly (see ``squared_norms``)."""
    return squared_norms(terms, len(terms))[0]


def squared_norms(terms: Sequence[Term], first: int) -> tuple[float, float]:
    """``(‖Σ_t T_t‖²_F, ‖Σ_{t<first} T_t‖²_F)`` exactly, with ``T_t = coef_t B_t R_t A_t``.

    With the factors stacked (``L R = Σ T_t``, n columns): ``Σ (LᵀL) ∘ (R Rᵀ)``, and the second from the
    leading block of the same two n×n Gram matrices, in O((d+k)·n²); or from the d×k products where those
    are cheaper (n > dk/(d+k): many clients of a thin layer), in O(d·k·n).
    """
    left, right = stacked(terms)
    split = sum(A.shape[0] for _, _, _, A in terms[:first])
    (d, n), k = left.shape, right.shape[1]
    if (d + k) * n > d * k:
        head = left[:, :split] @ right[:split]
        total = head + left[:, split:] @ right[split:] if split < n else head
        return float(torch.linalg.matrix_norm(total) ** 2), float(torch.linalg.matrix_norm(head) ** 2)
    products = (left.mT @ left) * (right @ right.mT)
    return float(products.sum()), float(products[:split, :split].sum())


def difference(ideal: Sequence[Term], new: Term) -> list[Term]:
    """The terms of ``Σ ideal − new``; one ideal term that shares B and A (or A, or B) with ``new`` is merged with it."""
    coef, B, R, A = new
    if len(ideal) == 1:
        c0, B0, R0, A0 = ideal[0]
        same_B, same_A = _same(B0, B), _same(A0, A)
        if same_B and same_A:
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            middle = c0 * (eye if R0 is None else R0) - coef * (eye if R is None else R)
            return [(1.0, B0, middle, A0)]
        if same_A:
            left = c0 * (B0 if R0 is None else B0 @ R0) - coef * (B if R is None else B @ R)
            return [(1.0, left, None, A0)]
        if same_B:
            right = c0 * (A0 if R0 is None else R0 @ A0) - coef * (A if R is None else R @ A)
            return [(1.0, B0, None, right)]
    return [*ideal, (-coef, B, R, A)]


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and bool(torch.equal(x, y))
