"""FlexLoRA: ``Σ w_i B_i A_i`` at full size, then an SVD truncated to each client's own rank (a downlink per client).

Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, arXiv:2402.11505.

Rule: clients train A and B at their own rank r_i (``clients.ranks``); the server forms the full-size
``ΔW = Σ w_i · s_i · B_i A_i`` (``w_i = n_i / Σ n``, the paper's weights, or uniform:
``clients.weights``) and redistributes it by SVD: client i gets the rank-r_i truncation
``U_{r_i} S_{r_i} V_{r_i}ᵀ``. fedsim keeps one global state, the truncation at the largest rank r
(``method.rank``) with its components ordered by singular value; client i's leading r_i components
of it ARE its rank-r_i truncation (Eckart–Young: the top r_i singular triplets of ΔW), and
``downlink`` sends exactly those.

As the authors' code does it (FederatedScope, branch ``FlexLoRA``: ``main.py``, ``fed_utils/adaptive_peft.py``,
``fed_utils/model_aggregation.py``):
- a rank-r_i client's adapter is scaled by its own rank, ``s_i = alpha / r_i`` (``modify_adapter`` gives every
  client ``lora_alpha = 16`` at its own r through PEFT; ``FlexLoRA()`` merges ``B_i A_i · 16 / r_i``): the
  default ``clients.rank_scaling`` here is ``own`` (``max`` is the earlier fedsim's alpha/r for all);
- all of S goes to B: ``B = U_r S_r / s``, ``A = V_rᵀ`` (``distribute_weight_fast``: ``lora_B = U S / (alpha / r_i)``,
  ``lora_A = V``), so client i's block, converted to its own scaling (``Method.client_scaling``), is the
  authors' ``U_{r_i} S_{r_i} / s_i`` and ``V_{r_i}ᵀ``. With every client at rank r, FlexLoRA is FRA-LoRA but for
  this split (FRA-LoRA's even √S split is unchanged); it is built on it.

Exactness: no. ``agg_error`` is the global truncation's: ``‖ΔW − trunc_r(ΔW)‖ / ‖ΔW‖``, zero only
when ΔW has rank ≤ r (one client, or clients that agree). A rank-r_i client resumes from a further truncation,
whose error is not in ``agg_error``.

Messages per client and round, per adapted layer (W0 d×k; plus the head where ``method.train_head``):
up ``r_i·(d+k)`` (A_i, B_i at the client's rank); down ``r_i·(d+k)`` (its rank's leading block of the
new A and B). The broadcast itself is the full-rank ``r·(d+k)``; only the leading block travels.

Where fedsim departs from the paper: the paper's server keeps the full-size ΔW as the global model
(and evaluates it); fedsim keeps and evaluates its rank-r truncation, r = ``method.rank`` ≥ every
r_i — set ``method.rank`` to the largest client rank. A client's rank is fixed for the run by
``clients.ranks`` (the paper sets it by the client's resources).
"""

from fedsim.adapters.state import State, rank_block
from fedsim.methods import register
from fedsim.methods.fra_lora import FRALoRA


@register("flexlora", paper="https://arxiv.org/abs/2402.11505", trains="A, B at the client's rank", rule="SVD of `Σ w_i B_i A_i` cut to each client's rank", exact="no (truncation reported)")
class FlexLoRA(FRALoRA):
    rank_scaling = "own"  # the authors' code: alpha / r_i per client
    split = "B"  # the authors' code: B = U_r S_r / s, A = V_rᵀ

    def downlink(self, message: State, rank: int) -> State:
        return rank_block(message, rank)
