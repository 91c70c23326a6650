"""The local-training engine: any number of clients K ≥ 1 of a round, trained together, one forward and backward a step.

K = 1 is a cohort of one; the worker calls `train_clients` for every K. The clients share the worker's frozen base model
and differ only in small tensors (their adapters, and the classification head where it is trained), so one pass
through the base model trains them all (``fedsim.training.stacking``):

- **Loss** (``fedsim.training.losses``): Σ_k client k's own mean loss; client k's tensors touch only its rows, so its
  gradient is the one it gets alone. It is a weighted sum of records' losses, so a step's records go through the model
  in passes of similar lengths (`summed_by_record`), at most ``train.micro_batch_size`` of each client's a pass; the
  passes' gradients add up to the whole batch's.
- **Optimiser** (``fedsim.training.optimizer``): AdamW is elementwise, so one AdamW over the stacked tensors is K AdamWs,
  each over its client's own schedule; ``train.max_grad_norm`` clips each client's slice by its own norm.
- **DP-SGD** (``fedsim.training.private``; Abadi et al. 2016): with ``privacy``, every record's own gradient is clipped to
  its client's C over all the client's trained tensors, and each client's sum gets its own Gaussian noise, exactly as
  Opacus does for the client alone (the tests compare them); ``train.max_grad_norm`` is then not used.
- **Rules** (``fedsim.training.rules``): what shapes local training beyond the data loss (FedProx's proximal term,
  SCAFFOLD's control variates) adds a correction to each client's gradient every step, and says at the end what the
  client sends and keeps besides the method's tensors. The engine does not know which rule it runs.
- **Results**: each client's slice is copied back into the model and the method builds what it sends (``upload``) and
  keeps (``keep``), as for a lone client. A client that has taken its steps (``train.local_epochs`` gives each its own
  number) has its slice copied out then, and its rows leave the batch.

Method-agnostic: for each client the method loads its state (``load_state``, at its rank) and names what it trains
(``trainable_parameters``). ``train_s``: the clients train at once, so each client's share of the wall time is in
proportion to the tokens (attention-mask ones) it trained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.adapters.layers import leading_block
from fedsim.adapters.state import State
from fedsim.config import TrainConfig
from fedsim.methods.base import Method
from fedsim.privacy import PrivacySettings
from fedsim.data import IGNORE_INDEX
from fedsim.training.batches import PASS_COST_TOKENS, cohort_batch, pad_token_id, record_passes, record_widths, row_tokens
from fedsim.training.losses import TASKS, record_losses
from fedsim.training.optimizer import StackedAdamW, clip_per_client
from fedsim.training.private import clipped_records, noise_client_sums
from fedsim.training.rules import LocalRule
from fedsim.training.schedule import TrainStats, lr_factor
from fedsim.training.stacking import Cohort, Segments, stack_clients, stacked_forward

Batch = dict[str, torch.Tensor]


@dataclass
class ClientResult:
    """One client's round: what it sends, how its training went, what it keeps in the client store (the method's kept
    tensors and the rules' own)."""

    upload: State
    stats: TrainStats
    kept: State


def train_clients(
    model: nn.Module,
    method: Method,
    round_idx: int,
    states: Sequence[State],
    ranks: Sequence[int | None],
    batches: Sequence[Iterator[Batch | None]],
    train: TrainConfig,
    steps: Sequence[int],
    seed: int,
    task: str = "classification",
    privacy: Sequence[PrivacySettings] | None = None,
    noise_seeds: Sequence[int] | None = None,
    rules: Sequence[LocalRule] = (),
) -> list[ClientResult]:
    """Train K clients together; return each client's `ClientResult`.

    Per client k: its starting ``states[k]`` and rank ``ranks[k]`` (None: the method's), its endless ``batches[k]`` (on
    the model's device) and its ``steps[k]`` steps of AdamW (``train``'s settings, the schedule over its own steps).
    ``seed`` seeds torch for the pass (dropout).

    ``privacy`` (one ``PrivacySettings`` per client) makes every step a DP-SGD step of each client: ``batches[k]`` are
    then Poisson batches (``None`` for an empty one), and client k's noise comes from a generator seeded with
    ``noise_seeds[k]`` (its training seed, as Opacus's would be seeded for the client alone). ``rules``: each already
    holds the cohort's clients' own inputs (``LocalRule``).
    """
    if task not in TASKS:
        raise ValueError(f"training: unknown task '{task}'; valid: {', '.join(TASKS)}")
    K = len(states)
    if not (len(ranks) == len(batches) == len(steps) == K):
        raise ValueError("training: states, ranks, batches and steps must have one entry per client")
    if privacy is not None and not (len(privacy) == len(noise_seeds or ()) == K):
        raise ValueError("training: under DP, privacy and noise_seeds must have one entry per client")
    start = time.perf_counter()
    cohort = stack_clients(model, method, round_idx, states, ranks)
    trained = list(cohort.trained.values())
    optimizer = StackedAdamW(trained)
    for rule in rules:
        rule.begin({key: tensor.detach().clone() for key, tensor in cohort.trained.items()}, cohort.shapes)
    finals: list[dict[str, torch.Tensor] | None] = [None] * K
    losses: list[list[float]] = [[] for _ in range(K)]
    tokens = [0.0] * K  # attention-mask ones each client trained
    device = trained[0].device if trained else next(model.parameters()).device
    pad_id = pad_token_id(model)
    pass_cost = PASS_COST_TOKENS.get(device.type, PASS_COST_TOKENS["cuda"])
    generators = [torch.Generator(device=device).manual_seed(s) for s in noise_seeds] if privacy is not None else []
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    if use_cache is not None:
        model_config.use_cache = False
    torch.manual_seed(seed)
    model.train()
    try:
        with stacked_forward(cohort):
            for step in range(max(steps)):
                active = [k for k in range(K) if step < steps[k]]
                step_batches = [next(batches[k]) for k in active]
                measured = torch.zeros(2, K, dtype=torch.float64, device=device)  # each client's loss and tokens this step
                if privacy is None:
                    if any(b is None for b in step_batches):
                        raise ValueError("training: an empty batch (Poisson sampling is for DP: pass privacy)")
                    present = summed_by_record(model, cohort, step_batches, active, task, pad_id, pass_cost, measured,
                                               _max_rows(train.micro_batch_size, len(active)))
                    grads = {key: tensor.grad for key, tensor in cohort.trained.items()}
                else:
                    present = [k for k, b in zip(active, step_batches) if b is not None]  # an empty batch: noise only
                    grads = _private_gradients(model, cohort, [b for b in step_batches if b is not None], present, active, task,
                                               pad_id, pass_cost, train.micro_batch_size, privacy, generators, measured)
                _apply_rules(rules, cohort, grads, active)
                if privacy is None:
                    clip_per_client(trained, [train.max_grad_norm] * K)
                lrs = [train.lr * lr_factor(step, train, steps[k], round_idx) for k in range(K)]
                decays = [train.weight_decay] * K
                for k in range(K):
                    if k not in active:  # its slice is kept aside: any value will do
                        lrs[k], decays[k] = lrs[active[0]], decays[active[0]]
                optimizer.step(lrs, decays)
                optimizer.zero_grad()
                values = measured.tolist()  # one device round trip a step
                for k in active:
                    losses[k].append(values[0][k] if k in present else float("nan"))  # NaN: nothing to learn from
                    tokens[k] += values[1][k]
                    if step + 1 == steps[k] < max(steps):  # done before the others: keep its slice as it is now
                        finals[k] = {key: tensor[k].detach().clone() for key, tensor in cohort.trained.items()}
    finally:
        if use_cache is not None:
            model_config.use_cache = use_cache
        model.eval()
    results = _results(model, method, round_idx, states, ranks, cohort, finals, rules, steps)
    wall = time.perf_counter() - start
    total_tokens = sum(tokens) or 1.0
    for k, result in enumerate(results):
        finite = [value for value in losses[k] if value == value]
        result.stats = TrainStats(steps=len(losses[k]), train_loss=sum(finite) / len(finite) if finite else float("nan"),
                                  train_s=wall * tokens[k] / total_tokens, losses=losses[k])
    return results


def summed_by_record(model: nn.Module, cohort: Cohort, batches: list[Batch], clients: list[int], task: str, pad_id: int,
                     pass_cost: int, measured: torch.Tensor, max_rows: int | None = None) -> list[int]:
    """Σ_k client k's mean loss, backward; each client's loss and tokens into ``measured`` (2, K). Returns the clients
    with something to learn from (a causal-LM batch with no labelled token has no loss).

    The loss is a weighted sum of records' own losses (classification: 1/n_k each; causal LM: a record's labelled
    tokens over its client's), so, as for DP-SGD's clipped sums, the passes are planned over records, not clients: the
    step's records sorted by their own length (`record_passes`, at most ``max_rows`` a pass), each pass cut to its
    longest record. Short texts in a batch padded to its longest one cost their own length, not the batch's.
    """
    K, device = measured.shape[1], measured.device
    inputs, labels, sizes = cohort_batch(batches, pad_id)  # every record, client after client
    counted = (labels[:, 1:] != IGNORE_INDEX).sum(1) if labels.dim() >= 2 else torch.ones(len(labels), dtype=torch.long)
    counted = counted.cpu().double()
    row_clients = [k for k, n in zip(clients, sizes) for _ in range(n)]
    totals = torch.zeros(K, dtype=torch.float64).index_add_(0, torch.tensor(row_clients), counted)
    present = [k for k in clients if totals[k] > 0]
    weights = counted / totals[row_clients].clamp(min=1)
    kept = [r for r in range(len(row_clients)) if weights[r] > 0]
    widths = record_widths(inputs, labels)
    for positions in record_passes(widths[kept].tolist(), pass_cost, max_rows):
        rows = [kept[p] for p in positions]
        part, part_labels, pass_clients, runs = record_pass(inputs, labels, widths, rows, row_clients)
        cohort.current[0] = Segments([pass_clients.count(k) for k in runs], runs, K, device)
        per_record = record_losses(model(**part).logits, part_labels, task)
        weighted = per_record * weights[rows].to(device=device, dtype=per_record.dtype)
        weighted.sum().backward()
        row_client = torch.tensor(pass_clients).to(device)
        measured[0].index_add_(0, row_client, weighted.detach().double())
        measured[1].index_add_(0, row_client, row_tokens(part).double())
    return present


def record_pass(inputs: Batch, labels: torch.Tensor, widths: torch.Tensor, rows: list[int],
                row_clients: list[int]) -> tuple[Batch, torch.Tensor, list[int], list[int]]:
    """The step's records ``rows`` (ascending positions in the cohort batch), cut to the longest of them (``widths``:
    every record's own length): (inputs, labels, each record's client, the clients in the order their records come)."""
    index = torch.tensor(rows).to(labels.device)
    width = int(widths[rows].max())
    part = {key: value.index_select(0, index)[:, :width] if value.dim() >= 2 else value.index_select(0, index)
            for key, value in inputs.items()}
    part_labels = labels.index_select(0, index)
    part_labels = part_labels[:, :width] if part_labels.dim() >= 2 else part_labels
    pass_clients = [row_clients[r] for r in rows]  # ascending rows: each client's records one after the other
    runs = [k for i, k in enumerate(pass_clients) if i == 0 or k != pass_clients[i - 1]]
    return part, part_labels, pass_clients, runs


def _max_rows(micro_batch_size: int | None, clients: int) -> int | None:
    """A pass's most records: ``train.micro_batch_size`` of each client of the step."""
    return None if micro_batch_size is None else micro_batch_size * max(1, clients)


def _private_gradients(model: nn.Module, cohort: Cohort, batches: list[Batch], present: list[int], active: list[int], task: str,
                       pad_id: int, pass_cost: int, micro_batch_size: int | None, privacy: Sequence[PrivacySettings],
                       generators: Sequence[torch.Generator], measured: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step's DP-SGD gradient of every active client (key → (K, …)): its records' clipped sum, its noise, over its
    expected batch size. At most ``micro_batch_size`` records of each client present in one pass."""
    sums = clipped_sums_by_record(model, cohort, batches, present, task, pad_id, pass_cost, [p.max_grad_norm for p in privacy],
                                  measured, _max_rows(micro_batch_size, len(present)))
    noise_client_sums(cohort, sums, active, privacy, generators)
    for key, tensor in cohort.trained.items():
        tensor.grad = sums[key]
    return sums


def clipped_sums_by_record(model: nn.Module, cohort: Cohort, batches: list[Batch], clients: list[int], task: str, pad_id: int,
                           pass_cost: int, max_norms: Sequence[float], measured: torch.Tensor,
                           max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Each record's own gradient clipped to its client's C (`clipped_records`), summed per client: key → (K, …); each
    client's mean record loss and tokens into ``measured`` (2, K).

    A record's gradient does not depend on the other rows of its pass, so the passes are planned over records, not
    clients: the step's records sorted by their own length (`record_passes`, at most ``max_rows`` a pass), each pass
    cut to its longest record.
    """
    K, device = measured.shape[1], measured.device
    sums = {key: torch.zeros_like(tensor) for key, tensor in cohort.trained.items()}
    if not batches:
        return sums
    inputs, labels, sizes = cohort_batch(batches, pad_id)  # every record, client after client
    row_clients = [k for k, n in zip(clients, sizes) for _ in range(n)]
    widths = record_widths(inputs, labels)
    for rows in record_passes(widths.tolist(), pass_cost, max_rows):
        part, part_labels, pass_clients, runs = record_pass(inputs, labels, widths, rows, row_clients)
        segments = cohort.current[0] = Segments([pass_clients.count(k) for k in runs], runs, K, device, per_sample=True)
        per_record = record_losses(model(**part).logits, part_labels, task)
        gradients = torch.autograd.grad(per_record.sum(), [leaf for _, leaf in segments.samples], allow_unused=True)
        for key, clipped in clipped_records(segments, gradients, max_norms).items():
            sums[key].index_add_(0, segments.row_client, clipped)
        segments.samples.clear()
        measured[0].index_add_(0, segments.row_client, per_record.detach().double())
        measured[1].index_add_(0, segments.row_client, row_tokens(part).double())
    counts = torch.ones(K, dtype=torch.float64)
    counts[clients] = torch.tensor(sizes, dtype=torch.float64)
    measured[0] /= counts.to(device)
    return sums


def _apply_rules(rules: Sequence[LocalRule], cohort: Cohort, grads: dict[str, torch.Tensor | None], active: list[int]) -> None:
    """Every rule's correction of the step's gradient, each computed from the data gradient, then added."""
    if not rules:
        return
    data = {key: grad if grad is not None else torch.zeros_like(cohort.trained[key]) for key, grad in grads.items()}
    corrections = [rule.correction(cohort.trained, data, active) for rule in rules]
    for key, tensor in cohort.trained.items():
        total = data[key]
        for correction in corrections:
            if key in correction:
                total = total + correction[key]
        tensor.grad = total


def _results(model: nn.Module, method: Method, round_idx: int, states: Sequence[State], ranks: Sequence[int | None], cohort: Cohort,
             finals: list[dict[str, torch.Tensor] | None], rules: Sequence[LocalRule], steps: Sequence[int]) -> list[ClientResult]:
    """Each client's slice copied back into the model, its upload and what it keeps (the method's, then the rules').
    The model still holds the last client's state (``stack_clients`` loaded it last): that client goes first."""
    K = len(states)
    results: list[ClientResult | None] = [None] * K
    for position, k in enumerate([K - 1, *range(K - 1)]):
        final = finals[k] or {key: tensor[k] for key, tensor in cohort.trained.items()}
        if position > 0:
            method.load_state(model, states[k], ranks[k])
        with torch.no_grad():
            for key, param in method.trainable_parameters(model, round_idx).items():
                param.copy_(leading_block(final[key], param.shape))
        upload, kept = method.upload(model, round_idx), method.keep(model, round_idx)
        for rule in rules:
            sent, own = rule.finish(k, {key: leading_block(value, cohort.shapes[k][key]) for key, value in final.items()}, steps[k])
            upload, kept = {**upload, **sent}, {**kept, **own}
        results[k] = ClientResult(upload, None, kept)
    return results
