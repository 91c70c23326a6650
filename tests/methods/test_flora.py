"""FLoRA's re-drawn A: a function of the seed, the round and the layer names alone."""

import torch

from tiny_models import make_method

from fedsim.adapters.init import kaiming_uniform_A
from fedsim.methods.stack import STACK_RANKS, STACK_WEIGHTS
from fedsim.methods.flora import ROUND_KEY
from fedsim.seeds import torch_generator

# Three layers of one shape and one of another: A's draw order decides what each layer gets.
LAYERS = {"model.layers.1.q_proj": (6, 8), "model.layers.0.q_proj": (6, 8), "model.layers.0.v_proj": (6, 8), "head.dense": (4, 5)}
RANK, SEED, ROUND = 2, 7, 3


def state_and_broadcast():
    generator = torch.Generator().manual_seed(0)
    state, broadcast = {}, {STACK_WEIGHTS: torch.tensor([1.0], dtype=torch.float64), STACK_RANKS: torch.tensor([RANK]),
                            ROUND_KEY: torch.tensor([ROUND])}
    for name, (d, k) in LAYERS.items():
        state[f"{name}.lora_A"] = torch.randn(RANK, k, generator=generator)
        state[f"{name}.lora_B"] = torch.randn(d, RANK, generator=generator)
        broadcast[f"{name}.stack_A"], broadcast[f"{name}.stack_B"] = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state, broadcast


def test_redrawn_A_does_not_depend_on_the_order_of_the_state_keys():
    method = make_method("flora", rank=RANK, seed=SEED)
    state, broadcast = state_and_broadcast()
    forward = method.receive(state, broadcast)
    backward = method.receive(dict(reversed(list(state.items()))), broadcast)
    for name in LAYERS:
        assert torch.equal(forward[f"{name}.lora_A"], backward[f"{name}.lora_A"]), name
        assert not torch.equal(forward[f"{name}.lora_A"], state[f"{name}.lora_A"])  # re-drawn
        assert torch.equal(forward[f"{name}.lora_B"], torch.zeros_like(state[f"{name}.lora_B"]))
    # a client redraws A from the seed alone: each layer's from the stream of (run seed, next round, layer name)
    for name in LAYERS:
        generator = torch_generator(SEED, "flora-redraw", ROUND + 1, name)
        assert torch.equal(forward[f"{name}.lora_A"], kaiming_uniform_A(RANK, LAYERS[name][1], generator).float()), name
