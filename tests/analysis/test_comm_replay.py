"""`fedsim comm`'s fast replay against the slow ones, for every method at several client counts (no Ray).

- ``_schedule`` builds one client's downlink and upload a round (the clients of its schedule are alike): the same
  rows as building every client's, at 1, 2, 5 and 40 clients.
- The meta replay (``MessageReplay``: the methods' own code on meta tensors, which skips the arithmetic where only
  shapes matter) sends, client by client and round by round, the bytes the same code sends on real tensors, with
  clients of different ranks, a client that skips a round and client counts either side of FedEx-LoRA's ``auto``
  switch. ``test_measured_bytes.py`` then ties the meta replay to the bytes of real runs on Ray.
"""

import pytest
import torch

from analysis.comm import MessageReplay, _schedule, meta_state, meta_upload, method_of, numel_of
from fedsim.adapters.state import nbytes
from fedsim.methods import METHODS, Upload, method_names
from fedsim.methods.downlink import Downlinks
from fedsim.shapes import Linear, ModelShapes

RANK = 4
# Two layer shapes; at rank 4 FedEx-LoRA's auto downlink is stacked up to 2 clients and the residual from 3 on.
SHAPES = ModelShapes(
    name="tiny",
    layers=(Linear("layer.0.q", 16, 12), Linear("layer.0.v", 8, 12), Linear("layer.1.q", 16, 12)),
    head=(("classifier.weight", (3, 12)), ("classifier.bias", (3,))),
)
BERT = ModelShapes(name="bert-ish", layers=tuple(Linear(f"layer.{i}.{m}", 768, 768) for i in range(12) for m in ("query", "value")))


def variants(name: str) -> list[dict]:
    settings = [dict(v) for v in METHODS[name].comm_variants if v]
    if name == "fedex-lora":
        settings.append({"fedex_downlink": "auto"})
    return settings or [{}]


CASES = [(name, settings) for name in method_names() for settings in variants(name)]
IDS = [name + "".join(f"-{v}" for v in settings.values()) for name, settings in CASES]


def every_client_schedule(method, shapes, clients: int, rounds: int, built_at_client: bool) -> list[dict[str, int]]:
    """The slow replay: every client's downlink and upload built each round; all must be alike; client 0's row, and
    what a client new in the round receives."""
    replay = MessageReplay(method, shapes, built_at_client)
    rows = []
    for round_idx in range(rounds):
        downs = [replay.down(cid, method.rank, round_idx) for cid in range(clients)]
        joining = replay.down(clients + round_idx, method.rank, round_idx)
        ups = [replay.up(round_idx, method.rank) for _ in range(clients)]
        per_client = {(nbytes(d), nbytes(u), numel_of(d), numel_of(u)) for d, u in zip(downs, ups)}
        assert len(per_client) == 1, per_client
        rows.append({"up": nbytes(ups[0]), "down": nbytes(downs[0]), "up_n": numel_of(ups[0]), "down_n": numel_of(downs[0]),
                     "joining": nbytes(joining), "joining_n": numel_of(joining)})
        replay.aggregate(round_idx, {cid: method.rank for cid in range(clients)})
    return rows


@pytest.mark.parametrize("name, settings", CASES, ids=IDS)
@pytest.mark.parametrize("clients", [1, 2, 5, 40])
def test_one_client_a_round_equals_every_client(name, settings, clients):
    for shapes, rank in ((SHAPES, RANK), (BERT, 16)):
        method = method_of(name, rank, train_head=bool(shapes.head), **settings)
        c = method.num_clients or clients
        rounds = method.steady_round() + 2
        for built_at_client in (False, True):  # adapters.init_at: server, client
            assert _schedule(method, shapes, c, rounds, built_at_client) == every_client_schedule(method, shapes, c, rounds,
                                                                                                 built_at_client)


def real_state(method, shapes, generator) -> dict[str, torch.Tensor]:
    return {key: torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.dtype)
            for key, value in meta_state(method, shapes).items()}


def real_bytes(method, shapes, schedule: list[dict[int, int]]) -> list[dict]:
    """Per round, ``{client: (down bytes, up bytes)}`` with real tensors: random clients' uploads, the method's real
    aggregate, and the downlink rule on real states (as the runtime's aggregator runs it)."""
    generator = torch.Generator().manual_seed(0)
    state, downlinks, rows = real_state(method, shapes, generator), Downlinks(method), []
    for round_idx, ranks in enumerate(schedule):
        downs = {cid: nbytes(downlinks.message(state, cid, rank, round_idx)) for cid, rank in ranks.items()}
        uploads = []
        for cid, rank in sorted(ranks.items()):
            trained = meta_upload(method, state, round_idx, rank)  # on a real state: the client's blocks of it
            noise = {key: 0.1 * torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.dtype)
                     for key, value in trained.items()}
            uploads.append(Upload(cid, 10 + cid, {key: value + noise[key] for key, value in trained.items()}))
        result = method.aggregate(state, uploads, round_idx)
        downlinks.aggregated(state, result.state, result.broadcast, round_idx)
        state = result.state
        rows.append({u.client_id: (downs[u.client_id], nbytes(u.tensors)) for u in uploads})
    return rows


def meta_bytes(method, shapes, schedule: list[dict[int, int]]) -> list[dict]:
    replay, rows = MessageReplay(method, shapes), []
    for round_idx, ranks in enumerate(schedule):
        rows.append({cid: (nbytes(replay.down(cid, rank, round_idx)), nbytes(replay.up(round_idx, rank)))
                     for cid, rank in sorted(ranks.items())})
        replay.aggregate(round_idx, ranks)
    return rows


def alike(clients: int, rounds: int = 3) -> list[dict[int, int]]:
    return [dict.fromkeys(range(clients), RANK)] * rounds


# Clients of ranks 4, 2, 1, 3; client 3 joins in round 1; clients 1 and 2 skip round 1 and return in round 2.
HETEROGENEOUS = [{0: 4, 1: 2, 2: 1}, {0: 4, 3: 3}, {0: 4, 1: 2, 2: 1, 3: 3}, {0: 4, 1: 2, 2: 1, 3: 3}]


@pytest.mark.parametrize("name, settings", CASES, ids=IDS)
def test_meta_replay_sends_the_bytes_of_real_arithmetic(name, settings):
    method = method_of(name, RANK, train_head=True, **settings)
    schedules = [alike(1)] if method.num_clients else [alike(c) for c in (1, 2, 3, 5)] + [HETEROGENEOUS]
    for schedule in schedules:
        assert meta_bytes(method, SHAPES, schedule) == real_bytes(method, SHAPES, schedule), schedule
