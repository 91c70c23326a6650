"""Centralised reference: one client that holds all the data, trained with LoRA-SB or LoRA.

The ceiling beside every federated number: the same model, adapters, local trainer and round loop,
with ``clients.count = 1``. ``method.adapter`` picks LoRA-SB (train R, as Fed-SB's clients do) or
LoRA (train A and B, as FedIT's clients do). With one client every average is the identity.
"""

from fedsim.config import ClientsConfig, MethodConfig
from fedsim.methods import register
from fedsim.methods.base import Method

TRAINED = {"lora-sb": ("lora_R",), "lora": ("lora_A", "lora_B")}


@register("central", trains="R or A, B (`method.adapter`)", rule="one client holding all the data", exact="—")
class Central(Method):
    num_clients = 1

    def __init__(self, config: MethodConfig, clients: ClientsConfig | None = None, seed: int = 0):
        super().__init__(config, clients, seed)
        self.adapter = config.adapter  # method.adapter's choices are TRAINED's keys (fedsim.config)

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return TRAINED[self.adapter]
