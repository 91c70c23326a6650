"""What each client receives at the start of a round, the one rule the runtime's aggregator and ``analysis.comm`` share.

- A client at its first round receives the whole global state; where clients build the round-0 state themselves
  (``adapters.init_at: client``), it holds the state at the start of round 0 and is treated as having received it
  then: it receives what changed since (nothing in round 0; for Fed-SB, never B and A).
- A client that also received the previous round's downlink receives that round's broadcast.
- Any other returning client receives what changed in the global state since it last received it: the current
  value of every tensor a later aggregation changed (for Fed-SB, R alone: B and A never change; for FedEx-LoRA,
  A, B and the folded W0 correction; for RoLoRA, both factors).

Each message then passes through the method's ``downlink`` at the client's rank (FlexLoRA and HetLoRA send a
client only its rank's block). Dropped clients receive their downlink too: it is sent before they drop.
"""

from __future__ import annotations

import torch

from fedsim.adapters.state import State
from fedsim.methods.base import Method


class Downlinks:
    """The clients' view of the global state over the rounds: when each last received it, when each tensor last changed."""

    def __init__(self, method: Method, built_at_client: bool = False):
        self.method = method
        self.built_at_client = built_at_client  # adapters.init_at: client
        self.last_received: dict[int, int] = {}  # client -> the round at whose start it last received the state
        self.changed: dict[str, int] = {}  # state key -> the last round whose aggregation changed it
        self.broadcast: State = {}  # the last round's broadcast (meta tensors suffice: only sizes are read)

    def message(self, state: State, client_id: int, rank: int, round_idx: int) -> State:
        """What ``client_id`` (adapter rank ``rank``) receives at the start of ``round_idx``; records that it did."""
        last = self.last_received.get(client_id, 0 if self.built_at_client else None)
        self.last_received[client_id] = round_idx
        if last is None:
            return self.method.downlink(state, rank)
        if last == round_idx - 1:
            return self.method.downlink(self.broadcast, rank)
        return self.method.downlink({key: value for key, value in state.items() if self.changed.get(key, -1) >= last}, rank)

    def aggregated(self, old_state: State, new_state: State, broadcast: State, round_idx: int) -> None:
        """Record round ``round_idx``'s aggregation: which tensors it changed, and its broadcast."""
        for key, value in new_state.items():
            old = old_state.get(key)
            if old is None or (value is not old and (value.is_meta or not torch.equal(value, old))):
                self.changed[key] = round_idx
        self.broadcast = {key: value.to("meta") for key, value in broadcast.items()}

    def to_json(self) -> dict:
        return {"last_received": {str(k): v for k, v in self.last_received.items()}, "changed": self.changed,
                "broadcast": {key: [list(value.shape), str(value.dtype).removeprefix("torch.")] for key, value in self.broadcast.items()}}

    def load_json(self, data: dict) -> None:
        self.last_received = {int(k): v for k, v in data["last_received"].items()}
        self.changed = dict(data["changed"])
        self.broadcast = {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                          for key, (shape, dtype) in data["broadcast"].items()}
