"""The GPU: cohort-batched training of a ~1B Llama, and workers sharing one GPU.

    python bench/gpu.py [--sections cohort,workers] [--quick] [--models minilm,tiny-llama] [--clients 64]

Section ``cohort`` (the one to run first; about 2 minutes on an H200, never more than --budget-s): the worker's
engine driven directly, without Ray (``fedsim.training.engine.train_clients`` for every K), so it runs where only torch, transformers and peft are installed. A Llama-shaped causal LM built from a
config (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000; random
weights, bfloat16, SDPA attention), adapters of rank 16 on all seven projections, Fed-SB and FedIT; 64 clients,
each 3 steps of batch 4 × 256 tokens (random tokens, the loss on all of them). Training tokens per second and peak
GPU memory (``torch.cuda.max_memory_allocated``) at K = 1, 4, 16, 64 clients a pass. A K
that runs out of memory is recorded as such. --quick: a toy Llama (hidden 64, 2 layers, 32 tokens, batch 2), which
also runs on the CPU: that is how the script is proven before a GPU session.

Section ``workers`` (Ray): training tokens per second of fedsim (1, 2, 4 workers at gpus_per_worker 1, 0.5, 0.25)
against a plain single-process PEFT loop, on MiniLM and on a small Llama.

Where no CUDA device exists (and without --quick) it writes bench/results/gpu.json saying it was not run, prints
why, and exits 0 (so that run_all.py goes on). Tokens of the workers section are the non-padding tokens of the
batches trained (attention_mask sum), counted from the workload the same way in both: clients × local_steps ×
batch_size × mean tokens a row.

- fedsim: Fed-SB, every client sampled, 3 rounds; tokens/s over round 1..2 = tokens ÷ Σ wall_s.
- plain loop: one process, the same model on the GPU with PEFT LoRA (``get_peft_model``, rank r on the same
  target modules), a ``copy.deepcopy`` of the adapted model per client, the same steps and batch size.

The small Llama is a LlamaForSequenceClassification built from a config (hidden 256, 4 layers; random weights,
no download) and saved with MiniLM's tokenizer, as tests/tiny_models.py does for BERT.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

from common import SCRATCH, fedsim_config, instrumented_run, machine_info, table, write_result

LLAMA_TARGETS = "[q_proj,v_proj]"
LLAMA_ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# TinyLlama-1.1B's shape (1.10B parameters); --quick: a toy one
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000}
LLAMA_TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000}
COHORT_SIZES = (1, 4, 16, 64)


def cohort_section(quick: bool, device: str, rank: int, budget_s: float, sizes=COHORT_SIZES) -> dict:
    """Tokens/s and peak memory of the cohort engine at K = 1, 4, 16, 64, for Fed-SB and FedIT, on a Llama built from a config."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cohort import bench_state, time_cohorts
    from fedsim.config import MethodConfig, TrainConfig
    from fedsim.methods import build_method

    shape, seq_len, batch_size, steps = (LLAMA_TOY, 32, 2, 2) if quick else (LLAMA_1B, 256, 4, 3)
    clients = max(sizes)
    config = LlamaConfig(**shape, max_position_embeddings=max(seq_len, 256), attention_dropout=0.0, pad_token_id=0)
    generator = torch.Generator().manual_seed(0)
    client_batches = []
    for _ in range(clients):
        batches = []
        for _ in range(steps):
            ids = torch.randint(1, shape["vocab_size"], (batch_size, seq_len), generator=generator).to(device)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        client_batches.append(batches)
    settings = TrainConfig(local_steps=steps, batch_size=batch_size, lr=1e-4)
    started = time.perf_counter()
    results = []
    for method_name in ("fed-sb", "fedit"):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.eval()
        parameters = sum(p.numel() for p in model.parameters())
        method = build_method(MethodConfig(name=method_name, rank=rank, train_head=False))
        method.prepare(model, LLAMA_ALL_TARGETS)
        state = {key: value.to(device) for key, value in bench_state(model, method).items()}
        for size in sizes:
            row = {"method": method_name, "cohort_size": size, "rank": rank, "parameters": parameters, "seq_len": seq_len,
                   "client_batch": batch_size, "local_steps": steps}
            if time.perf_counter() - started > budget_s:
                results.append({**row, "status": f"skipped: the section's {budget_s:.0f} s were spent"})
                continue
            print(f"gpu cohort: {method_name}, K={size} ...", flush=True)
            try:
                results.append({**row, "status": "ok", **time_cohorts(model, method, state, client_batches, size, settings, "causal-lm")})
            except torch.OutOfMemoryError:
                results.append({**row, "status": "out of memory"})
            finally:
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        del model, method, state
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in results:
        base = next((r for r in results if r["method"] == row["method"] and r["cohort_size"] == 1 and "tokens_per_s" in r), None)
        if "tokens_per_s" in row and base is not None:
            row["speed_up_over_k1"] = row["tokens_per_s"] / base["tokens_per_s"]
    text = table(results, ["method", "cohort_size", "status", "tokens_per_s", "peak_gpu_memory_gib", "wall_s", "speed_up_over_k1"],
                 f"Cohort-batched training on {device} ({'toy Llama' if quick else 'Llama 1.1B'}, bf16, {clients} clients × {steps} steps "
                 f"of {batch_size} × {seq_len} tokens, rank {rank} on 7 projections)")
    return {"device": device, "quick": quick, "model_shape": shape, "section_s": time.perf_counter() - started,
            "results": results, "table": text}


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
    parser.add_argument("--sections", default="cohort,workers", help="comma-separated: cohort, workers")
    parser.add_argument("--quick", action="store_true", help="cohort: a toy Llama (runs on the CPU too); workers: MiniLM only, 32 clients")
    parser.add_argument("--rank", type=int, default=16, help="cohort: adapter rank")
    parser.add_argument("--budget-s", type=float, default=420.0, help="cohort: K values not started within this many seconds are skipped")
    parser.add_argument("--sizes", default=",".join(map(str, COHORT_SIZES)), help="cohort: the cohort sizes K (clients: the largest)")
    parser.add_argument("--models", default=None, help="workers: comma-separated: minilm, tiny-llama (default both; --quick minilm)")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    import torch

    info = machine_info()
    sections = args.sections.split(",")
    if not torch.cuda.is_available():
        if args.quick and "cohort" in sections:  # proves the cohort section before a GPU session
            print("gpu: no CUDA device; the cohort section at its --quick size on the CPU (one thread)", flush=True)
            torch.set_num_threads(1)
            cohort = cohort_section(True, "cpu", args.rank, args.budget_s, [int(k) for k in args.sizes.split(",")])
            info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            write_result("gpu", {"machine": info, "run": False, "reason": "no CUDA device: only the cohort section, toy size, on the CPU",
                                 "cohort": cohort, "results": []})
            return
        message = ("no CUDA device on this machine (torch.cuda.is_available() is False): the GPU bench was not run. "
                   "Run `python bench/gpu.py` where a GPU exists.")
        print(f"gpu: {message}")
        write_result("gpu", {"machine": info, "run": False, "reason": message, "results": []})
        return
    sizes = [int(k) for k in args.sizes.split(",")]
    cohort = cohort_section(args.quick, "cuda", args.rank, args.budget_s, sizes) if "cohort" in sections else None
    if "workers" not in sections:
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_result("gpu", {"machine": info, "run": True, "quick": args.quick, "cohort": cohort, "results": []})
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
    write_result("gpu", {"machine": info, "run": True, "quick": args.quick, "cohort": cohort, "clients": clients, "results": results,
                         "table": text})


if __name__ == "__main__":
    main()
