"""A new classification head fitted on public data (``adapters.head_init: public``): a linear probe of the round-0 model.

Why (measured, experiments/README.md, experiment 2b): under DP-SGD a randomly initialised head takes ~90–97% of every
record's gradient norm, so clipping leaves the adapters almost nothing but noise, and the noised head itself swings (its
770 numbers move by the learning rate every AdamW step whatever their signal). Fitting the head once on the public
calibration sample (held out of every client, so no client's ε is spent) and freezing it (``method.train_head: false``)
gives the whole clipping budget to the adapters. Linear probing before fine-tuning is the usual remedy for a random head
(Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features", arXiv:2202.10054, LP-FT).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.adapters.state import HEAD_PREFIX, State, head_parameters
from fedsim.errors import UsageError

L2 = 1e-2  # λ‖W‖² added to the mean cross-entropy: the probe of a few hundred rows does not grow without bound
LBFGS_STEPS = 200


def head_module(model: nn.Module) -> nn.Linear:
    """The one linear layer that holds every head parameter."""
    names = {name.rsplit(".", 1)[0] for name in head_parameters(model)}
    module = model.get_submodule(names.pop()) if len(names) == 1 else None
    if not isinstance(module, nn.Linear):
        raise UsageError("adapters.head_init: public fits a linear classification head; this model's head is not one "
                         "linear layer; use adapters.head_init=random")
    return module


@torch.no_grad()
def head_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels): what the head reads for each row (its input), the model in eval mode."""
    head, features = head_module(model), []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].detach()))
    device = head.weight.device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**{key: value.to(device) for key, value in batch.items() if key != "labels"})
    finally:
        hook.remove()
        model.train(was_training)
    inputs = torch.cat(features)
    if inputs.dim() != 2:
        raise UsageError("adapters.head_init: public needs a head that reads one vector a row (a pooled sequence "
                         "classifier such as BERT's); this one reads every position; use adapters.head_init=random")
    return inputs, torch.cat([batch["labels"] for batch in batches]).to(inputs.device)


def fit_head(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> State:
    """The head's state (``head:`` keys, the head's dtype, on the CPU): multinomial logistic regression of the labels on
    the head's inputs, in float64 from zero by L-BFGS (deterministic), with ``L2`` on the weight."""
    head = head_module(model)
    features, labels = head_inputs(model, batches)
    features = features.to("cpu", torch.float64)
    labels = labels.to("cpu")
    weight = torch.zeros(head.out_features, head.in_features, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(head.out_features, dtype=torch.float64, requires_grad=head.bias is not None)
    fitted = [weight, bias] if head.bias is not None else [weight]
    optimizer = torch.optim.LBFGS(fitted, max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(features @ weight.T + bias, labels) + L2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    values = {"weight": weight, "bias": bias}
    return {HEAD_PREFIX + name: values[name.rsplit(".", 1)[1]].detach().to(param.dtype).contiguous()
            for name, param in head_parameters(model).items()}
