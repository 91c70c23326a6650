"""RoLoRA: alternating optimisation of LoRA; each round trains and averages one factor, the other frozen (exact).

Chen, Guo, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via Alternating Optimization
of LoRA", NeurIPS 2025, arXiv:2502.01755.

Rule: in even rounds (0, 2, …) clients train B with A frozen and the server sets ``B = Σ w_i B_i``;
in odd rounds they train A with B frozen and the server sets ``A = Σ w_i A_i``. B goes first: with
LoRA's initialisation (B = 0) the gradient of A is zero until B has moved.

Exact every round: the frozen factor is shared, so ``Σ w_i B_i A = (Σ w_i B_i) A`` and
``Σ w_i B A_i = B (Σ w_i A_i)``; ``agg_error`` is float rounding (the state's dtype). With
``clients.ranks`` a rank-r_i client trains its leading r_i components and the zero-padded mean is
still the exact mean of the client models.

Messages per client and round, per adapted layer (W0 d×k, rank r; plus the head where
``method.train_head``): even rounds up ``r·d`` (B_i), down ``r·d`` (B̄); odd rounds up ``r·k`` (A_i),
down ``r·k`` (Ā). A client that sat out a round also lacks the factor that round changed; what it
receives then is the runtime's to count (the broadcast holds only the factor of its own round).

Where fedsim departs from the paper: fedsim counts a round per factor (each round communicates one
factor), so one update of both factors takes two fedsim rounds; compare runs at equal rounds and
bytes, not equal "iterations". Clients are sampled per round, so the clients that train B and those
that train A after it need not be the same. B first is fedsim's choice, forced by B = 0 at the start.
"""

from fedsim.methods import register
from fedsim.methods.base import Method


@register("rolora", paper="https://arxiv.org/abs/2502.01755", trains="B in even rounds, A in odd rounds", rule="average the factor trained that round")
class RoLoRA(Method):
    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_B",) if round_idx % 2 == 0 else ("lora_A",)
