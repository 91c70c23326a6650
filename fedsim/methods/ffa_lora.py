"""FFA-LoRA: A frozen at its random initialisation and shared; clients train B, the server averages B (exact).

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv:2403.12313.
"""

from fedsim.methods import register
from fedsim.methods.base import Method


@register("ffa-lora", paper="https://arxiv.org/abs/2403.12313", trains="B; A frozen random", rule="`B = Σ w_i B_i`")
class FFALoRA(Method):
    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_B",)
