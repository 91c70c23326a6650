"""FRA-then-FFA: FRA-LoRA in the first rounds, then FFA-LoRA (A frozen where FRA left it, B averaged).

Trautmann, Hales, Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning", arXiv:2501.06332:
full-rank aggregation early, when the adapters move most, then the exact and cheaper FFA.
``method.switch_round`` is the first FFA round.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.adapters.state import State
from fedsim.config import setting
from fedsim.methods import register
from fedsim.methods.base import Method, MethodOptions, RoundResult, Upload
from fedsim.methods.fra_lora import FRALoRA


@dataclass
class FRAThenFFAOptions(MethodOptions):
    """When FRA-then-FFA switches from FRA-LoRA to FFA-LoRA (Trautmann, Hales, Volk, arXiv:2501.06332)."""

    switch_round: int = setting(3, "fra-then-ffa: rounds < switch_round use FRA, the later rounds FFA", low=0)


@register("fra-then-ffa", paper="https://arxiv.org/abs/2501.06332", trains="A, B, then B", rule="FRA before `method.switch_round`, FFA after", exact="FFA rounds")
class FRAThenFFA(FRALoRA):
    options_class = FRAThenFFAOptions

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if round_idx < self.options.switch_round else ("lora_B",)

    def averaged_kinds(self, round_idx: int) -> tuple[str, ...] | None:
        return None if round_idx < self.options.switch_round else self.uploaded_kinds(round_idx)  # FRA's SVD, then FFA's mean

    def steady_round(self) -> int:
        return self.options.switch_round + 1

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        if round_idx < self.options.switch_round:
            return FRALoRA.aggregate(self, state, uploads, round_idx)
        return Method.aggregate(self, state, uploads, round_idx)
