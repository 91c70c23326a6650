"""Why a private run does or does not learn: one client's first round of DP-SGD, measured step by step.

    python experiments/private-sst2/diagnose.py [key=value ...]

Builds the run of experiments/private-sst2/sst2.yaml (with the overrides) as `fedsim run` would, without Ray (the data
split, the round-0 state, one `ClientWorker` as a plain object), trains client 0 for one round, and measures, by wrapping
the engine's two DP-SGD steps (``clipped_records`` and ``noise_client_sums``, fedsim/training/private.py):

- each record's gradient norm before clipping, and the share of records clipped (norm > C);
- the head's share of a record's squared gradient norm (what the clipping budget spends on the head);
- per step, the norm of the clipped sum over the expected batch size (the signal) and of the noise over it.

Then it scores the round-0 model and the client's model (the round-0 state with its upload) on the run's evaluation split, so pass
``workload.validation=2000`` to keep dev.tsv out of it. Prints one line per measure: first step, mean, last step.
"""

from __future__ import annotations

import statistics
import sys
import tempfile

import torch

from fedsim.adapters.state import HEAD_PREFIX
from fedsim.cli import _config_from, _read_config_dict
from fedsim.runtime.driver import Experiment
from fedsim.runtime.worker import ClientWorker
from fedsim.storage import Location
from fedsim.training import engine

CONFIG = "experiments/private-sst2/sst2.yaml"


def main() -> None:
    records, steps = [], []
    clip, noise = engine.clipped_records, engine.noise_client_sums

    def measured_clip(segments, gradients, max_norms):
        per_key: dict[str, torch.Tensor] = {}
        for (key, _), gradient in zip(segments.samples, gradients):
            if gradient is not None:
                per_key[key] = gradient if key not in per_key else per_key[key] + gradient
        squares = {key: g.reshape(len(g), -1).pow(2).sum(1) for key, g in per_key.items()}
        total = sum(squares.values())
        head = sum((s for key, s in squares.items() if key.startswith(HEAD_PREFIX)), torch.zeros_like(total))
        norms = total.sqrt()
        records.append({"record gradient norm (median)": float(norms.median()),
                        "share of records clipped": float((norms > max_norms[0]).float().mean()),
                        "head's share of a record's squared norm": float((head / total).mean())})
        return clip(segments, gradients, max_norms)

    def measured_noise(cohort, sums, clients, privacy, generators):
        clipped = {key: value.detach().clone() for key, value in sums.items()}
        noise(cohort, sums, clients, privacy, generators)
        batch = privacy[clients[0]].expected_batch_size
        k = clients[0]
        signal = sum(float(clipped[key][k].pow(2).sum()) for key in clipped) ** 0.5
        noised = sum(float((sums[key][k] * batch - clipped[key][k]).pow(2).sum()) for key in clipped) ** 0.5
        steps.append({"clipped sum / B (signal norm)": signal / batch, "noise / B (noise norm)": noised / batch})

    engine.clipped_records, engine.noise_client_sums = measured_clip, measured_noise
    with tempfile.TemporaryDirectory() as folder:
        config = _config_from(_read_config_dict(CONFIG, [*sys.argv[1:], f"output_dir={folder}/run"]))
        if not config.privacy.enabled:
            raise SystemExit("diagnose: privacy.enabled is false; there is no DP-SGD step to measure")
        experiment = Experiment(config, Location(config.output_dir), resumed=False, progress=False)
        experiment.prepare()
        worker = ClientWorker(experiment.plan, 0)
        state = worker.initial_state()
        chunks = list(range(experiment.plan.data.eval_chunks))
        before = worker.evaluate(state, chunks)
        uploads, rows = worker.train(0, state, [0], experiment.privacy.noise_multiplier)
        after = worker.evaluate({**state, **uploads[0]["tensors"]}, chunks)
    print(f"σ {experiment.privacy.noise_multiplier:.4f}, C {config.privacy.max_grad_norm}, {rows[0]['steps']} steps, "
          f"train loss {rows[0]['train_loss']:.4f}, numbers noised {worker.trainable_counts()}")
    for measures in (records, steps):
        for name in measures[0]:
            values = [m[name] for m in measures]
            print(f"{name}: first {values[0]:.4g}, mean {statistics.fmean(values):.4g}, last {values[-1]:.4g}")
    for when, scores in (("the round-0 model", before), ("client 0's model after the round", after)):
        count = sum(s["count"] for s in scores.values())
        print(f"{when}: accuracy {sum(s['correct'] for s in scores.values()) / count:.4f}, "
              f"loss {sum(s['loss_sum'] for s in scores.values()) / count:.4f} on {count:.0f} rows")


if __name__ == "__main__":
    main()
