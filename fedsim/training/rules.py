"""What shapes a client's local steps beyond its data loss, through one small interface of the engine.

A rule is built for one cohort, holding its clients' own inputs (what each kept from earlier rounds, what the server
sent). The engine (``fedsim.training.engine``) calls it three times, with the cohort's trained tensors stacked along a
first, client dimension (key → (K, …)), each client's block at its own shape (``shapes[k][key]``; the rest padding):

- ``begin(start, shapes)``: once, with the stacked tensors the clients start from (copies);
- ``correction(trained, gradients, active)``: every step, with the step's data gradient (clipped and noised under
  DP-SGD: a correction is post-processing and costs no privacy), returns what to add to it (key → (K, …));
- ``finish(k, final, steps)``: once per client, with its trained tensors at its own shape after its ``steps`` steps;
  returns (tensors it sends besides the method's upload, tensors it keeps in the client store).

FedProx (``fedsim.training.fedprox``) and SCAFFOLD (``fedsim.training.scaffold``) are rules; neither touches the engine.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


class LocalRule:
    """The interface; a rule overrides what it needs. By default it adds nothing, sends nothing, keeps nothing."""

    def begin(self, start: State, shapes: list[dict[str, torch.Size]]) -> None:
        pass

    def correction(self, trained: State, gradients: State, active: list[int]) -> State:
        return {}

    def finish(self, k: int, final: State, steps: int) -> tuple[State, State]:
        return {}, {}
