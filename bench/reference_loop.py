"""The reference: Fed-SB as published research code runs it — one Python process, a loop over the clients,
a ``copy.deepcopy`` of the adapted model for every client, train R (and the head), average R.

    python bench/reference_loop.py --clients 100 --rounds 2 [--model tiny-bert] [--workload sst2 --train-limit 16000]

Same model, data (the same workload loader and partition as fedsim), local steps, batch size, rank and
learning rate as the fedsim run it is compared with. It reuses fedsim's LoRA-SB injection
(``FedSB.prepare``) and initialisation (``accumulate_gradients`` → ``FedSB.init_state``) and fedsim's
tokenised rows and batches, so that what differs is only the loop: a single process and a deep copy of
the model per client. Prints one JSON line (timings, peak RSS) on stdout; bench/scale.py runs it as a child
process and samples its memory from outside too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time

import common  # noqa: F401  (environment, sys.path)


def run_reference(config, rounds: int) -> dict:
    import numpy as np
    import torch

    from fedsim.adapters.init import accumulate_gradients
    from fedsim.adapters.layers import adapted_layers
    from fedsim.data import TokenizedRows
    from fedsim.methods.fed_sb import FedSB
    from fedsim.modeling import load_model, load_tokenizer
    from fedsim.partition import partition
    from fedsim.seeds import derive_seed, rng
    from workloads import load_workload

    started = time.perf_counter()
    c = config
    workload = load_workload(c.workload.name, c.workload.path, c.workload.train_limit, c.workload.eval_limit, c.seed,
                             **c.workload.options)
    client_of_row = partition(workload.train_labels, c.clients.count, c.clients.partition, alpha=c.clients.alpha,
                              seed=derive_seed(c.seed, "partition"), dominant_share=c.clients.dominant_share)
    tokenizer = load_tokenizer(c)
    clients = [TokenizedRows(workload.train.take(np.flatnonzero(client_of_row == cid)), tokenizer, c.workload.max_length)
               for cid in range(c.clients.count)]
    model = load_model(c, workload.num_labels)
    method = FedSB(c.method, c.clients, c.seed)
    method.prepare(model, c.model.target_modules)

    # LoRA-SB initialisation from a pooled calibration sample (as fedsim's default adapters.init_data=pooled)
    share = max(1, math.ceil(c.adapters.init_samples / c.clients.count))
    batches = []
    for cid in range(min(c.clients.count, c.adapters.init_samples)):
        rows = clients[cid]
        take = min(len(rows), share)
        order = rng(c.seed, "init-sample", cid).permutation(len(rows))[:take]
        batches += [rows.batch(order[i : i + c.adapters.init_batch_size]) for i in range(0, take, c.adapters.init_batch_size)]
    layer_names = [f"{name}.base_layer" for name in adapted_layers(model)]
    grads = {n.removesuffix(".base_layer"): g for n, g in accumulate_gradients(model, layer_names, batches).items()}
    state = method.init_state(model, grads, c.adapters.init_lr or c.train.lr)
    method.load_state(model, state)

    def trainable(m) -> dict[str, torch.nn.Parameter]:
        m.requires_grad_(False)
        params = {n: p for n, p in m.named_parameters() if n.endswith("lora_R.weight") or n.startswith("classifier.")}
        for p in params.values():
            p.requires_grad_(True)
        return params

    def train_client(local, params, round_idx: int, cid: int) -> None:
        optimizer = torch.optim.AdamW(list(params.values()), lr=c.train.lr, weight_decay=c.train.weight_decay)
        torch.manual_seed(derive_seed(c.seed, "training", round_idx, cid))
        data = clients[cid].batches(c.train.batch_size, derive_seed(c.seed, "batches", round_idx, cid))
        local.train()
        for _ in range(c.train.local_steps):
            loss = local(**next(data)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()

    # warm-up (untimed): one client, so that round 0 is not the first call of every kernel
    warm = copy.deepcopy(model)
    train_client(warm, trainable(warm), 999_999, 0)
    del warm
    setup_s = time.perf_counter() - started

    round_s, train_s, copy_s = [], [], []
    for round_idx in range(rounds):
        round_start = time.perf_counter()
        sampled = sorted(rng(c.seed, "sampling", round_idx).choice(
            c.clients.count, size=c.clients.per_round, replace=False).tolist())
        uploads, sizes, round_train, round_copy = [], [], 0.0, 0.0
        for cid in sampled:
            t0 = time.perf_counter()
            local = copy.deepcopy(model)  # the published loop: a whole model per client
            round_copy += time.perf_counter() - t0
            params = trainable(local)
            t1 = time.perf_counter()
            train_client(local, params, round_idx, cid)
            round_train += time.perf_counter() - t1
            uploads.append({n: p.detach().clone() for n, p in params.items()})
            sizes.append(len(clients[cid]))
            del local, params
        total = sum(sizes)
        with torch.no_grad():
            global_params = dict(model.named_parameters())
            for name in uploads[0]:
                mean = sum(u[name].double() * (n / total) for u, n in zip(uploads, sizes))
                global_params[name].copy_(mean.to(global_params[name].dtype))
        round_s.append(time.perf_counter() - round_start)
        train_s.append(round_train)
        copy_s.append(round_copy)
    return {
        "setup_s": setup_s, "round_s": round_s, "train_s_sum": train_s, "deepcopy_s_sum": copy_s,
        "total_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
        "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overrides", required=True, help="JSON dict of fedsim config overrides (as bench/common.fedsim_config)")
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds (after an untimed one-client warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (all cores, as research code runs)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = common.fedsim_config("unused", model=args.model, **json.loads(args.overrides))
    result = run_reference(config, args.rounds)
    sys.stdout.write("REFERENCE " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
