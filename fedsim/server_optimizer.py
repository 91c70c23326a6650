"""Server optimizers: the change of each averaged tensor in a round is a pseudo-gradient the server steps on.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
arXiv:2003.00295 (https://arxiv.org/abs/2003.00295), Algorithm 2 (FedAdam, FedYogi) and its FedAvgM.

For every key the method averaged this round (``Method.averaged_kinds``: Fed-SB's R, FedIT's A and B, FFA's B, …),
with x the previous global tensor and x̄ the method's aggregate, Δ = x̄ − x, and ``server.optimizer`` sets:

- ``avg``:  x ← x + η Δ. With η = 1 that is x̄ itself, and the aggregate is returned as it is: bit for bit the run
  without a server optimizer (the aggregator does not even call ``step`` then: ``is_identity``).
- ``avgm``: m ← β m + Δ, x ← x + η m (β = ``server.momentum``).
- ``adam``: m ← β₁ m + (1 − β₁) Δ, v ← β₂ v + (1 − β₂) Δ², x ← x + η m / (√v + τ).
- ``yogi``: m as adam, v ← v − (1 − β₂) Δ² sign(v − Δ²), x as adam.

(η ``server.lr``, [β₁, β₂] ``server.betas``, τ ``server.tau``; Δ², √ and the division elementwise.)

Initialisation and bias correction, as the paper's Algorithm 2 prints them: m₋₁ = 0 and v₋₁ = τ² (the algorithm asks
v₋₁ ≥ τ²; τ² is the least), no bias correction. Flower differs (``flwr.server.strategy.fedadam``, ``fedyogi``,
``fedavgm``): its v starts at 0, and its FedAdam multiplies η by √(1 − β₂^(t+1)) / (1 − β₁^(t+1)) (t the 1-based
round) while its FedYogi does not; its FedAvgM is ours (m starts at the first Δ, which is β·0 + Δ). fedsim keeps the
paper's form, the only published definition; at β₁ = 0.9, β₂ = 0.99 the two start alike (adam's first step is about η
an entry where |Δ| ≫ τ, (1 − β₁)/√(1 − β₂) = 1; Flower's FedAdam's is 0.74 η). Defaults: β₁ = 0.9, β₂ = 0.99, the paper's (and Flower's); τ = 1e-3, which the
paper tunes on a grid (Flower's FedYogi default); the paper tunes η per task, and ``server.lr`` defaults to 1 only
because that makes ``avg`` FedAvg: adam and yogi move each entry by about η a round whatever Δ's size, so they want a
much smaller one.

Arithmetic in float64, cast back to the tensor's dtype: Δ is a difference of two close numbers, which bfloat16 or
float16 would mostly round away, and v holds squares of it. m and v are kept in float64 (2 × 8 bytes an averaged
entry, on the CPU): a resumed run reloads them exactly (``state_dict``), so it continues bit for bit. State is per key:
a key no round has stepped yet (RoLoRA's A in round 0) starts from m₋₁, v₋₁ when it is first stepped.

Pure torch; nothing here imports Ray. The aggregator (``fedsim.runtime.aggregator``) owns one and checkpoints it.
"""

from __future__ import annotations

import dataclasses

import torch

from fedsim.errors import UsageError

State = dict[str, torch.Tensor]
SERVER_OPTIMIZERS = ("avg", "avgm", "adam", "yogi")


class ServerOptimizer:
    """One server optimizer and its per-key state (m for avgm; m and v for adam and yogi), float64."""

    def __init__(self, name: str = "avg", lr: float = 1.0, momentum: float = 0.9, betas=(0.9, 0.99), tau: float = 1e-3):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; valid: {', '.join(SERVER_OPTIMIZERS)}")
        self.name, self.lr, self.momentum, self.tau = name, float(lr), float(momentum), float(tau)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.m: State = {}  # key -> first moment (avgm: the momentum buffer)
        self.v: State = {}  # key -> second moment (adam, yogi)

    @classmethod
    def from_config(cls, server) -> "ServerOptimizer":
        """From the ``server`` section (``fedsim.config.ServerConfig``)."""
        return cls(server.optimizer, server.lr, server.momentum, server.betas, server.tau)

    @property
    def is_identity(self) -> bool:
        """``avg`` at η = 1: the new global tensors are the method's aggregate itself."""
        return self.name == "avg" and self.lr == 1.0

    def step(self, previous: State, aggregate: State) -> State:
        """The new global value of each key of ``aggregate`` (the method's averaged tensors), given its ``previous``
        global value; updates m and v. Each result in its aggregate's dtype, on its device."""
        stepped: State = {}
        for key, mean in aggregate.items():
            if self.is_identity:
                stepped[key] = mean
                continue
            if previous[key].shape != mean.shape:
                raise ValueError(f"server optimizer: {key} is {tuple(mean.shape)} after aggregation, {tuple(previous[key].shape)} before")
            x = previous[key].to(torch.float64)
            delta = mean.to(torch.float64) - x  # the pseudo-gradient
            stepped[key] = (x + self.lr * self.direction(key, delta)).to(mean.dtype)
        return stepped

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """What η multiplies for ``key`` this round (Δ, m, or m / (√v + τ)), after updating its m and v."""
        if self.name == "avg":
            return delta
        m = self.m.get(key, torch.zeros_like(delta))
        if self.name == "avgm":
            self.m[key] = self.momentum * m + delta
            return self.m[key]
        self.m[key] = self.beta1 * m + (1 - self.beta1) * delta
        v = self.v.get(key, torch.full_like(delta, self.tau**2))  # v₋₁ = τ²
        squared = delta * delta
        if self.name == "adam":
            self.v[key] = self.beta2 * v + (1 - self.beta2) * squared
        else:  # yogi
            self.v[key] = v - (1 - self.beta2) * squared * torch.sign(v - squared)
        return self.m[key] / (self.v[key].sqrt() + self.tau)

    def state_dict(self) -> State:
        """m and v as flat named tensors, ``"m:<key>"`` and ``"v:<key>"`` (what the checkpoint saves)."""
        return {**{f"m:{key}": value for key, value in self.m.items()}, **{f"v:{key}": value for key, value in self.v.items()}}

    def load_state_dict(self, tensors: State) -> None:
        """Restore m and v from ``state_dict``'s tensors (those this optimizer keeps: a run resumed under ``avg`` drops them)."""
        kept = {"avg": "", "avgm": "m", "adam": "mv", "yogi": "mv"}[self.name]
        self.m = {name[2:]: value.to(torch.float64) for name, value in tensors.items() if name.startswith("m:") and "m" in kept}
        self.v = {name[2:]: value.to(torch.float64) for name, value in tensors.items() if name.startswith("v:") and "v" in kept}


def check_server_optimizer(method, server, rounds: int) -> None:
    """Refuse in one line (``UsageError``) a server step other than the identity for a method whose aggregate is not a
    weighted mean of the clients' trained tensors in some round of ``range(rounds)`` (``Method.averaged_kinds`` None:
    an SVD, a fold into W0, a correction — there is no pseudo-gradient to step on)."""
    if ServerOptimizer.from_config(server).is_identity:
        return
    other = [t for t in range(rounds) if method.averaged_kinds(t) is None]
    if not other:
        return
    key, what = ("server.lr", f"{server.lr:g} (with server.optimizer=avg)") if server.optimizer == "avg" else \
        ("server.optimizer", server.optimizer)
    when = "" if len(other) == rounds else f" in round{'s' if len(other) > 1 else ''} {other[0]}" + \
        (f"–{other[-1]}" if len(other) > 1 else "")
    raise UsageError(f"{key}: {what} steps on the change of the averaged tensors, but {method.name} does not aggregate by a "
                     f"weighted mean of the clients' trained tensors{when} ({method.about.rule}); use server.optimizer=avg "
                     f"server.lr=1 with it, or a method that does: {', '.join(averaging_methods(method, rounds))}")


def averaging_methods(method, rounds: int) -> list[str]:
    """The registered methods whose aggregate is a weighted mean in every round, with ``method``'s settings otherwise."""
    from fedsim.methods import METHODS, build_method

    names = []
    for name in METHODS:
        other = build_method(dataclasses.replace(method.config, name=name), method.clients, method.seed)
        if all(other.averaged_kinds(t) is not None for t in range(rounds)):
            names.append(name)
    return names
