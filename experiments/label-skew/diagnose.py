"""Why Fed-SB stalls under label skew: the clients' updates of a few rounds, measured where they are averaged.

    python experiments/label-skew/diagnose.py [key=value ...]      # e.g. clients.partition=iid, method.name=fedit

Builds the run of experiments/label-skew/sst2.yaml (with the overrides) as `fedsim run` would, without Ray (the data
split, the round-0 state, one `ClientWorker` as a plain object), and for each of its rounds trains every client from the
global state, then takes the clients' weighted mean of the uploaded tensors (the aggregate of Fed-SB, FedIT, FFA-LoRA
under server.optimizer avg) as the next global state. Per round, on the run's evaluation split (the config's 400
validation phrases):

- the clients' adapter updates as weight updates, ΔW_k = B_k R_k A_k − B R A (Fed-SB; B_k A_k − B A for a plain LoRA),
  over every adapted layer: their mean pairwise cosine, and ‖mean_k ΔW_k‖ / mean_k ‖ΔW_k‖ (1: they agree; about
  1/√K = 0.32 for K = 10 unrelated updates) — how much of the clients' work survives the average — and ‖mean_k ΔW_k‖,
  the global model's step in weight space (comparable across methods: FedIT's B A and Fed-SB's B R A alike);
- the same two numbers for the head's update, where the head is trained;
- accuracy and loss of the global model, of the new adapters with the old head, and of the old adapters with the new
  head (the head's share of the round's change).
"""

from __future__ import annotations

import itertools
import sys
import tempfile

import torch

from fedsim.adapters.state import HEAD_PREFIX, key_kind, layer_names_of
from fedsim.cli import _config_from, _read_config_dict
from fedsim.runtime.driver import Experiment
from fedsim.runtime.worker import ClientWorker
from fedsim.storage import Location

CONFIG = "experiments/label-skew/sst2.yaml"


def weight_updates(state: dict, uploads: list[dict]) -> list[torch.Tensor]:
    """Each client's ΔW over every adapted layer, flattened and joined (B R A with R where the state has one)."""
    def product(tensors: dict, layer: str) -> torch.Tensor:
        b, a = tensors[f"{layer}.lora_B"].double(), tensors[f"{layer}.lora_A"].double()
        r = tensors.get(f"{layer}.lora_R")
        return b @ (r.double() @ a if r is not None else a)

    layers = layer_names_of(state)
    before = {layer: product(state, layer) for layer in layers}  # the global state's B R A, once
    return [torch.cat([(product({**state, **u["tensors"]}, layer) - before[layer]).flatten() for layer in layers])
            for u in uploads]


def agreement(updates: list[torch.Tensor], weights: list[float]) -> tuple[float, float, float]:
    """Mean pairwise cosine, ‖weighted mean‖ / weighted mean of the norms, and ‖weighted mean‖ (the global step)."""
    cosines = [float(torch.nn.functional.cosine_similarity(u, v, dim=0)) for u, v in itertools.combinations(updates, 2)]
    total = sum(weights)
    mean = sum(w * u for w, u in zip(weights, updates)) / total
    norm = float(mean.norm())
    return sum(cosines) / len(cosines), norm / float(sum(w * u.norm() for w, u in zip(weights, updates)) / total), norm


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = _config_from(_read_config_dict(CONFIG, [*sys.argv[1:], f"output_dir={folder}/run"]))
        experiment = Experiment(config, Location(config.output_dir), resumed=False, progress=False)
        experiment.prepare()
        worker = ClientWorker(experiment.plan, 0)
        state = worker.initial_state()
        chunks = list(range(experiment.plan.data.eval_chunks))
        clients = list(range(config.clients.count))

        def scored(tensors: dict) -> str:
            scores = worker.evaluate(tensors, chunks).values()
            count = sum(s["count"] for s in scores)
            return f"accuracy {sum(s['correct'] for s in scores) / count:.3f}, loss {sum(s['loss_sum'] for s in scores) / count:.4f}"

        print(f"{config.method.name} r={config.method.rank}, {config.clients.partition}"
              f"{' α=' + str(config.clients.alpha) if config.clients.partition == 'dirichlet' else ''}, lr {config.train.lr}, "
              f"{config.clients.count} clients × {config.train.local_steps} steps of {config.train.batch_size}")
        print(f"round 0 model: {scored(state)}")
        for round_idx in range(config.train.rounds):
            uploads, _ = worker.train(round_idx, state, clients, None)
            weights = [float(u["num_samples"]) for u in uploads]
            mean = {key: sum(w * u["tensors"][key].double() for w, u in zip(weights, uploads)) / sum(weights)
                    for key in uploads[0]["tensors"]}
            mean = {key: value.to(uploads[0]["tensors"][key].dtype) for key, value in mean.items()}
            cosine, kept, step = agreement(weight_updates(state, uploads), weights)
            line = (f"round {round_idx + 1}: adapters ΔW: mean pairwise cosine {cosine:+.3f}, ‖mean‖/mean‖·‖ {kept:.3f}, "
                    f"‖mean‖ {step:.3g}")
            head_keys = [key for key in mean if key.startswith(HEAD_PREFIX)]
            if head_keys:
                head_updates = [torch.cat([(u["tensors"][k].double() - state[k].double()).flatten() for k in head_keys])
                                for u in uploads]
                head_cosine, head_kept, _ = agreement(head_updates, weights)
                line += f"; head Δ: cosine {head_cosine:+.3f}, ‖mean‖/mean‖·‖ {head_kept:.3f}"
            print(line)
            adapters_only = {key: value for key, value in mean.items() if key_kind(key) != "head"}
            head_only = {key: value for key, value in mean.items() if key_kind(key) == "head"}
            print(f"  global: {scored({**state, **mean})}")
            if head_only:
                print(f"  new adapters, old head: {scored({**state, **adapters_only})}; "
                      f"old adapters, new head: {scored({**state, **head_only})}")
            state = {**state, **mean}


if __name__ == "__main__":
    main()
