"""FedIT: FedAvg of LoRA's A and B separately (inexact: mean(B_i) mean(A_i) ≠ mean(B_i A_i)).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
arXiv:2305.05644.
"""

from fedsim.methods import register
from fedsim.methods.base import Method


@register("fedit", paper="https://arxiv.org/abs/2305.05644", rule="`A = Σ w_i A_i`, `B = Σ w_i B_i`", exact="no (error reported)")
class FedIT(Method):
    """The base class's FedAvg of every trained tensor, applied to A and B; the error it leaves is measured."""
