"""``train.lr_decay`` through `fedsim run`: round t trains at lr · lr_decay^t, so round 0 is untouched and a decay near 0
stops the learning after it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsim.cli import main

SETTINGS = ["workload.train_limit=60", "workload.eval_limit=16", "clients.count=3", "clients.per_round=3",
            "clients.partition=iid", "method.rank=4", "train.rounds=2", "train.local_steps=2", "train.batch_size=4",
            "train.lr=0.05", "runtime.workers=1", "--methods", "fed-sb,fedit", "--quiet"]
LR, STEPS = 0.05, 2


def checkpoints(run_dir: Path) -> list[dict]:
    return [load_file(path) for path in sorted(Path(run_dir, "checkpoints").glob("round_*.safetensors"))]


def largest_change(before: dict, after: dict) -> float:
    return max((after[key].double() - before[key].double()).abs().max().item() for key in before)


def test_round_t_trains_at_lr_times_decay_to_the_t(ray_local, tiny_model_dir, tmp_path):
    decay = 1e-6
    for name, extra in (("plain", []), ("decayed", [f"train.lr_decay={decay}"])):
        assert main(["run", f"output_dir={tmp_path / name}", f"model.name={tiny_model_dir}", *SETTINGS, *extra]) == 0
    for method in ("fed-sb", "fedit"):
        plain, decayed = checkpoints(tmp_path / "plain" / method), checkpoints(tmp_path / "decayed" / method)
        assert len(plain) == len(decayed) == 2
        # round 0 trains at lr · decay^0 = lr: bit for bit the plain run's
        assert all(torch.equal(plain[0][key], decayed[0][key]) for key in plain[0]), method
        # round 1 at lr · 1e-6. An AdamW step moves an entry by at most lr·(1 − β1)/√(1 − β2) ≈ 3.2·lr (weight decay 0), so
        # each client's tensors move by ≤ STEPS·3.2·lr·decay; their mean as much, plus the float32 rounding of the
        # average (a few ulp of the largest entry)
        ulp = torch.finfo(torch.float32).eps * max(t.abs().max().item() for t in decayed[0].values())
        bound = STEPS * 3.2 * LR * decay + 4 * ulp
        assert largest_change(decayed[0], decayed[1]) <= bound, method
        assert largest_change(plain[0], plain[1]) > 100 * bound, method  # undecayed, round 1 learns


def test_lr_decay_outside_its_range_is_a_one_line_error(tmp_path, capsys):
    for value in ("0", "1.5"):
        assert main(["run", f"output_dir={tmp_path / 'never'}", f"train.lr_decay={value}", "--quiet"]) == 2
        assert f"train.lr_decay: must be in (0, 1], got {value}" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("round_idx, expected", [(0, 1.0), (1, 0.5), (3, 0.125)])
def test_the_factor_is_the_decay_to_the_round_times_the_local_schedule(round_idx, expected):
    from fedsim.config import TrainConfig
    from fedsim.training.schedule import lr_factor

    train = TrainConfig(local_steps=4, schedule="linear", lr_decay=0.5)
    assert [lr_factor(step, train, round_idx=round_idx) for step in range(4)] == \
        pytest.approx([expected * f for f in (1.0, 0.75, 0.5, 0.25)], rel=0, abs=1e-15)
