"""One seed scheme: every random stream of a run derives from the run seed, the stream's name and its parts.

    rng(config.seed, "sampling", round_idx)                 # which clients take part in a round
    derive_seed(config.seed, "batches", round_idx, client_id)

A stream is named once, below, for each use; its numbers depend only on (run seed, stream, parts), never
on which worker draws them or in what order clients run, so the same config gives the same numbers with
any number of workers, after a worker restarts and after a resume.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

STREAMS = {
    "partition": "which client holds which training example (fedsim.partition)",
    "held-out": "each client's held-out evaluation rows (eval.per_client)",
    "ranks": "each client's adapter rank drawn from clients.ranks",
    "public-sample": "the public calibration rows of the LoRA-SB init (adapters.init_data=public)",
    "init-sample": "the pooled/client calibration rows of the LoRA-SB init",
    "init-noise": "the Gaussian noise of a private LoRA-SB init",
    "lora-init": "LoRA's random A at round 0",
    "ravan-init": "Ravan's orthonormal B and A of a layer at round 0 (method.ravan_init=orthogonal)",
    "head-init": "the new classification head's weights",
    "sampling": "the clients taking part in a round",
    "dropout": "whether a sampled client drops out of a round",
    "batches": "the order (or Poisson draws) of a client's batches in a round",
    "training": "a client's torch randomness in a round: dropout and DP-SGD noise",
    "flora-redraw": "FLoRA's fresh A of a layer after each round",
    "error-sketch": "the Gaussian test matrix estimating a round's aggregation error from pre-summed uploads",
    "validation": "the training rows held out as the validation split (workload.validation)",
    "train-limit": "the training rows kept by workload.train_limit",
    "eval-limit": "the evaluation rows kept by workload.eval_limit",
    "eval-split": "a workload's stratified evaluation split (its own split_seed)",
}


def derive_seed(seed: int, stream: str, *parts: int | str) -> int:
    """A 63-bit seed for ``stream`` (a name of ``STREAMS``) from the run seed and the stream's parts (ints or names)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; name it in fedsim.seeds.STREAMS")
    entropy = [int(seed), _text_id(stream), *(_text_id(p) if isinstance(p, str) else int(p) for p in parts)]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rng(seed: int, stream: str, *parts: int | str) -> np.random.Generator:
    """A NumPy generator of the stream."""
    return np.random.default_rng(derive_seed(seed, stream, *parts))


def torch_generator(seed: int, stream: str, *parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator of the stream, on ``device``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *parts))


def _text_id(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
