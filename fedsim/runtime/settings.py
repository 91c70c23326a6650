"""The config's sections as the core's settings objects (the core does not know the config schema)."""

from fedsim.config import Config
from fedsim.methods import MethodSettings
from fedsim.trainer import TrainSettings


def method_settings(config: Config) -> MethodSettings:
    m = config.method
    return MethodSettings(
        rank=m.rank, alpha=m.alpha, train_head=m.train_head, switch_round=m.switch_round,
        adapter=m.adapter, weights=config.clients.weights, seed=config.seed,
    )


def train_settings(config: Config) -> TrainSettings:
    t = config.train
    return TrainSettings(
        local_steps=t.local_steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
        schedule=t.schedule, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
        micro_batch_size=t.micro_batch_size,
    )


def init_spends_privacy(config: Config, needs_init_gradients: bool, client_id: int) -> bool:
    """Whether the LoRA-SB initialisation read this client's records under DP (and so spent its privacy)."""
    uses_client = config.adapters.init_data == "pooled" or (config.adapters.init_data == "client" and client_id == 0)
    return config.privacy.enabled and needs_init_gradients and uses_client


def privacy_history(config: Config, needs_init_gradients: bool, client_id: int, rows: list[dict]) -> list[tuple[float, float, int]]:
    """A client's DP mechanisms so far: the private init (if it read the client's data) and every round it trained in."""
    history = []
    if init_spends_privacy(config, needs_init_gradients, client_id):
        history.append((config.privacy.init_noise_multiplier, 1.0, 1))
    history += [(row["noise_multiplier"], row["sample_rate"], row["steps"]) for row in rows if row["steps"] > 0]
    return history
