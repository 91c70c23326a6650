"""server.optimizer (Reddi et al. 2021, arXiv:2003.00295): each optimizer's step against the paper's Algorithm 2 written
out by hand in float64 over 3 rounds; avg at lr 1 is the aggregate itself; the aggregator steps only the averaged
tensors, broadcasts what it stepped, checkpoints m and v; the methods whose aggregate is no mean refuse, in one line."""

import math

import pytest
import torch
from safetensors.torch import load, save
from tiny_models import make_method

from analysis.comm import meta_state, meta_upload
from fedsim.config import load_config
from fedsim.errors import UsageError
from fedsim.methods import METHODS, Upload, build_method
from fedsim.presum import partial_sum
from fedsim.runtime.aggregator import Aggregator
from fedsim.runtime.plan import RunPlan
from fedsim.server_optimizer import ServerOptimizer, check_server_optimizer
from fedsim.shapes import Linear, ModelShapes

SETTINGS = {"avg": {"lr": 0.5}, "avgm": {"lr": 0.7, "momentum": 0.8}, "adam": {"lr": 0.01, "betas": (0.9, 0.99), "tau": 1e-3},
            "yogi": {"lr": 0.01, "betas": (0.8, 0.95), "tau": 1e-2}}
NOT_MEANS = {"fedex-lora", "flora", "fra-lora", "fra-then-ffa", "fedsvd", "flexlora", "lora-fair"}


def by_hand(name, x0, aggregates, lr, momentum=0.9, betas=(0.9, 0.99), tau=1e-3):
    """Algorithm 2 of the paper, one entry at a time in Python floats: m₋₁ = 0, v₋₁ = τ², no bias correction; each round's
    aggregate is given as an offset from the current x (x̄ = x + offset)."""
    b1, b2 = betas
    xs = []
    for j, x in enumerate(x0):
        m, v = 0.0, tau**2
        path = []
        for offsets in aggregates:
            delta = (x + offsets[j]) - x
            if name == "avg":
                x = x + lr * delta
            elif name == "avgm":
                m = momentum * m + delta
                x = x + lr * m
            else:
                m = b1 * m + (1 - b1) * delta
                if name == "adam":
                    v = b2 * v + (1 - b2) * delta * delta
                else:
                    v = v - (1 - b2) * delta * delta * math.copysign(1.0, v - delta * delta) * (v != delta * delta)
                x = x + lr * m / (math.sqrt(v) + tau)
            path.append(x)
        xs.append(path)
    return [[xs[j][t] for j in range(len(x0))] for t in range(len(aggregates))]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_optimizer_is_the_papers_step_by_hand_over_three_rounds(name):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, generator=generator, dtype=torch.float64)
    offsets = [torch.randn(7, generator=generator, dtype=torch.float64) * scale for scale in (1e-2, 3e-3, 5e-2)]
    offsets[1][2] = 0.0  # an entry no client moved this round
    expected = by_hand(name, x.tolist(), [o.tolist() for o in offsets], **SETTINGS[name])
    optimizer = ServerOptimizer(name, **SETTINGS[name])
    for round_idx, offset in enumerate(offsets):
        x = optimizer.step({"w": x}, {"w": x + offset})["w"]
        assert x.dtype == torch.float64
        assert torch.allclose(x, torch.tensor(expected[round_idx], dtype=torch.float64), rtol=1e-13, atol=0), (name, round_idx)
    assert set(optimizer.m) == (set() if name == "avg" else {"w"}) and set(optimizer.v) == ({"w"} if name in ("adam", "yogi") else set())


def test_avg_at_lr_1_returns_the_aggregate_itself():
    optimizer = ServerOptimizer("avg", lr=1.0)
    previous, aggregate = {"w": torch.zeros(3, dtype=torch.bfloat16)}, {"w": torch.tensor([0.1, 2.0, -3.0], dtype=torch.bfloat16)}
    assert optimizer.is_identity and optimizer.step(previous, aggregate)["w"] is aggregate["w"]
    assert not ServerOptimizer("avgm", lr=1.0).is_identity and not ServerOptimizer("avg", lr=0.5).is_identity


def test_the_step_is_taken_in_float64_and_cast_back():
    """A float32 tensor's step: float64 arithmetic, then one rounding to float32 (the moments stay float64)."""
    optimizer = ServerOptimizer("adam", lr=1e-3)
    x, mean = torch.tensor([1.0, -2.0], dtype=torch.float32), torch.tensor([1.0 + 2**-20, -2.0], dtype=torch.float32)
    new = optimizer.step({"w": x}, {"w": mean})["w"]
    delta = mean.double() - x.double()
    m, v = 0.1 * delta, 0.99 * 1e-6 + 0.01 * delta**2
    assert new.dtype == torch.float32 and torch.equal(new, (x.double() + 1e-3 * m / (v.sqrt() + 1e-3)).float())
    assert optimizer.m["w"].dtype == optimizer.v["w"].dtype == torch.float64


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi"])
def test_moments_saved_and_reloaded_continue_bit_for_bit(name):
    generator = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}
    offsets = [{k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in x.items()} for _ in range(3)]
    whole = ServerOptimizer(name, lr=0.01)
    after_one = whole.step(x, {k: x[k] + offsets[0][k] for k in x})
    resumed = ServerOptimizer(name, lr=0.01)
    resumed.load_state_dict(load(save(whole.state_dict())))  # through safetensors bytes, as the checkpoint does
    finals = []
    for optimizer in (whole, resumed):
        y = after_one
        for offset in offsets[1:]:
            y = optimizer.step(y, {k: y[k] + offset[k] for k in y})
        finals.append(y)
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in x)


# -- which methods: a weighted mean, or a refusal in one line --------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_whose_aggregate_is_no_mean_refuse_a_server_step_in_one_line(name):
    config = load_config(None, [f"method.name={name}", "server.optimizer=adam", "server.lr=0.01"])
    method = build_method(config.method, config.clients, config.seed)
    check_server_optimizer(method, load_config(None, ["server.optimizer=avg", "server.lr=1"]).server, 5)  # the identity: any method
    if name not in NOT_MEANS:
        check_server_optimizer(method, config.server, config.train.rounds)
        return
    with pytest.raises(UsageError) as refused:
        check_server_optimizer(method, config.server, config.train.rounds)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"server.optimizer: adam steps on the change of the averaged tensors, but "
                                                      f"{name} does not aggregate by a weighted mean")
    assert "use server.optimizer=avg server.lr=1" in message and "fed-sb, fedit" in message and f", {name}," not in message
    with pytest.raises(UsageError, match=r"^server.lr: 0.5 \(with server.optimizer=avg\)"):
        check_server_optimizer(method, load_config(None, ["server.lr=0.5"]).server, 3)


def test_fra_then_ffa_steps_only_when_every_round_is_ffa_and_the_refusal_is_at_plan_time(tmp_path):
    from fedsim.runtime.driver import Experiment
    from fedsim.storage import Location

    method = make_method("fra-then-ffa", switch_round=0)
    check_server_optimizer(method, load_config(None, ["server.optimizer=yogi"]).server, 4)
    with pytest.raises(UsageError, match=r"fra-then-ffa does not aggregate by a weighted mean of the clients' trained tensors in "
                                         r"rounds 0–1 \(FRA before"):
        check_server_optimizer(make_method("fra-then-ffa", switch_round=2), load_config(None, ["server.optimizer=yogi"]).server, 4)
    config = load_config(None, ["method.name=flora", "server.optimizer=avgm", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(UsageError, match=r"^server.optimizer: avgm steps .* but flora does not"):
        Experiment(config, Location(str(tmp_path / "out")), resumed=False, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_server_settings_name_the_key():
    for override, expected in (("server.optimizer=sgd", r"^server.optimizer: unknown server optimizer 'sgd'; valid: avg, avgm"),
                               ("server.lr=0", r"^server.lr: must be > 0"), ("server.momentum=1", r"^server.momentum: must be in \[0, 1\)"),
                               ("server.betas=[0.9]", r"^server.betas: must be two numbers in \[0, 1\)"),
                               ("server.betas=[0.9,1.5]", r"^server.betas: must be two numbers"),
                               ("server.betas=fast", r"^server.betas: expected a list of numbers"), ("server.tau=-1", r"^server.tau: must be > 0")):
        with pytest.raises(UsageError, match=expected):
            load_config(None, [override])
    assert load_config(None, ["server.betas=[0, 1e-3]"]).server.betas == [0.0, 0.001]


# -- the aggregator: which tensors, the broadcast, the checkpoint ----------------------------------------------------------

LAYERS = {"layer.0": (6, 5), "layer.1": (7, 9)}


def aggregator(*overrides, ranks=(4,) * 6) -> Aggregator:
    config = load_config(None, ["method.rank=4", *overrides])
    method = build_method(config.method, config.clients, config.seed)
    shapes = ModelShapes("t", tuple(Linear(n, d, k) for n, (d, k) in LAYERS.items()), head=(("classifier.weight", (3, 5)),))
    generator = torch.Generator().manual_seed(0)
    result = Aggregator(RunPlan(config, method, None, tuple(ranks), "unused"))
    result.set_state({key: torch.randn(value.shape, generator=generator, dtype=torch.float32)
                      for key, value in meta_state(method, shapes).items()})
    return result


def uploads(agg: Aggregator, round_idx: int) -> list[Upload]:
    generator = torch.Generator().manual_seed(10 + round_idx)
    method, state = agg.method, agg.state
    return [Upload(cid, 3 + 5 * cid, {k: v + 0.05 * torch.randn(v.shape, generator=generator)
                                      for k, v in meta_upload(method, state, round_idx, rank).items()})
            for cid, rank in enumerate(agg.plan.client_ranks)]


def sent(batch: list[Upload]) -> list[dict]:
    return [{"client_id": u.client_id, "num_samples": u.num_samples, "tensors": u.tensors} for u in batch]


@pytest.mark.parametrize("name", ["fed-sb", "fedit", "fedsa-lora", "rolora", "hetlora"])
def test_avg_at_lr_1_is_the_method_bit_for_bit_and_adam_steps_only_the_averaged_tensors(name):
    plain, identity, adam = (aggregator(f"method.name={name}", *extra, ranks=(4, 2, 3, 4)) for extra in
                             ((), ("server.optimizer=avg", "server.lr=1"), ("server.optimizer=adam", "server.lr=0.01")))
    for round_idx in range(3):
        before, batch = dict(adam.state), uploads(adam, round_idx)
        for agg in (plain, identity):
            agg.aggregate(round_idx, [0, 1, 2, 3], sent(uploads(agg, round_idx)))
        assert all(torch.equal(plain.state[k], identity.state[k]) for k in plain.state)
        expected = adam.method.aggregate(before, batch, round_idx)
        adam.aggregate(round_idx, [0, 1, 2, 3], sent(batch))
        kinds = adam.method.averaged_kinds(round_idx)
        stepped = {k for k in before if not torch.equal(adam.state[k], expected.state[k])}
        assert stepped and all(k.rsplit(".", 1)[-1] in kinds or k.startswith("head:") for k in stepped)
        assert all(torch.equal(adam.state[k], before[k]) for k in before if k not in expected.broadcast)  # kept B, frozen A
        assert all(adam.downlinks.broadcast[k].shape == expected.broadcast[k].shape for k in expected.broadcast)
        assert adam.downlinks.broadcast.keys() == expected.broadcast.keys()  # the same message, bytes unchanged
    if name == "fedsa-lora":
        assert all(torch.equal(adam.state[k], before[k]) for k in before if k.endswith(".lora_B"))
    assert not plain.server_optimizer.m and set(adam.server_optimizer.v) <= set(adam.state)


def test_zero_padded_clients_step_on_aggregate_minus_previous():
    """Rank-heterogeneous Fed-SB: the pseudo-gradient is the zero-padded mean minus the previous R, entry by entry."""
    agg = aggregator("method.name=fed-sb", "server.lr=0.5", ranks=(1, 2, 4))
    before, batch = dict(agg.state), uploads(agg, 0)
    mean = agg.method.aggregate(before, batch, 0).state
    agg.aggregate(0, [0, 1, 2], sent(batch))
    for key in before:
        if key.endswith(".lora_R"):
            assert torch.equal(agg.state[key], (before[key].double() + 0.5 * (mean[key].double() - before[key].double())).float())


def test_the_stepped_tensors_go_down_and_the_checkpoint_resumes_bit_for_bit(tmp_path):
    whole, stopped = aggregator("method.name=fedit", "server.optimizer=yogi", "server.lr=0.02"), \
        aggregator("method.name=fedit", "server.optimizer=yogi", "server.lr=0.02")
    for round_idx in range(2):
        for agg in (whole, stopped):
            agg.aggregate(round_idx, list(range(6)), sent(uploads(agg, round_idx)))
    stem = stopped.checkpoint(str(tmp_path), 1)
    saved = load((tmp_path / "round_0001.safetensors").read_bytes())
    moments = {k for k in saved if k.startswith("server:optimizer.")}
    assert moments == {f"server:optimizer.{m}:{k}" for m in "mv" for k in whole.state if not k.endswith("lora_R")}
    resumed = aggregator("method.name=fedit", "server.optimizer=yogi", "server.lr=0.02")
    assert resumed.restore(stem) == 1 and resumed.state.keys() == whole.state.keys()
    for agg in (whole, resumed):
        agg.aggregate(2, list(range(6)), sent(uploads(agg, 2)))
    assert all(torch.equal(whole.state[k], resumed.state[k]) for k in whole.state)
    assert all(torch.equal(whole.server_optimizer.v[k], resumed.server_optimizer.v[k]) for k in whole.server_optimizer.v)
    # a returning client receives the stepped tensors: the state the workers are sent is the stepped one
    message = whole.downlinks.message(whole.state, 0, 4, 4)  # client 0 last received round 2's state: what changed since
    assert all(message[k] is whole.state[k] for k in message)


def test_presummed_uploads_then_the_step_match_the_plain_path():
    plain, summed = aggregator("method.name=fedit", "server.optimizer=adam", "server.lr=0.01"), \
        aggregator("method.name=fedit", "server.optimizer=adam", "server.lr=0.01", "runtime.presum=true")
    for round_idx in range(2):
        batch = uploads(plain, round_idx)
        plain.aggregate(round_idx, list(range(6)), sent(batch))
        parts = [partial_sum(summed.method, summed.state, batch[i::2], round_idx, 0) for i in range(2)]
        summed.aggregate(round_idx, list(range(6)), parts)
    for key, value in plain.state.items():
        assert (summed.state[key] - value).norm() <= 1e-5 * value.norm(), key
