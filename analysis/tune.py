"""Searches on Ray Tune: each method's learning rate (or any config keys), scored on a validation split.

    fedsim tune my.yaml workload.validation=2000 --space method.name=fed-sb,fedit "train.lr=loguniform(1e-4,1e-1)" \\
        --samples 4 --asha --best-per method.name

Each trial is a ``fedsim run`` of the config with the trial's values, written to ``<output_dir>/<trial>/`` (with
``--seeds``, one run per seed in ``<trial>/seed-<s>/``, scored by their mean). A trial's score is ``eval_metric`` (or
``eval_loss``) of its last evaluated round, on the rows ``workload.validation`` carved out of the clients' training
data: a tune never scores on the evaluation file, which an experiment reports. Each evaluated round is reported to Tune, so that ASHA
(Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020, arXiv:1810.05934) can stop the poor
trials at its rungs. As many trials run at once as the Ray cluster has room for (a trial's workers:
``runtime.workers × cpus_per_worker`` CPUs and their GPUs). Tune's state lives in ``<output_dir>/tune``: the same
command again resumes a stopped tune (finished trials are read back, unfinished ones take up from their last checkpoint).

Results: ``<output_dir>/tune.parquet``, every trial's rounds in ``fedsim sweep``'s layout (``point`` and one column per
searched key, then ``trial``, ``seed`` and ``finished``: false where ASHA stopped it) and the best config as YAML:
``best.yaml``, or with ``--best-per KEY`` one ``best-<value>.yaml`` for each value of KEY (each method's own best lr).
Each trial's folder holds its values (``trial.json``): the results are read from the folders, not from Tune's records.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass

import pyarrow as pa
import yaml

from analysis.sweep import expand_grid, parse_grid, point_config, point_name, split_values
from fedsim.errors import UsageError
from fedsim.storage import Location, is_uri, join

TUNE_FILE = "tune.parquet"
STATE_DIR = "tune"  # Ray Tune's experiment state (what a resume reads)
SPEC_FILE = "tune-spec.json"  # the search this output_dir holds, so that another search is never resumed into it
TRIAL_FILE = "trial.json"  # in each trial's folder: its values (the folders, not Tune's records, are the results)
DISTRIBUTIONS = ("loguniform", "uniform", "choice")
METRICS = {"eval_metric": "max", "eval_loss": "min"}  # what a trial may be scored by (rounds.parquet), and which way is better


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``grid`` (every value, crossed with the other grids), ``choice`` (one value drawn per trial),
    ``uniform`` / ``loguniform`` (a number drawn per trial from [low, high])."""

    kind: str
    values: tuple

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(*self.values)

    def ends(self) -> list:
        """The values a config check must accept: every listed one, or both bounds of a range."""
        return list(self.values)


def parse_space(items: list[str]) -> dict[str, Dimension]:
    """``["method.name=fed-sb,fedit", "train.lr=loguniform(1e-4,1e-1)"]`` → ``{key: Dimension}``, in the order given.
    Listed values are read as ``fedsim sweep --grid``'s (``analysis.sweep.parse_grid``)."""
    drawn: dict[str, Dimension] = {}
    listed = []
    for item in items:
        key, _, text = (part.strip() for part in item.partition("="))
        call = re.fullmatch(r"(\w+)\((.*)\)", text)
        if not call:
            listed.append(item)
            continue
        kind = call.group(1)
        if kind not in DISTRIBUTIONS:
            raise UsageError(f"--space: {key}: unknown distribution {kind!r}; choose one of {', '.join(DISTRIBUTIONS)}, "
                             "or list values: key=v1,v2")
        values = tuple(yaml.safe_load(v) for v in split_values(call.group(2)))
        if kind != "choice":
            values = tuple(number(v) for v in values)
            if len(values) != 2 or None in values or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
                raise UsageError(f"--space: {key}={text}: {kind} takes two numbers low < high"
                                 f"{' with low > 0' if kind == 'loguniform' else ''}, e.g. {kind}(1e-4,1e-1)")
        if not key or key in drawn:
            raise UsageError(f"--space: {'missing key in ' + repr(item) if not key else key + ' is given twice'}")
        drawn[key] = Dimension(kind, values)
    grid = parse_grid(listed, flag="--space", required=False)
    if set(grid) & set(drawn):
        raise UsageError(f"--space: {sorted(set(grid) & set(drawn))[0]} is given twice")
    order = [item.partition("=")[0].strip() for item in items]
    space = {key: drawn[key] if key in drawn else Dimension("grid", tuple(grid[key])) for key in order}
    if "seed" in space:
        raise UsageError("--space: seed cannot be searched; --seeds 0,1,2 scores each trial by the mean over seeds")
    if not space:
        raise UsageError("--space: give at least one key, e.g. --space \"train.lr=loguniform(1e-4,1e-1)\"")
    return space


def number(value) -> float | None:
    """A bound as a float (YAML reads ``1e-4`` as text), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_search(base: dict, space: dict[str, Dimension], seeds: list[int] | None, best_per: str | None):
    """Everything a tune needs before Ray starts: every listed value and both ends of every range make a valid config
    (with the other keys at their first value), and the trials score on a validation split. Returns the first config."""
    if best_per is not None and best_per not in space:
        raise UsageError(f"--best-per: {best_per} is not searched; choose one of --space's keys: {', '.join(space)}")
    first = {key: dim.values[0] for key, dim in space.items()}
    for key, dim in space.items():
        for value in dim.ends():
            try:
                config = point_config(base, {**first, key: value}, "unused", seeds[0] if seeds else None)
            except UsageError as error:
                raise UsageError(f"--space {key}={value}: {error}") from None
            if not config.workload.validation:
                raise UsageError("workload.validation: fedsim tune scores trials on rows carved out of the training data, never "
                                 "on the evaluation file; set workload.validation=N (e.g. workload.validation=2000)")
    return point_config(base, first, "unused", seeds[0] if seeds else None)


def trial_resources(config) -> dict[str, float]:
    """What one trial's workers take of the cluster (its aggregator takes no CPU; its GPUs, if any, count)."""
    r = config.runtime
    return {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers * r.gpus_per_worker + r.aggregator_gpus}


def concurrent_trials(cluster: dict[str, float], need: dict[str, float]) -> int:
    """How many trials fit the cluster at once (at least one: a trial that does not fit waits for an autoscaler)."""
    fits = [math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return max(1, min(fits, default=1))


def trial_folder(trial_id: str, values: dict) -> str:
    """``0003_name-fedit_lr-0.00316``: the trial's index (Tune's, stable across a resume), then its values (numbers to
    3 significant digits)."""
    shown = {key: float(f"{value:.3g}") if isinstance(value, float) else value for key, value in values.items()}
    return f"{trial_id.rsplit('_', 1)[-1]}_{point_name(shown)}"


def run_trial(values: dict, *, base: dict, root: str, seeds: list[int] | None, metric: str, fresh: bool, cwd: str) -> None:
    """One trial (Tune's function trainable): its run(s), each evaluated round reported as ``score`` (with ``--seeds``,
    the mean of the seeds finished so far, once a seed ends). A run that finished is read back, one with a checkpoint
    resumes from it, any other starts again: a resumed tune repeats no finished work."""
    from ray import tune

    from fedsim.runtime.aggregator import latest_checkpoint
    from fedsim.runtime.driver import run

    if os.path.isdir(cwd):  # Tune starts a trial in its own folder: the config's relative paths are the driver's
        os.chdir(cwd)
    folder = join(root, trial_folder(tune.get_context().get_trial_id(), values))
    marker = Location(folder) / TRIAL_FILE

    def mark() -> None:
        """The trial's values beside its runs (once the run's folder is made: a run starts in an empty folder)."""
        if not marker.is_file():
            marker.write_text(json.dumps({"values": values, "seeds": seeds}))

    runs = [(seed, join(folder, f"seed-{seed}")) for seed in seeds] if seeds else [(None, folder)]
    if seeds:
        mark()
    finals: list[float] = []
    for index, (seed, output_dir) in enumerate(runs):
        config = point_config(base, values, output_dir, seed)
        out = Location(output_dir)
        done = [] if fresh or not (out / "rounds.parquet").is_file() else (out / "rounds.parquet").read_table().to_pylist()
        finished = not fresh and (out / "summary.json").is_file()
        rounds_before = index * config.train.rounds

        def report(row: dict, last: bool = False) -> None:
            """An evaluated round's score; the last round's only once the run has written its closing files (a scheduler
            stops a trial at its last round, which must not cut the run's end)."""
            mark()
            score = row[metric]
            if seeds is None and not math.isnan(score) and (last or row["round"] < config.train.rounds - 1):
                tune.report({"score": score, "round": row["round"] + 1})

        if not seeds:
            for row in done:  # what Tune saw before the stop (a scheduler ignores a rung it has recorded)
                report(row, last=finished)
        if not finished:
            resume = None if fresh or latest_checkpoint(out / "checkpoints") is None else output_dir
            run(config, resume=resume, overwrite=resume is None, progress=False, on_round=report)
            done = (out / "rounds.parquet").read_table().to_pylist()
            report(done[-1], last=True)
        finals.append(next(row[metric] for row in reversed(done) if not math.isnan(row[metric])))
        if seeds:
            tune.report({"score": statistics.fmean(finals), "round": rounds_before + config.train.rounds, "seeds_done": index + 1})


def run_tune(config_path: str | None, space: dict[str, Dimension], overrides=(), *, samples: int = 1,
             seeds: list[int] | None = None, asha: bool = False, grace_rounds: int = 1, metric: str = "eval_metric",
             best_per: str | None = None, concurrent: int | None = None, overwrite: bool = False,
             dry_run: bool = False) -> Location:
    """Run (or resume) a search and write ``tune.parquet`` and the best config(s); return the output folder."""
    from fedsim.config import load_config_dict
    from fedsim.runtime.driver import ray_session

    if metric not in METRICS:
        raise UsageError(f"--metric: {metric!r}; choose eval_metric (accuracy or exact match: higher is better) or eval_loss")
    mode = METRICS[metric]
    if samples < 1:
        raise UsageError(f"--samples: {samples}; give a count ≥ 1 (each draws every range once, crossed with the grids)")
    if asha and seeds:
        raise UsageError("--asha: ASHA stops a trial on its per-round score, and with --seeds a trial's score is known only "
                         "once a seed ends; drop --asha or --seeds")
    base = load_config_dict(config_path, list(overrides))
    first = check_search(base, space, seeds, best_per)
    root = Location(str(base.get("output_dir") or "results/tune"))
    root_text = str(root) if is_uri(str(root)) else os.path.abspath(str(root))
    root = Location(root_text)
    spec = {"config": base, "space": {k: [d.kind, list(d.values)] for k, d in space.items()}, "samples": samples,
            "seeds": seeds, "asha": asha, "grace_rounds": grace_rounds, "metric": metric}
    grids = expand_grid({k: list(d.values) for k, d in space.items() if d.kind == "grid"})
    drawn = [k for k, d in space.items() if d.kind != "grid"]
    if dry_run:
        shown = [f"{k} in {{{', '.join(map(str, d.values))}}}" if d.kind == "grid" else f"{k} ~ {d.kind}{d.values}"
                 for k, d in space.items()]
        print(f"{len(grids) * samples} trials into {root_text}/<trial>/: {'; '.join(shown)}"
              + (f"; {samples} draws" if drawn else "") + (f"; seeds {seeds}" if seeds else ""))
        return root
    state = root / STATE_DIR
    resume = (root / SPEC_FILE).is_file() and (state / "tuner.pkl").is_file()
    if resume and json.loads((root / SPEC_FILE).read_text()) != json.loads(json.dumps(spec)) and not overwrite:
        raise UsageError(f"output_dir: {root_text} holds another search (config, --space, --samples, --seeds or --asha differ); "
                         "pass --overwrite to start this one there, or choose another output_dir")
    if overwrite and state.iterdir():
        state.delete()
        resume = False
    if not resume:  # a search starts afresh: the trial folders of the one before it here go
        for folder in trial_folders(root):
            folder.delete()
    (root / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # Tune's JSON log only (a resume reads it): no TensorBoard
    with ray_session(first):
        import ray
        from ray import tune
        from ray.tune.logger import JsonLoggerCallback

        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, root=root_text, seeds=seeds, metric=metric, fresh=not resume,
                                cwd=os.getcwd()), {"memory": 1})  # the trial only drives its run: its workers place their own resources
        if resume and tune.Tuner.can_restore(str(state)):
            tuner = tune.Tuner.restore(str(state), trainable, resume_unfinished=True, resume_errored=True)  # errored trials keep their id, so their folder: their run takes up from its checkpoint
            print(f"fedsim tune: resuming the search in {root_text}")
        else:
            scheduler = None
            if asha:
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(time_attr="round", max_t=first.train.rounds, grace_period=grace_rounds,
                                          reduction_factor=2)
            width = concurrent or concurrent_trials(ray.cluster_resources(), trial_resources(first))
            tuner = tune.Tuner(
                trainable, param_space={key: dim.tune_domain() for key, dim in space.items()},
                tune_config=tune.TuneConfig(metric="score", mode=mode, num_samples=samples, scheduler=scheduler,
                                            max_concurrent_trials=width),
                run_config=tune.RunConfig(name=STATE_DIR, storage_path=root_text, verbose=0,
                                          callbacks=[JsonLoggerCallback(), free_stopped_trials(root_text)],
                                          failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
    for result in results:
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error
            print(f"fedsim tune: the trial {point_name({k: result.config[k] for k in space})} failed: "
                  f"{' '.join(str(cause).split())[:300]}")
    trials = read_trials(root, metric)
    gather_trials(root, trials, list(space), first.seed)
    expected = len(grids) * samples
    if results.num_terminated + results.num_errors < expected:  # stopped (Ctrl-C, a lost driver): nothing is best yet
        raise Interrupted(f"fedsim tune: stopped with {results.num_terminated} of {expected} trials ended; run the same "
                          f"command again to resume ({root_text}/{TUNE_FILE} holds the rounds so far)")
    write_best(root, trials, base, space, best_per, metric)
    return root


def free_stopped_trials(root: str):
    """A Tune callback that removes the placement groups of a trial's runs once Tune is done with the trial.

    Tune ends a trial that a scheduler (ASHA) stops by killing its actor, so the trial's `fedsim run` never takes its
    workers down itself. The workers die with the actor, but their placement group does not: Ray scopes a placement group
    to the job that made it, not to the actor, so it would hold the workers' CPUs until the whole tune ends, and the next
    trial would wait for them (``runtime.placement_timeout_s``) and fail. A run names its group after its output folder
    (``fedsim.runtime.driver.group_name``): the trial's folder, or its seeds' folders below it."""
    from ray.tune import Callback
    from ray.util import get_placement_group, placement_group_table, remove_placement_group

    from fedsim.runtime.driver import group_name

    class FreeStoppedTrials(Callback):
        def free(self, trial) -> None:
            prefix = group_name(join(root, trial_folder(trial.trial_id, trial.config)))
            for group in placement_group_table().values():
                if group["state"] != "REMOVED" and (group["name"] == prefix or group["name"].startswith(prefix + "/")):
                    try:
                        remove_placement_group(get_placement_group(group["name"]))
                    except ValueError:  # removed since the table was read
                        pass

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.free(trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.free(trial)

    return FreeStoppedTrials()


class Interrupted(KeyboardInterrupt):
    """A tune stopped before every trial ended: the CLI says so and how to resume, and exits 130."""


def trial_folders(root: Location) -> list[Location]:
    return sorted((p for p in root.iterdir() if (p / TRIAL_FILE).is_file()), key=lambda p: p.name)


def read_trials(root: Location, metric: str) -> list[dict]:
    """Every trial under ``root``, from its own folder: its values, each run's rounds (``{seed: rows}``), whether every
    run finished (``summary.json``), and its score: the mean over its runs of the last evaluated round's ``metric``."""
    trials = []
    for folder in trial_folders(root):
        meta = json.loads((folder / TRIAL_FILE).read_text())
        runs = {seed: folder / f"seed-{seed}" for seed in meta["seeds"]} if meta["seeds"] else {None: folder}
        rounds = {seed: (run / "rounds.parquet").read_table().to_pylist() for seed, run in runs.items()
                  if (run / "rounds.parquet").is_file()}
        finished = all((run / "summary.json").is_file() for run in runs.values())
        finals = [next((r[metric] for r in reversed(rows) if not math.isnan(r[metric])), math.nan) for rows in rounds.values()]
        trials.append({"point": folder.name, "values": meta["values"], "rounds": rounds, "finished": finished,
                       "score": statistics.fmean(finals) if finished and finals else math.nan})
    return trials


def trial_index(point: str) -> int | None:
    """Tune's index of a trial from its folder's name (``0003_lr-0.01``: 3); None where the name has none."""
    head = point.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def gather_trials(root: Location, trials: list[dict], keys: list[str], base_seed: int) -> Location | None:
    """Every trial's rounds (every seed's) in ``tune.parquet``: ``point``, the searched keys, ``trial``, ``seed``,
    ``finished`` (false: ASHA stopped it, it failed, or the tune was stopped), then ``rounds.parquet``'s columns."""
    tables = []
    for trial in trials:
        for seed, rows in trial["rounds"].items():
            table = pa.Table.from_pylist(rows)
            n = table.num_rows
            front = {"point": pa.array([trial["point"]] * n, pa.string()),
                     **{key: pa.array([trial["values"][key]] * n) for key in keys},
                     "trial": pa.array([trial_index(trial["point"])] * n, pa.int64()),
                     "seed": pa.array([base_seed if seed is None else seed] * n, pa.int64()),
                     "finished": pa.array([trial["finished"]] * n, pa.bool_())}
            for i, (name, column) in enumerate(front.items()):
                table = table.add_column(i, name, column)
            tables.append(table)
    if not tables:
        print(f"fedsim tune: no trial ran a round under {root}")
        return None
    out = root / TUNE_FILE
    out.write_table(pa.concat_tables(tables, promote_options="permissive"))
    return out


def write_best(root: Location, trials: list[dict], base: dict, space: dict[str, Dimension], best_per: str | None,
               metric: str) -> list[Location]:
    """``best.yaml`` (or ``best-<value>.yaml`` per value of ``best_per``): the config with the best finished trial's
    values, scored on the evaluation file again (``workload.validation`` off, so it trains on every training row)."""
    from fedsim.config import config_to_yaml

    finished = [t for t in trials if t["finished"] and not math.isnan(t["score"])]
    groups: dict[str, list[dict]] = {}
    for trial in finished:
        groups.setdefault(str(trial["values"][best_per]) if best_per else "", []).append(trial)
    written = []
    for group, members in groups.items():
        best = (max if METRICS[metric] == "max" else min)(members, key=lambda t: t["score"])
        chosen = ", ".join(f"{key}={best['values'][key]}" for key in space)
        name = f"best-{re.sub(r'[^A-Za-z0-9_.,=+-]', '_', group)}.yaml" if best_per else "best.yaml"
        data = {**base, "workload": {**base.get("workload", {}), "validation": None}}
        config = point_config(data, best["values"], str(root / name.removesuffix(".yaml")))
        header = (f"# fedsim tune: the best of {len(members)} finished trial(s){' with ' + best_per + '=' + group if best_per else ''},"
                  f" by validation {metric} {best['score']:.4f} (trial {best['point']}).\n"
                  f"# searched: {chosen}. workload.validation is off here: this run "
                  "trains on every training row and scores on the evaluation file.\n")
        (root / name).write_text(header + config_to_yaml(config))
        written.append(root / name)
        print(f"fedsim tune: {root / name}: {chosen} ({metric} {best['score']:.4f})")
    if not written:
        print("fedsim tune: no trial finished all its rounds; no best config written")
    return written
