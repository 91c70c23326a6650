"""Ravan (``fedsim.methods.ravan``) without Ray: its aggregate against the clients' own sum of heads, computed here from
the heads' B_i, H_i, A_i; its messages; a client's training through fedsim's engine; its bytes in `fedsim comm`."""

import pytest
import torch
from tiny_models import BERT_TARGETS, cycle, make_method, random_batches, tiny_bert, train_one

from analysis.comm import comm_table
from fedsim.adapters import accumulate_gradients, adapted_layers, target_linear_names
from fedsim.adapters.state import HEAD_PREFIX, key_kind, layer_names_of, nbytes
from fedsim.cli import main
from fedsim.config import TrainConfig
from fedsim.errors import UsageError
from fedsim.methods import Upload
from fedsim.methods.ravan import block_diagonal, diagonal_blocks

RANK, HEADS = 8, 4  # heads of rank 2
CLIENT_RANKS = {0: 8, 1: 8, 2: 6, 3: 5}  # client 2 trains 3 heads, client 3 two and a half (its third head cut at 5)


def setup(dtype=torch.float32, init="orthogonal", **settings):
    model = tiny_bert().to(dtype)
    method = make_method("ravan", rank=RANK, ravan_heads=HEADS, ravan_init=init, seed=3, **settings)
    grads = None
    if method.needs_init_gradients:
        grads = accumulate_gradients(model, target_linear_names(model, BERT_TARGETS), random_batches(99, count=2))
    method.prepare(model, BERT_TARGETS)
    return model, method, {key: value.to(dtype) for key, value in method.init_state(model, grads, 1e-3).items()}


def heads_of(B, R, A, head_rank):
    """``[(B_i, s_i H_i, A_i)]``: the heads of a layer at R's rank (its last head cut where the rank cuts it)."""
    n = R.shape[0]
    return [(B[:, i:i + head_rank][:, :n - i], R[i:i + head_rank, i:i + head_rank], A[i:i + head_rank][:n - i])
            for i in range(0, n, head_rank)]


def client_uploads(method, state, generator):
    """What the clients of ``CLIENT_RANKS`` send: random cores s_i H_i of their heads, packed as a client packs them."""
    uploads = []
    for client_id, rank in CLIENT_RANKS.items():
        tensors = {}
        for layer in layer_names_of(state):
            R = state[f"{layer}.lora_R"][:rank, :rank]
            tensors[f"{layer}.lora_R"] = R + torch.randn(R.shape, generator=generator, dtype=torch.float64).to(R.dtype)
        uploads.append(Upload(client_id, 10 + 5 * client_id, method.pack(tensors)))
    return uploads


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("init", ["orthogonal", "lora-sb"])
def test_the_aggregate_is_the_mean_of_the_clients_sums_of_heads(dtype, tolerance, init):
    """``B R̄ A = Σ_c w_c Σ_i B_i (s_i H_i)_c A_i`` over every layer, the ideal summed here head by head in float64 from
    the clients' own blocks: relative error at float64 rounding in float64 (measured 2e-16) and at float32 storage of R̄
    in float32 (measured 2e-8), and the method's own ``agg_error`` says so too. Clients of lower rank train the
    leading heads (zero-padding: the mean over all clients of what each sent)."""
    _, method, state = setup(dtype, init)
    uploads = client_uploads(method, state, torch.Generator().manual_seed(0))
    result = method.aggregate(state, list(reversed(uploads)), 0)  # arrival order is not client order
    total = sum(u.num_samples for u in uploads)
    errors, norms = 0.0, 0.0
    for layer in layer_names_of(state):
        B, A = (state[f"{layer}.lora_{kind}"].double() for kind in "BA")
        ideal = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
        for upload in uploads:
            R = block_diagonal(upload.tensors[f"{layer}.lora_H"]).double()
            for B_i, H_i, A_i in heads_of(B, R, A, method.head_rank):
                ideal += upload.num_samples / total * B_i @ H_i @ A_i
        new = B @ result.state[f"{layer}.lora_R"].double() @ A
        errors += float(torch.linalg.matrix_norm(new - ideal) ** 2)
        norms += float(torch.linalg.matrix_norm(ideal) ** 2)
        assert torch.equal(result.state[f"{layer}.lora_B"], state[f"{layer}.lora_B"])  # the bases never change
        assert torch.equal(result.state[f"{layer}.lora_A"], state[f"{layer}.lora_A"])
    assert (errors / norms) ** 0.5 <= tolerance
    assert result.agg_error <= tolerance


def test_b_and_a_are_orthonormal_heads_in_orthogonal_subspaces_and_seeded():
    _, method, state = setup(torch.float64)
    for layer in layer_names_of(state):
        B, A, R = (state[f"{layer}.lora_{kind}"] for kind in "BAR")
        eye = torch.eye(RANK, dtype=torch.float64)
        assert torch.allclose(B.T @ B, eye, atol=1e-12) and torch.allclose(A @ A.T, eye, atol=1e-12)
        assert not R.any()  # H = 0: the model starts at W0
    again = setup(torch.float64)[2]
    assert all(torch.equal(state[key], again[key]) for key in state)


def test_messages_carry_the_heads_blocks_only():
    """Up and down, R travels as its heads' blocks: r²/h numbers a layer (Fed-SB sends r²); unpacking gives R back."""
    _, method, state = setup(torch.float64)
    R = torch.randn(RANK, RANK, dtype=torch.float64)
    assert torch.equal(block_diagonal(diagonal_blocks(R, 2)), R * torch.block_diag(*[torch.ones(2, 2)] * 4))
    cut = R[:5, :5]  # a rank-5 client: its third head cut to 1×1, padded to 2 columns
    assert diagonal_blocks(cut, 2).shape == (5, 2) and torch.equal(block_diagonal(diagonal_blocks(cut, 2)), R[:5, :5] * (
        torch.block_diag(*[torch.ones(2, 2)] * 2, torch.ones(1, 1))))
    message = method.downlink(state, RANK)
    layers = layer_names_of(state)
    assert {key_kind(key) for key in message} == {"lora_H", "lora_A", "lora_B", "head"}
    assert sum(message[f"{layer}.lora_H"].numel() for layer in layers) == len(layers) * RANK**2 // HEADS
    received = method.receive({}, message)
    assert received.keys() == state.keys() and all(torch.equal(received[key], state[key]) for key in state)
    uploads = client_uploads(method, state, torch.Generator().manual_seed(1))
    assert all({key_kind(key) for key in u.tensors} == {"lora_H"} for u in uploads)
    assert torch.equal(method.unpack(method.pack(state))[f"{layers[0]}.lora_R"], state[f"{layers[0]}.lora_R"])


def test_a_client_learns_its_heads_and_sends_them_only():
    """One client through the engine (a cohort of one; dropout off, the head's logits scaled up so that the adapters
    matter): its loss goes down step after step; B and A do not move, nor R's entries off the heads' blocks; its upload
    is the blocks alone, each layer's h blocks of r/h × r/h."""
    model, method, state = setup(train_head=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        model.classifier.weight.mul_(30)
    upload, stats = train_one(model, method, state, 0, cycle(random_batches(100, count=1)), TrainConfig(local_steps=20, lr=5e-2), 7)
    assert all(later < earlier for earlier, later in zip(stats.losses, stats.losses[1:])), stats.losses
    assert stats.losses[-1] < stats.losses[0] - 0.03  # measured: 0.9545 → 0.9129
    assert {key_kind(key) for key in upload} == {"lora_H"}
    mask = torch.block_diag(*[torch.ones(2, 2)] * HEADS).bool()
    for name, layer in adapted_layers(model).items():  # the model as the client left it
        assert torch.equal(layer.lora_B.weight, state[f"{name}.lora_B"]) and torch.equal(layer.lora_A.weight, state[f"{name}.lora_A"])
        R = layer.lora_R.weight.detach()
        assert not R[~mask].any() and R[mask].abs().min() > 0
        assert upload[f"{name}.lora_H"].shape == (RANK, RANK // HEADS)
        assert torch.equal(upload[f"{name}.lora_H"], diagonal_blocks(R, RANK // HEADS))


def test_a_client_of_lower_rank_trains_its_leading_heads():
    model, method, state = setup(train_head=False)
    upload, _ = train_one(model, method, state, 0, cycle(random_batches(5, count=1)), TrainConfig(local_steps=2, lr=1e-2), 1, rank=5)
    assert all(tensor.shape == (5, 2) for tensor in upload.values())
    result = method.aggregate(state, [Upload(0, 4, upload)], 0)
    assert result.agg_error < 1e-6
    for layer in layer_names_of(state):
        R = result.state[f"{layer}.lora_R"]
        assert not R[5:].any() and not R[:, 5:].any() and R[4, 4] != 0 and R[4, 5] == 0


def test_heads_must_divide_the_rank():
    with pytest.raises(UsageError, match=r"^method.ravan_heads: 3 heads do not divide method.rank \(8\)"):
        make_method("ravan", rank=8, ravan_heads=3)
    assert main(["config", "method.name=ravan", "method.rank=8", "method.ravan_init=svd"]) == 2


def test_fedsim_comm_counts_fed_sb_s_bytes_at_twice_its_rank(capsys):
    """BERT-base, query and value: Ravan at rank 16 with 4 heads sends 24·16²/4 numbers a client and round, up and down,
    what Fed-SB sends at rank 8."""
    ravan = comm_table("bert-base", "ravan", [16], [10], target_modules=["query", "value"], init_at="server")[0]
    fed_sb = comm_table("bert-base", "fed-sb", [8], [10], target_modules=["query", "value"], init_at="server")[0]
    assert ravan.up_params == ravan.down_params == 24 * 16**2 // 4 == fed_sb.up_params
    assert ravan.up_bytes == fed_sb.up_bytes  # "lora_H" and "lora_R" keys are as long
    assert ravan.first_down_params == 24 * (16 * 768 * 2 + 16**2 // 4)
    assert main(["comm", "--model", "bert-base", "--method", "ravan", "--rank", "16", "--targets", "query,value"]) == 0
    assert any(line.startswith("ravan ") for line in capsys.readouterr().out.splitlines())


def test_the_head_travels_beside_the_blocks():
    _, method, state = setup(train_head=True)
    head = {key for key in state if key.startswith(HEAD_PREFIX)}
    assert head and head <= set(method.downlink(state, RANK))
    assert nbytes(method.downlink(state, RANK)) < nbytes(state)
