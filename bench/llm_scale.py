"""The LoRA-SB init and the aggregation at the papers' scale: Mistral-7B's shapes, synthetic tensors (no weights).

    python bench/llm_scale.py [--quick] [--kinds q/o,k/v,gate/up,down] [--clients 20,100] [--methods ...] [--skip-before]

Mistral-7B adapts 7 matrices in each of its 32 decoder layers (224): q and o 4096×4096, k and v 1024×4096,
gate and up 14336×4096, down 4096×14336. Each distinct shape (a "kind") is measured once, on one matrix,
and the totals are extrapolated to the 224 matrices (32 × the kind's count a layer); ``--kinds`` measures
a subset (the totals then cover only those kinds, and say so).

- **Init**, rank 200 (the configs'): a synthetic calibration gradient sum (a rank-64 part with decaying
  scales plus Gaussian noise of the same norm: a few strong directions over a full-rank rest, as a sum of
  many tokens' outer products looks) → ``B, R, A``. *Before* (fedsim up to issue 18, kept here as
  ``init_before``): the float64 sum on the host and a full float64 SVD. *After*: ``fedsim.adapters.init.
  lora_sb_factors`` (float32 sign, randomized SVD). Time and the peak RSS the step adds beyond its input
  (sampled every 5 ms; glibc returns freed blocks of 1 MiB or more at once, so the RSS follows live tensors); the accuracy of *after* against the exact truncation: ‖G − BRA‖_F over the optimum
  ‖G − G_r‖_F, and the share of ‖G_r‖²_F that BRA carries. The host memory of the gradient sums themselves
  is analytic: before, float64 for all 224 matrices on the host (and through Ray); after, none beyond the
  model's own gradients on its device.
- **Aggregation** of one round, clients {20, 100}: Fed-SB at rank 200 (clients send R), FedIT, FedEx-LoRA,
  FLoRA and FRA-LoRA at rank 32, clients' tensors the global ones plus noise. *After*: the method's
  ``aggregate`` (its error from the stacked factors). *Before* (``aggregate_before``): fedsim's arithmetic up
  to issue 18 — every client's B_i A_i formed as a d×k float64 matrix and summed, FRA's full SVD of ΔW, the
  error from d×k differences. Both errors are reported; they agree.
- **GPU** (where ``torch.cuda.is_available()``): the init and FedIT's aggregation at the same shapes on
  the GPU, and a ~1B Llama-shaped model (random weights, bf16) through the init and two rounds of 8 clients
  without Ray, time and peak memory per phase. Without a GPU the section records that it did not run.

Targets (issue 18): the init of all 224 matrices ≤ 10 min on 2 cores (≤ 1 min on a GPU); a FedIT round's
aggregation with 20 clients ≤ 60 s on 2 cores. Writes bench/results/llm_scale.json.
"""

from __future__ import annotations

import argparse
import math
import os
import time

from common import BackgroundSampler, machine_info, table, write_result

LAYERS = 32
KINDS = {  # Mistral-7B's adapted shapes (out × in) and how many of each a decoder layer has
    "q/o": ((4096, 4096), 2),
    "k/v": ((1024, 4096), 2),
    "gate/up": ((14336, 4096), 2),
    "down": ((4096, 14336), 1),
}
QUICK_SCALE = 32  # --quick: every dimension ÷ 32
INIT_RANK, LORA_RANK, QUICK_INIT_RANK, QUICK_LORA_RANK = 200, 32, 4, 2
METHODS = ("fed-sb", "fedit", "fedex-lora", "flora", "fra-lora")
TARGET_INIT_S, TARGET_FEDIT_ROUND_S = 600.0, 60.0


def return_freed_memory() -> bool:
    """Make glibc hand every allocation of 1 MiB or more back to the OS when it is freed (a fixed mmap threshold),
    so that the RSS follows the live tensors and a peak measures what a step holds, not what the allocator kept."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class PeakRSS(BackgroundSampler):
    """This process's peak RSS while used as a context manager (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        super().__init__(interval)
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


# -- init ------------------------------------------------------------------------------------------------
def synthetic_gradient(d: int, k: int, seed: int):
    """A calibration gradient sum of shape d×k (float32): a rank-64 part with scales 0.9^j plus Gaussian noise of equal norm."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rank = min(64, d, k)
    left = torch.randn(d, rank, generator=generator) * (0.9 ** torch.arange(rank, dtype=torch.float32))
    right = torch.randn(k, rank, generator=generator)
    low_norm = math.sqrt(float(((left.T @ left) * (right.T @ right)).sum()))
    grad = torch.randn(d, k, generator=generator)
    grad.mul_(1 / float(torch.linalg.matrix_norm(grad)))
    return grad.addmm_(left, right.T, alpha=1 / low_norm)


def init_before(grad_sum64, rank: int, lr: float):
    """fedsim's LoRA-SB factors before issue 18: ``−lr·sign`` of the float64 host sum, a full float64 SVD."""
    import torch

    sign_step = -lr * torch.sign(grad_sum64.to(torch.float64))
    U, S, Vh = torch.linalg.svd(sign_step, full_matrices=False)
    return U[:, :rank].contiguous(), torch.diag(S[:rank]), Vh[:rank].contiguous()


def timed(function, *args):
    """(result, seconds, MiB of RSS the call added at its peak)."""
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = function(*args)
        seconds = time.perf_counter() - start
    return result, seconds, memory.extra_mib


def init_accuracy(grad, factors, exact):
    """After against the exact truncation: (‖G − BRA‖/‖G − G_r‖ − 1, ‖BRA‖²/‖G_r‖², ‖BRA − G_r‖/‖G_r‖) with G = −sign(g)."""
    import torch

    step = -torch.sign(grad)  # lr = 1: the ratios do not depend on it
    norm2 = float((step != 0).sum())

    def error2(B, R, A):
        inner = float(((B.float().T @ step).double() * (R.double() @ A.double())).sum())  # ⟨G, BRA⟩, one float32 pass
        B, R, A = B.double(), R.double(), A.double()
        product2 = float(((B.T @ B) * (R @ A @ A.T @ R.T)).sum())
        return norm2 - 2 * inner + product2, product2

    got, got2 = error2(*factors)
    best, best2 = error2(*exact)
    B, R, A = (t.double() for t in factors)
    Bx, Rx, Ax = (t.double() for t in exact)
    left, right = torch.cat([B @ R, -Bx @ Rx], dim=1), torch.cat([A, Ax], dim=0)
    distance2 = float(((left.T @ left) * (right @ right.T)).sum())
    return math.sqrt(max(got, 0) / best) - 1, got2 / best2, math.sqrt(max(distance2, 0) / best2)


def measure_init(kind: str, shape: tuple[int, int], rank: int, before: bool) -> dict:
    import torch

    from fedsim.adapters.init import lora_sb_factors

    d, k = shape
    grad = synthetic_gradient(d, k, seed=d + k)
    row = {"kind": kind, "shape": f"{d}x{k}", "rank": rank}
    factors, row["after_s"], row["after_extra_mib"] = timed(lora_sb_factors, grad, rank, 1.0)
    row["after_input_mib"] = grad.numel() * 4 / 2**20
    if before:
        grad64 = grad.to(torch.float64)
        exact, row["before_s"], row["before_extra_mib"] = timed(init_before, grad64, rank, 1.0)
        row["before_input_mib"] = grad64.numel() * 8 / 2**20
        del grad64
        excess, captured, distance = init_accuracy(grad, factors, exact)
        row.update(error_over_optimum_minus_1=excess, energy_captured=captured, distance_to_exact=distance)
        row["speedup"] = row["before_s"] / row["after_s"]
    return row


# -- aggregation -----------------------------------------------------------------------------------------
def layer_case(method_name: str, d: int, k: int, clients: int, rank: int, seed: int):
    """A one-layer global state and ``clients`` uploads (the global tensors plus noise), float32."""
    import torch

    from fedsim.config import ClientsConfig, MethodConfig
    from fedsim.methods import Upload, build_method

    method = build_method(MethodConfig(name=method_name, rank=rank, alpha=rank, train_head=False), ClientsConfig(), 0)
    generator = torch.Generator().manual_seed(seed)
    state = {"layer.lora_A": torch.randn(rank, k, generator=generator) / math.sqrt(k),
             "layer.lora_B": 0.01 * torch.randn(d, rank, generator=generator)}
    if method.adapter == "lora-sb":
        state["layer.lora_B"] = torch.linalg.qr(torch.randn(d, rank, generator=generator)).Q
        state["layer.lora_A"] = torch.linalg.qr(torch.randn(k, rank, generator=generator)).Q.T.contiguous()
        state["layer.lora_R"] = torch.diag(torch.rand(rank, generator=generator))
    uploads = []
    for client_id in range(clients):
        tensors = {}
        for kind in method.trained_kinds(0):
            key = f"layer.{kind}"
            value = state[key]
            tensors[key] = value + 0.1 * value.abs().mean() * torch.randn(value.shape, generator=generator)
        uploads.append(Upload(client_id, 100 + client_id, tensors))
    return method, state, uploads


def aggregate_before(method, state: dict, uploads: list) -> float:
    """fedsim's aggregation up to issue 18, arithmetic and cost: every client's ``w_i·s·B_i A_i`` as a d×k float64
    matrix, FRA's full SVD of ΔW, FLoRA's fold formed again client by client, the error from d×k differences.
    Returns the aggregation error ‖ideal − ΔW_agg‖/‖ideal‖."""
    import torch

    from fedsim.methods.base import weighted_mean

    uploads, weights = method.ordered(uploads)
    s, name = method.scaling, method.name
    f64 = {key: value.double() for key, value in state.items()}

    def of(upload, kind):
        return upload.tensors.get(f"layer.{kind}", state[f"layer.{kind}"]).double()

    def mean(kind):
        return weighted_mean([u.tensors[f"layer.{kind}"] for u in uploads], weights)

    if name == "fed-sb":  # the shortcut it had: one product
        R = sum(w * of(u, "lora_R") for w, u in zip(weights, uploads))
        ideal = s * (f64["layer.lora_B"] @ (R @ f64["layer.lora_A"]))
        effective = s * (f64["layer.lora_B"] @ (mean("lora_R").double() @ f64["layer.lora_A"]))
    else:
        ideal = sum(w * s * (of(u, "lora_B") @ of(u, "lora_A")) for w, u in zip(weights, uploads))
        if name == "fra-lora":
            U, S, Vh = torch.linalg.svd(ideal, full_matrices=False)
            root = torch.sqrt(S[:method.rank] / s)
            B, A = (U[:, :method.rank] * root).float(), (root[:, None] * Vh[:method.rank]).float()
            effective = s * (B.double() @ A.double())
        elif name == "flora":
            fold = sum(w * s * (of(u, "lora_B") @ of(u, "lora_A")) for w, u in zip(weights, uploads))  # receive()'s fold
            effective = fold.float().double()
        else:
            mean_product = s * (mean("lora_B").double() @ mean("lora_A").double())
            effective = mean_product
            if name == "fedex-lora":
                effective = mean_product + (ideal - mean_product).float().double()
    return float(torch.linalg.matrix_norm(ideal - effective) / torch.linalg.matrix_norm(ideal))


def measure_aggregation(method_name: str, kind: str, shape: tuple[int, int], clients: int, rank: int, before: bool,
                        device: str = "cpu") -> dict:
    import torch

    d, k = shape
    method, state, uploads = layer_case(method_name, d, k, clients, rank, seed=clients + d)
    if device != "cpu":
        state = {key: value.to(device) for key, value in state.items()}
        for upload in uploads:
            upload.tensors = {key: value.to(device) for key, value in upload.tensors.items()}
    row = {"method": method_name, "kind": kind, "shape": f"{d}x{k}", "clients": clients, "rank": rank, "device": device}
    start = time.perf_counter()
    result = method.aggregate(state, uploads, 0)
    if device != "cpu":
        torch.cuda.synchronize()
    row["after_s"], row["after_error"] = time.perf_counter() - start, result.agg_error
    if before:
        start = time.perf_counter()
        row["before_error"] = aggregate_before(method, state, uploads)
        row["before_s"] = time.perf_counter() - start
        row["speedup"] = row["before_s"] / row["after_s"]
    return row


def totals(rows: list[dict], key: str, group: tuple[str, ...] = ()) -> dict:
    """Σ over the measured kinds of ``LAYERS × count × rows[key]``, per ``group`` value (the 224-matrix extrapolation)."""
    out: dict = {}
    for row in rows:
        if key not in row:
            continue
        label = " ".join(str(row[g]) for g in group) or "all"
        out[label] = out.get(label, 0.0) + LAYERS * KINDS[row["kind"]][1] * row[key]
    return out


# -- GPU -------------------------------------------------------------------------------------------------
def gpu_section(kinds: dict, quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"run": False, "reason": "no CUDA device (torch.cuda.is_available() is False)"}
    from fedsim.adapters.init import lora_sb_factors

    scale = QUICK_SCALE if quick else 1
    init_rank = QUICK_INIT_RANK if quick else INIT_RANK
    init_rows = []
    for kind, ((d, k), _) in kinds.items():
        grad = synthetic_gradient(d // scale, k // scale, seed=d + k).cuda()
        lora_sb_factors(grad, init_rank, 1.0)  # warm-up (kernels, cuSOLVER handles)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        lora_sb_factors(grad, init_rank, 1.0)
        torch.cuda.synchronize()
        init_rows.append({"kind": kind, "shape": f"{d // scale}x{k // scale}", "after_s": time.perf_counter() - start,
                          "after_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20})
        del grad
    aggregation_rows = [measure_aggregation("fedit", kind, (d // scale, k // scale), clients, QUICK_LORA_RANK if quick else LORA_RANK,
                                            before=False, device="cuda")
                        for clients in (20, 100) for kind, ((d, k), _) in kinds.items()]
    return {"run": True, "device": torch.cuda.get_device_name(0), "init": init_rows, "init_total_s": totals(init_rows, "after_s"),
            "aggregation": aggregation_rows, "aggregation_round_s": totals(aggregation_rows, "after_s", ("method", "clients")),
            "llama_1b": llama_phases(quick)}


def llama_phases(quick: bool) -> dict:
    """A ~1B Llama-shaped model (random weights, bf16) through Fed-SB's init and two rounds of 8 clients, without Ray."""
    import itertools

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsim.adapters import accumulate_gradients, adapted_layers
    from fedsim.config import ClientsConfig, MethodConfig, TrainConfig
    from fedsim.methods import Upload, build_method
    from fedsim.training.engine import train_clients

    hidden, layers, inter = (256, 2, 1024) if quick else (2048, 16, 8192)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=1024)
    phases, peaks = {}, {}

    def phase(name):
        torch.cuda.synchronize()
        phases[name] = time.perf_counter() - phase.start
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        phase.start = time.perf_counter()

    torch.manual_seed(0)
    phase.start = time.perf_counter()
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    phase("build")
    generator = torch.Generator().manual_seed(1)

    def batch(size=4, length=256):
        ids = torch.randint(3, 32000, (size, length), generator=generator).cuda()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    rank = 8 if quick else 64
    method = build_method(MethodConfig(name="fed-sb", rank=rank, train_head=False), ClientsConfig(), 0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    method.prepare(model, targets)
    names = [f"{name}.base_layer" for name in adapted_layers(model)]
    sums = accumulate_gradients(model, names, [batch() for _ in range(4)])
    phase("init_gradients")
    state = method.init_state(model, {name.removesuffix(".base_layer"): g for name, g in sums.items()}, 1e-4)
    del sums
    phase("init_factors")
    state = {key: value.cuda() for key, value in state.items()}
    settings = TrainConfig(local_steps=2, batch_size=8, micro_batch_size=4, lr=1e-4)
    for round_idx in range(2):
        uploads = []
        for client_id in range(8):
            (result,) = train_clients(model, method, round_idx, [state], [None], [itertools.cycle([batch(8)])], settings,
                                      [settings.local_steps], client_id, task="causal-lm")
            upload = result.upload
            uploads.append(Upload(client_id, 8, {key: value.cuda() for key, value in upload.items()}))
        phase(f"round_{round_idx}_train")
        state = method.aggregate(state, uploads, round_idx).state
        phase(f"round_{round_idx}_aggregate")
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "rank": rank, "phases_s": phases, "peak_gib": peaks}


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every dimension ÷ 32, ranks 4 and 2, 4 and 8 clients: seconds")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 20,100; --quick 4,8)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-before", action="store_true", help="do not run the before paths (they take most of the time)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = {name: KINDS[name] for name in args.kinds.split(",")}
    scale = QUICK_SCALE if args.quick else 1
    init_rank = QUICK_INIT_RANK if args.quick else INIT_RANK
    lora_rank = QUICK_LORA_RANK if args.quick else LORA_RANK
    clients = [int(c) for c in (args.clients or ("4,8" if args.quick else "20,100")).split(",")]
    before = not args.skip_before
    info = {**machine_info(), "torch_threads": torch.get_num_threads(), "contended_note": os.environ.get("FEDSIM_BENCH_NOTE", ""),
            "freed_memory_returned": return_freed_memory()}

    init_rows = [measure_init(kind, (d // scale, k // scale), init_rank, before) for kind, ((d, k), _) in kinds.items()]
    init_columns = ["kind", "shape", "before_s", "after_s", "speedup", "before_extra_mib", "after_extra_mib",
                    "error_over_optimum_minus_1", "energy_captured", "distance_to_exact"]
    init_text = table(init_rows, init_columns, f"LoRA-SB init, rank {init_rank}, one matrix of each kind")
    init_total = {"before_s": totals(init_rows, "before_s").get("all"), "after_s": totals(init_rows, "after_s").get("all")}

    aggregation_rows = []
    for method_name in args.methods.split(","):
        rank = init_rank if method_name == "fed-sb" else lora_rank
        for count in clients:
            for kind, ((d, k), _) in kinds.items():
                aggregation_rows.append(measure_aggregation(method_name, kind, (d // scale, k // scale), count, rank, before))
    aggregation_text = table(aggregation_rows, ["method", "kind", "clients", "rank", "before_s", "after_s", "speedup", "before_error", "after_error"],
                             "Aggregation of one round, one matrix of each kind")
    rounds = {"before_s": totals(aggregation_rows, "before_s", ("method", "clients")),
              "after_s": totals(aggregation_rows, "after_s", ("method", "clients"))}
    round_rows = [{"method_clients": label, "before_s": rounds["before_s"].get(label), "after_s": seconds}
                  for label, seconds in rounds["after_s"].items()]
    rounds_text = table(round_rows, ["method_clients", "before_s", "after_s"], f"A round's aggregation, extrapolated to {LAYERS} layers")
    init_line = table([{"path": "before", "seconds": init_total["before_s"]}, {"path": "after", "seconds": init_total["after_s"]}],
                      ["path", "seconds"], f"The init of every matrix, extrapolated to {LAYERS} layers")

    covers = "all 224 matrices" if len(kinds) == len(KINDS) else f"the {', '.join(kinds)} matrices of {LAYERS} layers only"
    fedit_20 = rounds["after_s"].get("fedit 20")
    payload = {
        "machine": info, "quick": args.quick, "scale_divisor": scale, "layers": LAYERS, "kinds": {k: list(v[0]) for k, v in kinds.items()},
        "extrapolation": f"one matrix of each kind measured; totals = {LAYERS} × the kind's count a layer × its time, covering {covers}",
        "init": {"rank": init_rank, "rows": init_rows, "total_s": init_total,
                 "gradient_sums_on_host_gib": {"before": 8 * sum(LAYERS * n * d * k for (d, k), n in KINDS.values()) / 2**30, "after": 0.0},
                 "table": init_text + init_line},
        "aggregation": {"lora_rank": lora_rank, "fed_sb_rank": init_rank, "rows": aggregation_rows, "round_s": rounds,
                        "table": aggregation_text + rounds_text},
        "targets": {"init_all_matrices_s": TARGET_INIT_S, "fedit_round_20_clients_s": TARGET_FEDIT_ROUND_S,
                    "init_met": None if args.quick or init_total["after_s"] is None else init_total["after_s"] <= TARGET_INIT_S,
                    "fedit_round_met": None if args.quick or fedit_20 is None else fedit_20 <= TARGET_FEDIT_ROUND_S},
        "gpu": gpu_section(kinds, args.quick),
    }
    write_result("llm_scale", payload)


if __name__ == "__main__":
    main()
