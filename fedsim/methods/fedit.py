"""FedIT: FedAvg of LoRA's A and B separately (inexact: mean(B_i) mean(A_i) ≠ mean(B_i A_i)).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
arXiv:2305.05644.
"""

from fedsim.methods.base import Method


class FedIT(Method):
    name = "fedit"
    paper = "https://arxiv.org/abs/2305.05644"
