"""Workers sharing one GPU: training tokens per second of fedsim (1, 2, 4 workers at gpus_per_worker 1, 0.5, 0.25)
against a plain single-process PEFT loop, on MiniLM and on a small Llama.

    python bench/gpu.py [--quick] [--models minilm,tiny-llama] [--clients 64]

Where no CUDA device exists it writes bench/results/gpu.json saying it was not run, prints why, and exits 0
(so that run_all.py goes on). Tokens are the non-padding tokens of the batches trained (attention_mask sum),
counted from the workload the same way in both: clients × local_steps × batch_size × mean tokens a row.

- fedsim: Fed-SB, every client sampled, 3 rounds; tokens/s over round 1..2 = tokens ÷ Σ wall_s.
- plain loop: one process, the same model on the GPU with PEFT LoRA (``get_peft_model``, rank r on the same
  target modules), a ``copy.deepcopy`` of the adapted model per client, the same steps and batch size.

The small Llama is a LlamaForSequenceClassification built from a config (hidden 256, 4 layers; random weights,
no download) and saved with MiniLM's tokenizer, as tests/tiny_models.py does for BERT.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

from common import SCRATCH, fedsim_config, instrumented_run, machine_info, table, write_result

LLAMA_TARGETS = "[q_proj,v_proj]"


def small_llama_dir() -> str:
    """A small Llama classifier (hidden 256, 4 layers) with MiniLM's tokenizer, written once."""
    path = SCRATCH / "small-llama"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

        from fedsim.config import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512, max_position_embeddings=256,
                             pad_token_id=tokenizer.pad_token_id)
        LlamaForSequenceClassification(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def model_overrides(model: str) -> dict:
    if model == "tiny-llama":
        return {"model.name": small_llama_dir(), "model.target_modules": LLAMA_TARGETS}
    return {"model.name": model}


def config_for(model: str, clients: int, workers: int, gpus_per_worker: float, tag: str):
    config = fedsim_config(str(SCRATCH / "gpu" / tag), model="tiny-bert", **{
        "clients.count": clients, "clients.per_round": clients, "train.rounds": 3, "train.local_steps": 5,
        "train.batch_size": 16, "runtime.workers": workers, "runtime.gpus_per_worker": gpus_per_worker,
        "runtime.cpus_per_worker": 1, **model_overrides(model)})
    return config


def tokens_per_client(config) -> float:
    """Non-padding tokens a client trains a round: local_steps × batch_size × mean tokens a row (max_length-capped)."""
    from fedsim.modeling import load_tokenizer
    from workloads import load_workload

    c = config
    workload = load_workload(c.workload.name, c.workload.path, c.workload.train_limit, c.workload.eval_limit, c.seed)
    tokenizer = load_tokenizer(c)
    texts = workload.train.column("text").to_pylist()[:500]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=c.workload.max_length)["input_ids"]]
    return c.train.local_steps * c.train.batch_size * statistics.fmean(lengths)


def fedsim_tokens_per_s(model: str, clients: int, workers: int) -> dict:
    gpus_per_worker = round(1.0 / workers, 4)
    config = config_for(model, clients, workers, gpus_per_worker, f"{model}-{workers}")
    run = instrumented_run(config, memory=False, timeline=False)
    timed = run["rounds"][1:]
    wall = sum(r["wall_s"] - r.get("eval_s", 0.0) for r in timed)
    tokens = tokens_per_client(config) * clients * len(timed)
    return {"model": model, "runner": "fedsim", "workers": workers, "gpus_per_worker": gpus_per_worker,
            "tokens_per_s": tokens / wall, "round_wall_s": wall / len(timed)}


def plain_peft_tokens_per_s(model: str, clients: int) -> dict:
    """One process, PEFT LoRA, a deepcopy of the model per client, on the GPU."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from fedsim.data import TokenizedRows
    from fedsim.modeling import load_model, load_tokenizer
    from fedsim.partition import partition
    from workloads import load_workload

    config = config_for(model, clients, 1, 1.0, f"{model}-plain")
    c = config
    workload = load_workload(c.workload.name, c.workload.path, c.workload.train_limit, c.workload.eval_limit, c.seed)
    owner = partition(workload.train_labels, clients, "iid", seed=c.seed)
    tokenizer = load_tokenizer(c)
    rows = [TokenizedRows(workload.train.take(np.flatnonzero(owner == i)), tokenizer, c.workload.max_length) for i in range(clients)]
    base = load_model(c, workload.num_labels).to("cuda")
    model_ = get_peft_model(base, LoraConfig(r=c.method.rank, lora_alpha=c.method.rank, target_modules=c.model.target_modules,
                                             modules_to_save=["classifier", "score"]))
    walls = []
    for round_idx in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for cid in range(clients):
            local = copy.deepcopy(model_)
            optimizer = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=c.train.lr)
            data = rows[cid].batches(c.train.batch_size, round_idx * 100_003 + cid)
            local.train()
            for _ in range(c.train.local_steps):
                batch = {k: v.to("cuda") for k, v in next(data).items()}
                loss = local(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            del local, optimizer
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    timed = walls[1:]
    tokens = tokens_per_client(config) * clients * len(timed)
    return {"model": model, "runner": "plain PEFT loop", "workers": 1, "gpus_per_worker": 1.0,
            "tokens_per_s": tokens / sum(timed), "round_wall_s": statistics.fmean(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only, 32 clients")
    parser.add_argument("--models", default=None, help="comma-separated: minilm, tiny-llama (default both; --quick minilm)")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    import torch

    info = machine_info()
    if not torch.cuda.is_available():
        message = ("no CUDA device on this machine (torch.cuda.is_available() is False): the GPU bench was not run. "
                   "Run `python bench/gpu.py` where a GPU exists.")
        print(f"gpu: {message}")
        write_result("gpu", {"machine": info, "run": False, "reason": message, "results": []})
        return
    models = (args.models or ("minilm" if args.quick else "minilm,tiny-llama")).split(",")
    clients = args.clients or (32 if args.quick else 64)
    results = []
    for model in models:
        print(f"gpu: plain PEFT loop, {model} ...", flush=True)
        plain = plain_peft_tokens_per_s(model, clients)
        results.append(plain)
        for workers in (int(w) for w in args.workers.split(",")):
            print(f"gpu: fedsim, {model}, {workers} workers ...", flush=True)
            result = fedsim_tokens_per_s(model, clients, workers)
            result["speed_up_over_plain"] = result["tokens_per_s"] / plain["tokens_per_s"]
            results.append(result)
    text = table(results, ["model", "runner", "workers", "gpus_per_worker", "tokens_per_s", "round_wall_s", "speed_up_over_plain"],
                 f"GPU: training tokens per second ({clients} clients, 5 steps of batch 16)")
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result("gpu", {"machine": info, "run": True, "quick": args.quick, "clients": clients, "results": results, "table": text})


if __name__ == "__main__":
    main()
