"""The six newer methods over a few rounds of real training on a tiny BERT (fedsim's engine: ``tiny_models.train_one``, no Ray):
what each round changes, exactness where claimed, rank-heterogeneous clients receiving their own downlink, and
FedSA-LoRA's personal tensors living in the per-client store across rounds — none of it depending on the order
in which a worker trains its clients, and a crash-and-resume giving bit for bit the uninterrupted run."""

from dataclasses import replace

import pytest
import torch
from tiny_models import BERT_TARGETS, cycle, random_batches, tiny_bert, make_method, train_one

from fedsim.adapters import adapted_layers

from fedsim.seeds import derive_seed
from fedsim.client_state import ClientStore
from fedsim.methods import Upload, build_method
from fedsim.adapters.state import HEAD_PREFIX, head_parameters, key_kind, layer_names_of
from fedsim.config import TrainConfig

FULL = 8
SETTINGS = TrainConfig(local_steps=2, lr=1e-2)
DATA = {client_id: random_batches(100 + client_id, count=2) for client_id in range(3)}


def setup(method_name, **settings):
    model = tiny_bert()
    method = make_method(method_name, rank=FULL, alpha=2.0 * FULL, seed=0, **settings)
    method.prepare(model, BERT_TARGETS)
    return model, method, method.init_state(model)


def train_round(model, method, state, round_idx, order, ranks=None, store=None, keep_from=None):
    """One round as a worker runs it: each client starts from what it receives (``downlink``) with its own kept
    tensors over it, trains, keeps what it keeps, sends the rest; then the server aggregates."""
    uploads, losses = [], {}
    for client_id in order:
        rank = (ranks or {}).get(client_id, FULL)
        start = method.downlink(state, rank)
        if store is not None:
            start = method.client_state(start, store.read(client_id, round_idx - 1))
        upload, stats = train_one(model, method, start, round_idx, cycle(DATA[client_id]), SETTINGS,
                                   derive_seed(7, "training", round_idx, client_id), rank=rank)
        if store is not None:
            store.write(client_id, round_idx, method.keep(model, round_idx), keep_from=keep_from)
        uploads.append(Upload(client_id, sum(len(b["labels"]) for b in DATA[client_id]), upload))
        losses[client_id] = stats.losses
    return method.aggregate(state, uploads, round_idx), uploads, losses


def equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_rolora(model, method, round_idx, before, result, uploads):
    trained, frozen = ("lora_B", "lora_A") if round_idx % 2 == 0 else ("lora_A", "lora_B")
    assert {key_kind(k) for u in uploads for k in u.tensors} == {trained, "head"}
    for layer in layer_names_of(before):
        assert torch.equal(result.state[f"{layer}.{frozen}"], before[f"{layer}.{frozen}"])
        assert not torch.equal(result.state[f"{layer}.{trained}"], before[f"{layer}.{trained}"])
    assert result.agg_error < 1e-6  # exact up to float32 storage


def check_fedsvd(model, method, round_idx, before, result, uploads):
    assert {key_kind(k) for u in uploads for k in u.tensors} == {"lora_B", "head"}
    assert result.agg_error < 1e-6
    for layer in layer_names_of(before):
        A = result.state[f"{layer}.lora_A"].double()
        assert torch.allclose(A @ A.T, torch.eye(FULL, dtype=torch.float64), atol=1e-5)


def check_lora_fair(model, method, round_idx, before, result, uploads):
    fedit = build_method(replace(method.config, name="fedit"), method.clients, method.seed).aggregate(before, uploads, round_idx)
    assert 0 < result.agg_error < fedit.agg_error


def check_own_rank(model, method, round_idx, before, result, uploads):
    for upload in uploads:
        r = RANKS[upload.client_id]
        assert all(t.shape[0] == r for k, t in upload.tensors.items() if k.endswith("lora_A"))
        assert all(t.shape[1] == r for k, t in upload.tensors.items() if k.endswith("lora_B"))
    assert result.agg_error > 0  # not exact, and reported
    layers = adapted_layers(model)
    for r in set(RANKS.values()):  # the client's model from its downlink = the global state cut to its rank
        sent = method.downlink(result.broadcast, r)
        adapters = sum(t.numel() for k, t in sent.items() if not k.startswith(HEAD_PREFIX))
        assert adapters == sum(r * (layer.base.in_features + layer.base.out_features) for layer in layers.values())
        method.load_state(model, method.receive(method.downlink(before, r), sent), r)
        from_downlink = {n: layer.delta_weight() for n, layer in adapted_layers(model).items()}
        method.load_state(model, result.state, r)
        assert all(torch.equal(from_downlink[n], layer.delta_weight()) for n, layer in adapted_layers(model).items())


RANKS = {0: 2, 1: 4, 2: 8}
CHECKS = {"rolora": check_rolora, "fedsvd": check_fedsvd, "lora-fair": check_lora_fair,
          "flexlora": check_own_rank, "hetlora": check_own_rank}


@pytest.mark.parametrize("method_name", CHECKS)
def test_two_rounds_of_training_whatever_the_order_clients_are_trained_in(method_name):
    ranks = RANKS if CHECKS[method_name] is check_own_rank else None
    runs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        model, method, state = setup(method_name)
        rounds = []
        for round_idx in range(2):  # RoLoRA: a B round and an A round
            result, uploads, _ = train_round(model, method, state, round_idx, order, ranks)
            rounds.append((state, result, uploads))
            state = result.state
        runs.append((model, method, rounds))
    (_, _, first), (_, _, second) = runs
    assert equal_states(first[-1][1].state, second[-1][1].state)
    assert [r.agg_error for _, r, _ in first] == [r.agg_error for _, r, _ in second]
    model, method, rounds = runs[0]
    for round_idx, (before, result, uploads) in enumerate(rounds):
        CHECKS[method_name](model, method, round_idx, before, result, uploads)


# -- FedSA-LoRA and the per-client store -------------------------------------------------------------

SCHEDULE = {0: [0, 1, 2], 1: [0, 1], 2: [0, 1, 2]}  # client 2 sits out round 1


def run_fedsa(store_dir, orders=None, rounds=range(3), state=None):
    """Rounds of FedSA-LoRA with a checkpoint after every round (so ``keep_from`` = the previous round); returns the
    final state, the store, and per round (result, uploads, losses, what each client kept)."""
    model, method, initial = setup("fedsa-lora")
    state = initial if state is None else state
    store = ClientStore(store_dir)
    history = []
    for round_idx in rounds:
        order = (orders or {}).get(round_idx, SCHEDULE[round_idx])
        result, uploads, losses = train_round(model, method, state, round_idx, order, store=store, keep_from=round_idx - 1)
        history.append((result, uploads, losses, {c: store.read(c, round_idx) for c in order}))
        state = result.state
    return state, store, history, (model, method, initial)


def store_contents(store):
    return {(c, v): store.read(c, v) for c in range(3) for v in store.versions(c)}


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory):
    return run_fedsa(tmp_path_factory.mktemp("fedsa") / "client_state")


def test_fedsa_lora_keeps_B_and_the_head_per_client_across_rounds_while_A_is_shared(fedsa_run):
    state, store, history, (model, method, initial) = fedsa_run
    layer = layer_names_of(initial)[0]
    kept0 = history[0][3]
    # what goes up is A only; B and the head stay behind, and the global B and head never move
    for result, uploads, _, _ in history:
        assert all(key_kind(k) == "lora_A" for u in uploads for k in u.tensors)
        assert torch.equal(result.state[f"{layer}.lora_B"], initial[f"{layer}.lora_B"])
        assert all(torch.equal(result.state[k], initial[k]) for k in initial if k.startswith(HEAD_PREFIX))
        assert result.agg_error != result.agg_error  # NaN: personalised, by design
    assert not torch.equal(state[f"{layer}.lora_A"], initial[f"{layer}.lora_A"])
    # every client's B is its own, trained away from the shared zero start; the head is kept with it
    Bs = [kept0[c][f"{layer}.lora_B"] for c in range(3)]
    assert all(B.abs().sum() > 0 for B in Bs) and not torch.equal(Bs[0], Bs[1])
    assert any(k.startswith(HEAD_PREFIX) for k in kept0[0]) and all(key_kind(k) in ("lora_B", "head") for k in kept0[0])
    # client 2 sat out round 1: in round 2 it resumes from its round-0 tensors, over the round-1 mean A
    assert store.versions(2) == [0, 2]
    state1 = history[1][0].state
    method.load_state(model, method.client_state(state1, ClientStore(store.root).read(2, 1)))
    module, heads = adapted_layers(model)[layer], head_parameters(model)
    assert torch.equal(module.lora_B.weight, Bs[2]) and torch.equal(module.lora_A.weight, state1[f"{layer}.lora_A"])
    assert all(torch.equal(heads[k[len(HEAD_PREFIX):]], v) for k, v in kept0[2].items() if k.startswith(HEAD_PREFIX))
    # clients 0 and 1 wrote every round; with a checkpoint every round only their newest two versions remain
    assert store.versions(0) == [1, 2] and store.versions(1) == [1, 2]
    # personal tensors persist, so each client's loss on its own data keeps falling from round to round
    losses = [history[r][2] for r in range(3)]
    assert all(losses[2][c][0] < losses[0][c][0] for c in range(3))


def test_fedsa_lora_does_not_depend_on_the_order_clients_are_trained_in(fedsa_run, tmp_path):
    state, store, _, _ = fedsa_run
    other_state, other_store, _, _ = run_fedsa(tmp_path / "b", orders={0: [2, 1, 0], 1: [1, 0], 2: [1, 2, 0]})
    assert equal_states(state, other_state)
    a, b = store_contents(store), store_contents(other_store)
    assert a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)


def test_fedsa_lora_resume_after_a_crash_is_bit_identical_to_the_uninterrupted_run(fedsa_run, tmp_path):
    full_state, full_store, _, _ = fedsa_run
    # the crashed run: round 0 checkpointed; in round 1 client 0 wrote its tensors, then the run died; and a
    # stray round-1 write for client 2 (who does not train in round 1) stands in for anything a crash may leave
    state0, store, _, (model, method, _) = run_fedsa(tmp_path / "crashed", rounds=[0])
    checkpoint = {k: v.clone() for k, v in state0.items()}
    train_round(model, method, state0, 1, [0], store=store, keep_from=0)
    store.write(2, 1, {k: torch.full_like(v, 7.0) for k, v in store.read(2, 0).items()})
    assert store.versions(0) == [0, 1] and store.versions(2) == [0, 1]  # read as of round 1, client 2 would get the stray
    # resume from round 0: roll the store back to the checkpoint, then run rounds 1 and 2 again
    assert store.rollback(0) == 2
    resumed_state, resumed_store, _, _ = run_fedsa(tmp_path / "crashed", rounds=[1, 2], state=checkpoint)
    assert equal_states(resumed_state, full_state)
    a, b = store_contents(full_store), store_contents(resumed_store)
    assert a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)


# -- what each method's docstring says goes up and down, per client, round and adapted layer (d×k) ----------

MESSAGES = {  # (up, down) numbers a layer for a client of rank r in round t; the head is not trained here
    "fedsa-lora": (lambda r, d, k, t: r * k, lambda r, d, k, t: r * k),
    "rolora": (lambda r, d, k, t: r * (d if t % 2 == 0 else k), lambda r, d, k, t: r * (d if t % 2 == 0 else k)),
    "fedsvd": (lambda r, d, k, t: r * d, lambda r, d, k, t: r * (d + k)),
    "flexlora": (lambda r, d, k, t: r * (d + k), lambda r, d, k, t: r * (d + k)),
    "hetlora": (lambda r, d, k, t: r * (d + k), lambda r, d, k, t: r * (d + k)),
    "lora-fair": (lambda r, d, k, t: r * (d + k), lambda r, d, k, t: r * (d + k)),
}


@pytest.mark.parametrize("method_name", MESSAGES)
def test_messages_per_layer_are_what_the_docstrings_say(method_name):
    up, down = MESSAGES[method_name]
    ranks = RANKS if method_name in ("flexlora", "hetlora") else {0: FULL, 1: FULL, 2: FULL}
    model, method, state = setup(method_name, train_head=False)
    shapes = {n: (layer.base.out_features, layer.base.in_features) for n, layer in adapted_layers(model).items()}
    for round_idx in range(2):
        uploads = []
        for client_id, rank in ranks.items():
            method.load_state(model, method.downlink(state, rank), rank)
            method.trainable_parameters(model, round_idx)
            tensors = method.upload(model, round_idx)
            for layer, (d, k) in shapes.items():
                assert sum(t.numel() for key, t in tensors.items() if key.startswith(f"{layer}.")) == up(rank, d, k, round_idx)
            uploads.append(Upload(client_id, 10, {key: t + 0.01 * (client_id + 1) for key, t in tensors.items()}))
        result = method.aggregate(state, uploads, round_idx)
        for rank in set(ranks.values()):
            sent = method.downlink(result.broadcast, rank)
            for layer, (d, k) in shapes.items():
                assert sum(t.numel() for key, t in sent.items() if key.startswith(f"{layer}.")) == down(rank, d, k, round_idx)
            assert set(sent) <= {f"{layer}.{kind}" for layer in shapes for kind in ("lora_A", "lora_B")}
        state = result.state
