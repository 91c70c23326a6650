"""Pre-summed uploads (``runtime.presum``): each worker sends the weighted sum of its clients' uploads, not each upload.

For a method whose aggregate is the weighted mean of what clients upload (``Method.aggregates_by_mean``: Fed-SB's R,
FedIT's A and B, FFA's B, RoLoRA's factor, …), the mean needs only per-worker sums: ``Σ_i n_i t_i`` and ``Σ_i n_i``
(or ``Σ_i t_i`` and the count, for uniform weights), with each lower-rank client's block zero-padded to the full
shape, and for ``clients.rank_aggregation=partitioned`` the weight that trained each entry. The aggregator adds the
workers' sums (in float64, in worker order), divides, and runs the method's own aggregate on the mean as one upload:
the object store then carries workers × state, not clients × state, which is what a 7B model's FedIT round needs
(336 MB a client at rank 32). Bytes on the wire are still counted per client, as each client would send them.

The aggregation error needs more than the mean where clients train both A and B (FedIT: the ideal
``Σ w_i B_i A_i`` is not a function of B̄ and Ā). There each worker also sends a sketch: ``Σ_i n_i s B_i (A_i G)``
for a shared Gaussian G (k × ``PROBES``, drawn from the run seed, the round and the layer), and the error is
estimated as ``√(Σ_j ‖(ideal − new) g_j‖² / Σ_j ‖ideal g_j‖²)``, each ``‖X g_j‖²`` an unbiased estimate of ‖X‖²_F,
with its standard error over the probes (delta method). Where clients upload one factor only (Fed-SB, FFA) the
mean gives the ideal exactly, and so the error.

Not bit-identical across worker counts: the float64 sums associate differently (equal to the unsummed path to
float64 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedsim.adapters.state import HEAD_PREFIX, State, pad_to, state_key
from fedsim.methods.agg_error import client_factors
from fedsim.methods.base import Method, RoundResult, Upload
from fedsim.seeds import torch_generator

PROBES = 16  # columns of the error sketch's Gaussian test matrix


@dataclass
class PartialSum:
    """One worker's share of a round's aggregate: float64 sums over its finite uploads, in client-id order."""

    clients: list[int]
    weight: float  # Σ n_i (samples weights) or the number of clients (uniform)
    sums: State  # key -> Σ weight_i · (zero-padded) t_i
    coverage: State = field(default_factory=dict)  # key -> Σ weight_i · [entry trained] (partitioned rank aggregation)
    sketches: State = field(default_factory=dict)  # layer -> Σ weight_i · s B_i (A_i G), d × PROBES


def client_weight(method: Method, upload: Upload) -> float:
    """A client's unnormalised weight: its samples, or 1 (``clients.weights=uniform``)."""
    return 1.0 if method.clients.weights == "uniform" else float(upload.num_samples)


def partial_sum(method: Method, state: State, uploads: Sequence[Upload], round_idx: int, seed: int) -> PartialSum:
    """The weighted sums of these uploads (a worker's finite uploads of the round), with the error sketch where
    clients train both A and B."""
    uploads = sorted(uploads, key=lambda u: u.client_id)
    part = PartialSum([u.client_id for u in uploads], 0.0, {})
    for upload in uploads:
        weight = client_weight(method, upload)
        part.weight += weight
        for key, tensor in upload.tensors.items():
            shape = state[key].shape if key in state else tensor.shape
            add(part.sums, key, weight * pad_to(tensor.to(torch.float64), shape))
            if method.clients.rank_aggregation == "partitioned" and not key.startswith(HEAD_PREFIX):
                add(part.coverage, key, weight * pad_to(torch.ones(tensor.shape, dtype=torch.float64), shape))
        for layer in sketched_layers(upload):
            B, R, A = client_factors(state, upload, layer)
            probe = test_matrix(state, layer, round_idx, seed)
            right = A @ probe if R is None else R @ (A @ probe)
            add(part.sketches, layer, weight * method.scaling * (B @ right))
    return part


def combine(method: Method, state: State, parts: Sequence[PartialSum], round_idx: int, seed: int) -> tuple[RoundResult, float]:
    """The round's aggregate from the workers' partial sums: the method's own aggregate run on the mean as one upload,
    and the aggregation error (exact, or estimated from the sketches); returns (result, the error's standard error:
    0 where exact)."""
    parts = [p for p in parts if p.clients]
    total = sum(p.weight for p in parts)
    sums: State = {}
    coverage: State = {}
    sketches: State = {}
    for part in parts:  # worker order
        for target, source in ((sums, part.sums), (coverage, part.coverage), (sketches, part.sketches)):
            for key, value in source.items():
                add(target, key, value)
    mean, zero_padded = {}, {}
    for key, value in sums.items():
        zero_padded[key] = value / total
        if key in coverage and not bool((coverage[key] == total).all()):  # partitioned, and some client trained a block
            # each entry by the weight that trained it; untrained entries keep their value
            mean[key] = torch.where(coverage[key] > 0, value / coverage[key].clamp_min(1e-300), state[key].to(torch.float64))
        else:
            mean[key] = value / total
        mean[key] = mean[key].to(state[key].dtype if key in state else next(iter(parts[0].sums.values())).dtype)
    first = min(c for p in parts for c in p.clients)
    result = method.aggregate(state, [Upload(first, 1, mean)], round_idx)
    result.weights = {}
    if not sketches:
        if coverage:  # the ideal is the zero-padded mean of the clients' products, not the partitioned one kept
            measured = method.finish(state, result.state, result.broadcast, [Upload(first, 1, zero_padded)], [1.0])
            result.agg_error, result.layer_errors = measured.agg_error, measured.layer_errors
        return result, 0.0
    errors, norms = [], []
    for layer, sketch in sketches.items():
        ideal = sketch / total
        B, R, A = (value.to(torch.float64) if value is not None else None for value in
                   (result.state[state_key(layer, "lora_B")], result.state.get(state_key(layer, "lora_R")),
                    result.state[state_key(layer, "lora_A")]))
        probe = test_matrix(state, layer, round_idx, seed)
        new = method.scaling * (B @ ((A @ probe) if R is None else R @ (A @ probe)))
        errors.append(((ideal - new) ** 2).sum(0))
        norms.append((ideal**2).sum(0))
    error_j, norm_j = torch.stack(errors).sum(0), torch.stack(norms).sum(0)  # per probe, over the layers
    result.agg_error, standard_error = ratio_estimate(error_j, norm_j)
    result.layer_errors = {}
    return result, standard_error


def ratio_estimate(errors: torch.Tensor, norms: torch.Tensor) -> tuple[float, float]:
    """``√(mean e_j / mean n_j)`` and its standard error over the probes j (the delta method)."""
    e_mean, n_mean = errors.mean().item(), norms.mean().item()
    if n_mean <= 0:
        return 0.0, 0.0
    ratio = e_mean / n_mean
    residual = errors - ratio * norms
    se_ratio = residual.std(unbiased=True).item() / math.sqrt(len(errors)) / n_mean if len(errors) > 1 else float("inf")
    return math.sqrt(ratio), (se_ratio / (2 * math.sqrt(ratio)) if ratio > 0 else math.sqrt(se_ratio))


def sketched_layers(upload: Upload) -> list[str]:
    """The layers where this client uploaded both A and B (the ideal is then not a function of the means)."""
    kinds: dict[str, set[str]] = {}
    for key in upload.tensors:
        if not key.startswith(HEAD_PREFIX):
            layer, _, kind = key.rpartition(".")
            kinds.setdefault(layer, set()).add(kind)
    return sorted(layer for layer, found in kinds.items() if {"lora_A", "lora_B"} <= found)


def test_matrix(state: State, layer: str, round_idx: int, seed: int) -> torch.Tensor:
    """The Gaussian k × PROBES test matrix of a layer and round: the same on every worker and the aggregator."""
    k = state[state_key(layer, "lora_A")].shape[1]
    return torch.randn(k, PROBES, generator=torch_generator(seed, "error-sketch", round_idx, layer), dtype=torch.float64)


def add(target: State, key: str, value: torch.Tensor) -> None:
    target[key] = value.clone() if key not in target else target[key] + value
