"""FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, arXiv:1812.06127).

Each client minimises its loss plus μ/2·‖θ − θ_start‖² over the tensors it trains, θ_start being what it started the
round from (the global state, with a personalised client's own kept tensors over it): the gradient μ(θ − θ_start) is
added to the data gradient at every step. ``train.prox_mu``; μ = 0 builds no rule, so a run is unchanged bit for bit.
Under DP-SGD the term is added after the noise: it reads no record, so it costs no privacy.
"""

from __future__ import annotations

from fedsim.training.rules import LocalRule, State


class Proximal(LocalRule):
    def __init__(self, mu: float):
        self.mu = mu
        self.start: State = {}

    def begin(self, start: State, shapes) -> None:
        self.start = start

    def correction(self, trained: State, gradients: State, active: list[int]) -> State:
        return {key: self.mu * (tensor.detach() - self.start[key]) for key, tensor in trained.items()}
