"""Fed-SB: federated LoRA-SB; clients train only R, the server averages R (exact).

Singhal, Ponkshe, Vartak, Vepakomma, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning", arXiv:2502.15436.

B and A are frozen and shared (from the LoRA-SB initialisation), so ``Σ w_i B R_i A = B (Σ w_i R_i) A``:
averaging R is exact, and a client's message is r² numbers a layer whatever the number of clients.

Scaling of a rank-r_i client (``clients.rank_scaling``, default ``max``: LoRA-SB's factor 1 for every client):
the paper has no rank-heterogeneous clients (a rank-r_i client training the leading r_i×r_i block of R is
fedsim's design, DESIGN.md), so there is no published choice. Under ``own`` (r/r_i) the client's R carries the
conversion and zero-pad stays exact: ``B (Σ w_i s_i R_i) A``.
"""

from fedsim.methods import register
from fedsim.methods.base import Method


@register("fed-sb", paper="https://arxiv.org/abs/2502.15436", trains="R (r×r); B, A frozen", rule="`R = Σ w_i R_i`")
class FedSB(Method):
    adapter = "lora-sb"

    def trained_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_R",)
