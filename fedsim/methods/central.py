"""Centralised reference: one client that holds all the data, trained with LoRA-SB or LoRA.

The ceiling beside every federated number: the same model, adapters, local trainer and round loop,
with ``clients.count = 1``. ``method.adapter`` picks LoRA-SB (train R, as Fed-SB's clients do) or
LoRA (train A and B, as FedIT's clients do). With one client every average is the identity.
"""

from fedsim.errors import UsageError
from fedsim.methods.base import Method, MethodSettings

TRAINED = {"lora-sb": ("lora_R",), "lora": ("lora_A", "lora_B")}


class Central(Method):
    name = "central"
    num_clients = 1

    def __init__(self, settings: MethodSettings):
        if settings.adapter not in TRAINED:
            raise UsageError(f"method.adapter: unknown adapter '{settings.adapter}'; valid: {', '.join(TRAINED)}")
        super().__init__(settings)
        self.adapter = settings.adapter

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return TRAINED[self.adapter]
