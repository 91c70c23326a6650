"""Centralised reference: one client that holds all the data, trained with LoRA-SB or LoRA.

The ceiling beside every federated number: the same model, adapters, local trainer and round loop,
with ``clients.count = 1``. ``method.adapter`` picks LoRA-SB (train R, as Fed-SB's clients do) or
LoRA (train A and B, as FedIT's clients do). With one client every average is the identity.
"""

from dataclasses import dataclass

from fedsim.config import ClientsConfig, MethodConfig, setting
from fedsim.methods import register
from fedsim.methods.base import Method, MethodOptions

TRAINED = {"lora-sb": ("lora_R",), "lora": ("lora_A", "lora_B")}


@dataclass
class CentralOptions(MethodOptions):
    """The centralised reference's adapter: LoRA-SB (Ponkshe et al., arXiv:2411.19557), as Fed-SB's clients train it, or
    LoRA (Hu et al., arXiv:2106.09685), as FedIT's do."""

    adapter: str = setting("lora-sb", "central only: the adapter of the centralised reference, lora-sb | lora",
                           choices=tuple(TRAINED))


@register("central", trains="R or A, B (`method.adapter`)", rule="one client holding all the data", exact="—")
class Central(Method):
    num_clients = 1
    options_class = CentralOptions

    def __init__(self, config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0):
        super().__init__(config, clients, seed)
        self.adapter = self.options.adapter

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return TRAINED[self.adapter]
