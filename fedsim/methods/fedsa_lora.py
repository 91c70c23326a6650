"""FedSA-LoRA: clients train A and B; only A is shared and averaged, B stays on the client (personalised).

Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025, arXiv:2410.01463 (code: github.com/Pengxin-Guo/FedSA-LoRA, on FederatedScope-LLM).

Rule: ``A = Σ w_i A_i`` (FedAvg of the A matrices; ``w_i`` by sample count or uniform, ``clients.weights``);
each client keeps its own ``B_i`` — and, where the head is trained, its own head, as the authors' GLUE
config does (``personalization.local_param: [..., 'classifier']``) — from one round it takes part in
to the next. Client i's model is ``W0 + scaling · B_i Ā`` with its own head: one model per client,
no global model.

Exactness: personalised. The usual error ``‖Σ w_i B_i A_i − ΔW_agg‖ / ‖Σ w_i B_i A_i‖`` has no
``ΔW_agg`` to compare with, and what would take its place, client i's drift ``‖B_i (Ā − A_i)‖``
between the model it trained and the one it resumes from, needs ``B_i``, which never leaves the
client. ``agg_error`` is NaN, by design. (The mean of A itself is linear: exact to float precision.)

Messages per client and round, per adapted layer (W0 d×k, rank r): up ``r·k`` (A_i); down ``r·k``
(Ā). Nothing else: the head, where trained, is kept, not sent. At first contact a client receives
the whole global state, whose B (zeros, LoRA's initialisation: ``r·d`` a layer) and head (the
pretrained head) are its starting point; neither is sent again. The per-client store
(``fedsim.client_state``) keeps them between the client's rounds; those bytes are not communication.

Where fedsim departs from the paper: the paper's runs have every client in every round; fedsim
samples clients, so a client's B and head wait in the store across the rounds it sits out, and a
client seen for the first time starts from the global initial B and head. ``clients.ranks`` works as
for FedIT: a rank-r_i client trains and keeps r_i components, its A block is zero-padded into the mean.
The paper's variants on rsLoRA and VeRA (FedSA-rsLoRA, FedSA-VeRA) are not built.
"""

from collections.abc import Sequence

from fedsim.adapters.state import State, key_kind
from fedsim.methods import register
from fedsim.methods.base import Method, RoundResult, Upload


@register("fedsa-lora", paper="https://arxiv.org/abs/2410.01463", trains="A, B; B and the head stay local", rule="`A = Σ w_i A_i`", exact="personalised (NaN)")
class FedSALoRA(Method):
    def client_kinds(self, round_idx: int) -> tuple[str, ...]:
        return ("lora_B", "head") if self.config.train_head else ("lora_B",)

    def averaged_kinds(self, round_idx: int) -> tuple[str, ...]:
        return self.uploaded_kinds(round_idx)  # A (and the head where it is not kept): the mean, the kept B untouched

    def aggregate(self, state: State, uploads: Sequence[Upload], round_idx: int) -> RoundResult:
        uploads, weights = self.ordered(uploads)
        kept = self.client_kinds(round_idx)
        kept_keys = {key for key in state if key_kind(key) in kept}  # uploads are keyed as the global state is
        for upload in uploads:
            leaked = kept_keys.intersection(upload.tensors)
            if leaked:
                raise ValueError(f"client {upload.client_id} uploaded tensors it keeps: {sorted(leaked)[:3]}")
        averaged = self.average(state, uploads, weights)
        return RoundResult(
            state={**state, **averaged},
            broadcast=averaged,
            agg_error=float("nan"),  # personalised: no global model to measure (module docstring)
            weights={u.client_id: w for u, w in zip(uploads, weights)},
        )
