"""runtime.presum: workers' weighted sums give the unsummed aggregate to float64 rounding (every method that averages
its uploads, rank-heterogeneous clients under both rank aggregations), and an error estimate within its standard error."""


import pytest
import torch
from tiny_models import make_method

from analysis.comm import meta_state, meta_upload
from fedsim.methods import METHODS, Upload
from fedsim.presum import combine, partial_sum

R = 4
LAYERS = {"layer.0": (6, 5), "layer.1": (7, 9)}
BY_MEAN = [name for name, cls in METHODS.items() if cls.aggregate is METHODS["fedit"].aggregate]


def state_for(method):
    from fedsim.shapes import Linear, ModelShapes

    shapes = ModelShapes("t", tuple(Linear(n, d, k) for n, (d, k) in LAYERS.items()), head=(("classifier.weight", (3, 5)),))
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(value.shape, generator=generator, dtype=torch.float64)
            for key, value in meta_state(method, shapes).items()}


def uploads_for(method, state, ranks, round_idx=0):
    generator = torch.Generator().manual_seed(1 + round_idx)
    uploads = []
    for client_id, rank in enumerate(ranks):
        message = meta_upload(method, state, round_idx, rank)
        uploads.append(Upload(client_id, 3 + 5 * client_id,
                              {k: v + torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in message.items()}))
    return uploads


def test_the_eligible_methods_are_those_that_average():
    assert {"fed-sb", "fedit", "ffa-lora", "rolora", "central"} <= set(BY_MEAN)
    assert not {"fedex-lora", "flora", "fra-lora", "flexlora", "hetlora", "lora-fair", "fedsvd"} & set(BY_MEAN)


@pytest.mark.parametrize("rank_aggregation", ["zero-pad", "partitioned"])
@pytest.mark.parametrize("weights", ["samples", "uniform"])
@pytest.mark.parametrize("name", BY_MEAN)
def test_worker_sums_give_the_unsummed_aggregate(name, weights, rank_aggregation):
    method = make_method(name, rank=R, weights=weights, rank_aggregation=rank_aggregation)
    state = state_for(method)
    ranks = [4, 2, 3, 4, 1, 4] if method.num_clients is None else [4]
    for round_idx in (0, 1):  # rolora trains B, then A
        uploads = uploads_for(method, state, ranks, round_idx)
        whole = method.aggregate(state, uploads, round_idx)
        shares = [uploads[i::3] for i in range(3)]  # three workers, clients interleaved
        parts = [partial_sum(method, state, share, round_idx, seed=5) for share in shares]
        summed, standard_error = combine(method, state, parts, round_idx, seed=5)
        assert summed.state.keys() == whole.state.keys()
        for key, value in whole.state.items():
            assert (summed.state[key] - value).norm() <= 1e-12 * value.norm().clamp_min(1e-300), (name, key)
        assert summed.broadcast.keys() == whole.broadcast.keys()
        if standard_error == 0.0:  # one factor uploaded: the mean gives the ideal, and the error, exactly
            assert summed.agg_error == pytest.approx(whole.agg_error, abs=1e-9)


def test_fedit_error_is_estimated_within_its_standard_error():
    method = make_method("fedit", rank=R)
    state = state_for(method)
    misses = []
    for seed in range(20):
        uploads = uploads_for(method, state, [4] * 6)
        whole = method.aggregate(state, uploads, 0)
        parts = [partial_sum(method, state, uploads[i::2], 0, seed) for i in range(2)]
        summed, standard_error = combine(method, state, parts, 0, seed)
        assert standard_error > 0 and whole.agg_error > 0.05
        misses.append(abs(summed.agg_error - whole.agg_error) / standard_error)
    assert sum(m > 3 for m in misses) <= 2  # a 3-sigma miss in at most 2 of 20 sketches
    assert sum(m > 1 for m in misses) >= 1  # and the standard error is not so large that it always covers


def test_a_method_that_does_not_average_is_refused_one_line(tmp_path):
    from fedsim.config import load_config
    from fedsim.errors import UsageError
    from fedsim.runtime.driver import Experiment
    from fedsim.storage import Location

    config = load_config(None, ["method.name=fra-lora", "runtime.presum=true", f"output_dir={tmp_path}"])
    with pytest.raises(UsageError, match=r"^runtime.presum: fra-lora does not aggregate by the weighted mean"):
        Experiment(config, Location(str(tmp_path)), resumed=False, progress=False)
