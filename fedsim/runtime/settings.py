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
    )
