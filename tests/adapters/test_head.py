"""``adapters.head_init: public``: the head fitted on the public sample is the regularised logistic regression's optimum
over what the head reads, the same every time, and a head that does not read one vector a row is refused."""

import pytest
import torch
from tiny_models import random_batches, tiny_bert, tiny_llama
from torch.nn import functional as F

from fedsim.adapters.head import L2, fit_head, head_inputs
from fedsim.errors import UsageError


def test_fitted_head_is_the_logistic_regression_optimum_and_deterministic():
    """At the fit, the objective's gradient (mean cross-entropy + L2·‖W‖², float64) vanishes to L-BFGS's tolerance
    (tolerance_grad 1e-7 on the largest entry; measured ~1e-9); fitting again gives the same bits."""
    model = tiny_bert(seed=1)
    batches = random_batches(seed=2, batch_size=8, count=6)
    head = fit_head(model, batches)
    assert set(head) == {"head:classifier.weight", "head:classifier.bias"}
    assert head["head:classifier.weight"].shape == model.classifier.weight.shape
    features, labels = head_inputs(model, batches)
    weight = head["head:classifier.weight"].double().requires_grad_(True)
    bias = head["head:classifier.bias"].double().requires_grad_(True)
    objective = F.cross_entropy(features.double() @ weight.T + bias, labels) + L2 * weight.pow(2).sum()
    gradients = torch.autograd.grad(objective, [weight, bias])
    assert max(float(g.abs().max()) for g in gradients) < 1e-5  # float32 storage of the fit: ~1e-8 relative
    at_zero = F.cross_entropy(torch.zeros(len(labels), 3, dtype=torch.float64), labels)
    assert float(objective.detach()) < float(at_zero)  # it learned something of the labels
    again = fit_head(model, batches)
    assert all(torch.equal(head[key], again[key]) for key in head)
    assert not model.training  # the model is left as it was found


def test_a_head_that_reads_every_position_is_refused():
    """Llama's sequence-classification head scores every position, then pools: not a probe of one vector a row."""
    with pytest.raises(UsageError, match=r"^adapters\.head_init: public needs a head that reads one vector a row"):
        fit_head(tiny_llama(), random_batches(seed=0, count=1))
