"""SCAFFOLD's control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, arXiv:1910.06378), on each client's trained tensors.

Client i corrects every step's gradient g by c − c_i (c the server's control variate, c_i its own), and ends the round
with c_i⁺, the mean of its own (uncorrected) gradients over its K steps. That is the paper's option II,
c_i⁺ = c_i − c + (x − y_i)/(K η), under the SGD the paper assumes (there (x − y_i)/(K η) is the mean of the corrected
gradients); fedsim keeps the mean-of-gradients form because it stays in gradient units under AdamW, where
(x − y_i)/(K η) would not. The client sends Δc_i = c_i⁺ − c_i and keeps c_i⁺ in the client store; the server sets
c ← c + Σ_i Δc_i / N over the N clients of the run (``server_update``). Under DP-SGD the gradients are the privatised
ones: c_i is post-processing and costs no privacy.

Keys: ``control:<state key>``, at the client's own shape (its rank's block) in its upload and store, at the global shape
in the server's c. A tensor with no control variate yet (round 0, or first trained later) has c = c_i = 0.
"""

from __future__ import annotations

import torch

from fedsim.adapters.layers import leading_block
from fedsim.adapters.state import pad_to
from fedsim.training.rules import LocalRule, State

PREFIX = "control:"


def controls(tensors: State) -> State:
    """The control variates among ``tensors``, keyed by the state key they belong to."""
    return {key[len(PREFIX):]: value for key, value in tensors.items() if key.startswith(PREFIX)}


def without_controls(tensors: State) -> State:
    return {key: value for key, value in tensors.items() if not key.startswith(PREFIX)}


class ControlVariates(LocalRule):
    """The rule for one cohort: ``server`` is c (state key → tensor at the global shape), ``own[k]`` client k's c_i."""

    def __init__(self, server: State, own: list[State]):
        self.server, self.own = server, own
        self.shift: State = {}  # key → (K, …): c − c_i per client, zero-padded
        self.gradient_sums: State = {}

    def begin(self, start: State, shapes: list[dict[str, torch.Size]]) -> None:
        for key, stacked in start.items():
            rows = []
            for k in range(len(shapes)):
                shape = shapes[k][key]
                c = leading_block(self.server[key], shape) if key in self.server else torch.zeros(shape)
                c_i = self.own[k].get(key, torch.zeros(shape))
                rows.append(pad_to((c.to(stacked) - c_i.to(stacked)), stacked.shape[1:]))
            self.shift[key] = torch.stack(rows)
            self.gradient_sums[key] = torch.zeros_like(stacked)

    def correction(self, trained: State, gradients: State, active: list[int]) -> State:
        for key, total in self.gradient_sums.items():
            total += gradients[key]  # a client past its steps has no rows: its gradient is zero
        return self.shift

    def finish(self, k: int, final: State, steps: int) -> tuple[State, State]:
        sent, kept = {}, {}
        for key, value in final.items():
            mean = leading_block(self.gradient_sums[key][k], value.shape) / max(1, steps)
            new = mean.detach().to("cpu", copy=True)
            old = self.own[k].get(key)
            sent[PREFIX + key] = new - old.to(new) if old is not None else new.clone()
            kept[PREFIX + key] = new
        return sent, kept


def server_update(server: State, uploads: list[State], num_clients: int, state: State) -> State:
    """c ← c + Σ_i Δc_i / N (zero-padded to the global ``state``'s shape; N: the run's clients), in float64, cast back."""
    updated = dict(server)
    deltas: dict[str, list[torch.Tensor]] = {}
    for upload in uploads:
        for key, delta in controls(upload).items():
            deltas.setdefault(key, []).append(delta)
    for key, parts in deltas.items():
        shape = state[key].shape
        total = sum(pad_to(p.to(torch.float64), shape) for p in parts) / num_clients
        base = server[key].to(torch.float64) if key in server else torch.zeros(shape, dtype=torch.float64)
        updated[key] = (base + total).to(parts[0].dtype)
    return updated


class ServerControl:
    """The server's c, with the aggregator: ``update`` after a round's uploads; checkpointed beside the state."""

    def __init__(self):
        self.c: State = {}

    def update(self, uploads: list[State], num_clients: int, state: State) -> None:
        self.c = server_update(self.c, uploads, num_clients, state)

    def state_dict(self) -> State:
        return dict(self.c)

    def load_state_dict(self, saved: State) -> None:
        self.c = dict(saved)
