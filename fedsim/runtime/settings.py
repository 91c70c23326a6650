"""The config's sections as the core's settings objects (the core does not know the config schema)."""

import math

from fedsim.config import Config
from fedsim.methods import MethodSettings
from fedsim.trainer import TrainSettings


def method_settings(config: Config) -> MethodSettings:
    m = config.method
    return MethodSettings(
        rank=m.rank, alpha=m.alpha, train_head=m.train_head, switch_round=m.switch_round,
        adapter=m.adapter, weights=config.clients.weights, seed=config.seed,
        rank_aggregation=config.clients.rank_aggregation,
    )


def train_settings(config: Config) -> TrainSettings:
    t = config.train
    return TrainSettings(
        local_steps=t.local_steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
        schedule=t.schedule, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
    )


def init_spends_privacy(config: Config, needs_init_gradients: bool, client_id: int) -> bool:
    """Whether the LoRA-SB initialisation read this client's records under DP (and so spent its privacy)."""
    uses_client = config.adapters.init_data == "pooled" or (config.adapters.init_data == "client" and client_id == 0)
    return config.privacy.enabled and needs_init_gradients and uses_client


def init_rows_per_client(config: Config) -> int:
    """Calibration rows the LoRA-SB init takes from each client it reads: all ``adapters.init_samples`` from the one
    client (``client``), or an equal share of them from each (``pooled``)."""
    a = config.adapters
    return a.init_samples if a.init_data == "client" else max(1, math.ceil(a.init_samples / config.clients.count))


def init_sample_rate(config: Config, needs_init_gradients: bool, client_id: int, client_size: int) -> float | None:
    """Under DP, the Poisson rate at which the LoRA-SB init samples this client's records (the rate its cost is
    booked at: ``ClientWorker.init_gradients``); None where the init does not read them privately."""
    if not init_spends_privacy(config, needs_init_gradients, client_id):
        return None
    return min(1.0, init_rows_per_client(config) / max(1, client_size))


def dp_sample_rate(config: Config, client_size: int) -> float:
    """DP-SGD's Poisson rate for a client of ``client_size`` records: q_i = train.batch_size / n_i (at most 1)."""
    return min(1.0, config.train.batch_size / max(1, client_size))


def privacy_history(config: Config, needs_init_gradients: bool, client_id: int, rows: list[dict],
                    client_size: int) -> list[tuple[float, float, int]]:
    """A client's DP mechanisms so far: the private init (if it read the client's data) and every round it trained in."""
    history = []
    init_rate = init_sample_rate(config, needs_init_gradients, client_id, client_size)
    if init_rate is not None:
        history.append((config.privacy.init_noise_multiplier, init_rate, 1))
    history += [(row["noise_multiplier"], row["sample_rate"], row["steps"]) for row in rows if row["steps"] > 0]
    return history
