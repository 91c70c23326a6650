"""HetLoRA: clients of different ranks; zero-pad to the largest rank, sparsity-weighted mean, truncate per client.

Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024, arXiv:2401.06432.

Rule, per adapted layer: client i trains A_i (r_i×k) and B_i (d×r_i) at its rank r_i
(``clients.ranks``); the server zero-pads them to the largest rank r (``method.rank``) and averages A
and B separately with the sparsity weights ``p_i = ‖B_i A_i‖_F / Σ_j ‖B_j A_j‖_F`` (a client whose
update is larger counts more; the paper's weights do not use sample counts). A client of rank r_i
then receives the first r_i rows of A and columns of B (truncation): ``downlink``. The head, where
``method.train_head``, is averaged with the usual ``w_i`` (sample counts or uniform), which is what
``RoundResult.weights`` reports; the p_i differ per layer.

Exactness: no, as FedIT: ``Σ p_i B_i A_i ≠ B̄Ā``. ``agg_error`` is measured against
``Σ p_i · scaling · B_i A_i`` with the same sparsity weights, layer by layer.

Messages per client and round, per adapted layer (W0 d×k; plus the head where ``method.train_head``):
up ``r_i·(d+k)``; down ``r_i·(d+k)`` (the leading block of the new A and B). The broadcast itself is
the full-rank ``r·(d+k)``; only the leading block travels.

Where fedsim departs from the paper: no rank self-pruning. The paper lets a client add a penalty
on the norm of its trailing rank components to its local loss and shrink its rank when they fade
(by a decay factor, round by round); that needs a term in the local loss and a rank that persists
per client, which fedsim's trainer does not have. A client's rank here is fixed by ``clients.ranks``.
The norms are taken of ``scaling · B_i A_i`` per layer (the paper writes one ΔW_k; each LoRA module
is aggregated on its own), from r_i×r_i Gram matrices, never the d×k product. If every client's
product is zero (nothing trained), the usual ``w_i`` are used. ``method.rank_aggregation=partitioned``
applies as for the other LoRA methods; the paper's rule is ``zero-pad``, the default.

Scaling of a rank-r_i client (``clients.rank_scaling``, default ``max``): the paper writes a client's update as
``ΔW_k = B_k A_k`` at every rank (its Figure 2 and the sparsity ``‖B_k A_k‖``), with no factor that depends on r_k,
and there is no official code; a rank-independent factor is fedsim's ``max``. ``own`` (alpha/r_i) is what
FlexLoRA's authors' reproduction of HetLoRA does (FederatedScope, branch ``FlexLoRA``, ``heterolora.py`` with
``handle_alpha``: each factor times √(16/r_i) before the mean); under ``own`` fedsim carries the factor in B alone
(``Method.rescaled_kind``), which gives the same client products but other averaged factors.
"""

from collections.abc import Sequence

import torch

from fedsim.adapters.state import HEAD_PREFIX, State, layer_names_of, rank_block, state_key
from fedsim.methods import register
from fedsim.methods.agg_error import client_factors
from fedsim.methods.base import Method, RoundResult, Upload


@register("hetlora", paper="https://arxiv.org/abs/2401.06432", trains="A, B at the client's rank", rule="zero-pad, `‖B_i A_i‖_F`-weighted mean, cut to each client's rank", exact="no (error reported)")
class HetLoRA(Method):
    def averaged_kinds(self, round_idx: int) -> tuple[str, ...]:
        return self.uploaded_kinds(round_idx)  # A and B: zero-padded means (by the sparsity weights); the cut is the downlink's

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        keys = keys_by_layer(uploads[0].tensors)  # every client uploads the same keys
        averaged = self.average(state, uploads, weights, keys.get(HEAD_PREFIX, []))
        sparsity = {}
        for layer in layer_names_of(state):
            sparsity[layer] = self.sparsity_weights(state, uploads, layer) or weights
            averaged.update(self.average(state, uploads, sparsity[layer], keys.get(layer, [])))
        # the error against the sparsity-weighted ideal
        return self.finish(state, {**state, **averaged}, averaged, uploads, weights, layer_weights=sparsity)

    def sparsity_weights(self, state: State, uploads: Sequence[Upload], layer: str) -> list[float] | None:
        """``‖scaling · B_i A_i‖_F`` normalised to sum to one (``‖BA‖² = ⟨BᵀB, AAᵀ⟩``); None if all are zero."""
        if state[state_key(layer, "lora_A")].is_meta:  # counting bytes (analysis.comm): the weights do not change a size
            return None
        norms = []
        for upload in uploads:
            B, _, A = client_factors(state, upload, layer)
            norms.append(self.scaling * torch.sum((B.T @ B) * (A @ A.T)).clamp_min(0).sqrt().item())
        total = sum(norms)
        return [n / total for n in norms] if total > 0 else None

    def downlink(self, message: State, rank: int) -> State:
        return rank_block(message, rank)


def keys_by_layer(tensors: State) -> dict[str, list[str]]:
    """The keys of ``tensors`` grouped by adapted layer (``"<layer>"`` of ``"<layer>.lora_A"``); the head's under ``HEAD_PREFIX``."""
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(HEAD_PREFIX if key.startswith(HEAD_PREFIX) else key.rsplit(".", 1)[0], []).append(key)
    return groups
