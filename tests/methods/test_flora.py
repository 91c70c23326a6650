"""FLoRA's re-drawn A: a function of the seed, the round and the layer names alone."""

import torch

from fedsim.methods import MethodSettings, build_method
from fedsim.methods.base import kaiming_uniform_A
from fedsim.methods.flora import RANKS_KEY, ROUND_KEY, WEIGHTS_KEY

# Three layers of one shape and one of another: A's draw order decides what each layer gets.
LAYERS = {"model.layers.1.q_proj": (6, 8), "model.layers.0.q_proj": (6, 8), "model.layers.0.v_proj": (6, 8), "head.dense": (4, 5)}
RANK, SEED, ROUND = 2, 7, 3


def state_and_broadcast():
    generator = torch.Generator().manual_seed(0)
    state, broadcast = {}, {WEIGHTS_KEY: torch.tensor([1.0], dtype=torch.float64), RANKS_KEY: torch.tensor([RANK]),
                            ROUND_KEY: torch.tensor([ROUND])}
    for name, (d, k) in LAYERS.items():
        state[f"{name}.lora_A"] = torch.randn(RANK, k, generator=generator)
        state[f"{name}.lora_B"] = torch.randn(d, RANK, generator=generator)
        broadcast[f"{name}.stack_A"], broadcast[f"{name}.stack_B"] = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state, broadcast


def test_redrawn_A_does_not_depend_on_the_order_of_the_state_keys():
    method = build_method("flora", MethodSettings(rank=RANK, seed=SEED))
    state, broadcast = state_and_broadcast()
    forward = method.receive(state, broadcast)
    backward = method.receive(dict(reversed(list(state.items()))), broadcast)
    for name in LAYERS:
        assert torch.equal(forward[f"{name}.lora_A"], backward[f"{name}.lora_A"]), name
        assert not torch.equal(forward[f"{name}.lora_A"], state[f"{name}.lora_A"])  # re-drawn
        assert torch.equal(forward[f"{name}.lora_B"], torch.zeros_like(state[f"{name}.lora_B"]))
    # a client redraws A from the seed alone: layer after layer in sorted order of the names, one generator
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + ROUND + 1)
    for name in sorted(LAYERS):
        assert torch.equal(forward[f"{name}.lora_A"], kaiming_uniform_A(RANK, LAYERS[name][1], generator).float()), name
