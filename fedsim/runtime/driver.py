"""The driver: orchestrates a run — prepares its data once, starts the actors, runs the rounds, resumes.

Round r: sample clients (seeded by (seed, r)); simulate dropout; balance the round's clients over the
workers by their predicted work and give each worker its share in one call, with a reference to the
global state; pass the workers' uploads, by reference, to the aggregator; evaluate; hand the rows to the
``RoundWriter``, which writes them and the round's checkpoint while the next round trains. The driver
never holds training data or adapter tensors, only per-client statistics. The data (``fedsim.prepare``),
the privacy plan (``fedsim.privacy_plan``) and the result tables (``fedsim.results``) live in their own modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from fedsim.config import Config, RuntimeConfig, resolve_model_path, save_config
from fedsim.errors import UsageError
from fedsim.methods import METHODS, Method, build_method, resolved
from fedsim.modeling import check_model, offline_by_default
from fedsim.prepare import DataPlan, split_data, write_data
from fedsim.privacy_plan import PrivacyPlan, check_private_init
from fedsim.provenance import collect, record_start
from fedsim.results import ROUND_COLUMNS, RoundWriter, read_rows
from fedsim.runtime.aggregator import Aggregator, latest_checkpoint
from fedsim.runtime.plan import RunPlan
from fedsim.runtime.worker import ClientWorker
from fedsim.seeds import rng
from fedsim.server_optimizer import check_server_optimizer
from fedsim.storage import Location
from fedsim.training.schedule import client_steps


def run(config: Config, resume: str | None = None, overwrite: bool = False, progress: bool = True,
        on_round: Callable[[dict], None] | None = None) -> Path | Location:
    """Run (or resume) one federated experiment; return its output folder (a local path or a URI). ``on_round`` is
    given each round's row (``rounds.parquet``'s columns) as the round ends (``fedsim tune`` reports it to Ray Tune)."""
    offline_by_default()
    output_dir = Location(config.output_dir)
    if resume is None:
        prepare_output_dir(output_dir, overwrite)
    elif latest_checkpoint(output_dir / "checkpoints") is None:
        raise UsageError(f"--resume: {output_dir} has no complete checkpoint to resume from; start a new run instead")
    experiment = Experiment(config, output_dir, resumed=resume is not None, progress=progress, on_round=on_round)
    experiment.prepare()
    with ray_session(config):
        return experiment.run().native()


class CheckResult(NamedTuple):
    checked: list[str]  # what was checked, as a user would name it
    unchecked: dict[str, str]  # what could not be checked on this machine, and why
    notes: list[str]  # what `run` would also need (e.g. --overwrite)


def check(config: Config, resume: str | None = None) -> CheckResult:
    """Every check ``run`` makes before training (``Experiment.prepare``), without writing a file, loading model
    weights or starting Ray: the method, the private-init guard, the workload and its partition, the model and its
    target modules, the DP calibration (with ``resume``: the recalibration for the rounds still to run).

    A model or data files that are not on this machine are skipped and said so. Anything wrong raises
    ``UsageError``, as ``run`` would.
    """
    offline_by_default()
    output_dir = Location(config.output_dir)
    if resume is not None and latest_checkpoint(output_dir / "checkpoints") is None:
        raise UsageError(f"--resume: {output_dir} has no complete checkpoint to resume from; start a new run instead")
    notes = [] if resume is not None else [note for note in [prepare_output_dir(output_dir, overwrite=False, dry_run=True)] if note]
    experiment = Experiment(config, output_dir, resumed=resume is not None, progress=False)
    unchecked = experiment.prepare(dry_run=True)
    sigma = getattr(getattr(experiment, "privacy", None), "noise_multiplier", None) if config.privacy.enabled else None
    calibration = "DP calibration" + (f" (σ = {sigma:.4f})" if sigma is not None else "")
    areas = ["config", "method", "private-init guard", *([] if resume else ["workload and partition"]), "model and target modules",
             *([calibration] if config.privacy.enabled else [])]
    return CheckResult([area for area in areas if area.split(" (")[0] not in unchecked], unchecked, notes)


def reachable_offline(model_name: str) -> bool:
    """Whether the model's config can be read without a download: a local folder, or in the Hugging Face cache."""
    path = resolve_model_path(model_name)
    if os.path.exists(path):
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid hub id either (e.g. a local path that is absent)
        return False


def run_comparison(configs: list[Config], output_dir: str, overwrite: bool = False, progress: bool = True) -> Path | Location:
    """Run several configs (e.g. one per method) side by side under one Ray session; plot them together."""
    for config in configs:
        prepare_output_dir(Location(config.output_dir), overwrite)
    experiments = [Experiment(config, Location(config.output_dir), resumed=False, progress=progress) for config in configs]
    for experiment in experiments:
        experiment.prepare()
    with ray_session(configs[0]):
        for experiment in experiments:
            experiment.run()
    from analysis.plots import plot_runs

    plot_runs(Location(output_dir), Location(output_dir) / "comparison.png")  # each run drew its own plots as it finished
    return Location(output_dir).native()


def prepare_output_dir(output_dir: Location, overwrite: bool, dry_run: bool = False) -> str | None:
    """Refuse to write into an existing run unless asked; never delete a folder that is not a fedsim run.
    ``dry_run`` (``fedsim check``): return what would stop a run without ``--overwrite`` instead of raising it."""
    if output_dir.is_file():
        raise UsageError(f"output_dir: {output_dir} is a file; give a folder (it is created if absent)")
    if not output_dir.iterdir():
        return None
    if not overwrite:
        message = (f"output_dir: {output_dir} already exists; pass --overwrite to replace it, --resume {output_dir} to continue "
                   "it, or choose another output_dir")
        if dry_run:
            return message
        raise UsageError(message)
    if not (output_dir / "config.yaml").exists():
        raise UsageError(f"output_dir: {output_dir} exists and is not a fedsim run folder; --overwrite only replaces fedsim runs")
    output_dir.delete()
    return None


@contextlib.contextmanager
def ray_session(config: Config):
    """Connect to ``runtime.address`` / ``RAY_ADDRESS``, reuse an initialised Ray, or start a local one on 127.0.0.1.

    A ``UsageError`` raised inside an actor reaches the caller as that ``UsageError``, not as a Ray traceback.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(**ray_init_args(config))
    try:
        yield
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UsageError):
            raise UsageError(str(error.cause)) from None
        raise
    finally:
        if started_here:
            ray.shutdown()


def ray_init_args(config: Config) -> dict:
    """``ray.init``'s arguments: connect to ``runtime.address`` / ``RAY_ADDRESS``, or start a local Ray on 127.0.0.1
    big enough for the workers."""
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TRANSFORMERS_VERBOSITY": "error",
                        "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
    address = config.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address, "runtime_env": env}
    needed = math.ceil(config.runtime.workers * config.runtime.cpus_per_worker)
    return {"num_cpus": max(os.cpu_count() or 1, needed), "include_dashboard": False, "_node_ip_address": "127.0.0.1",
            "runtime_env": env, "logging_level": "warning"}


def worker_actors(runtime: RuntimeConfig) -> dict:
    """How the actors are asked of Ray: how many workers, each one's resources (a placement-group bundle), how long to
    wait for them, how often one may be restarted; the aggregator's GPUs."""
    return {"workers": runtime.workers, "aggregator_gpus": runtime.aggregator_gpus,
            "bundle": {"CPU": runtime.cpus_per_worker, **({"GPU": runtime.gpus_per_worker} if runtime.gpus_per_worker else {})},
            "placement_timeout_s": runtime.placement_timeout_s, "max_restarts": runtime.max_restarts}


class Experiment:
    """One run: its plan, its actors, its rounds."""

    def __init__(self, config: Config, output_dir: Location, resumed: bool, progress: bool,
                 on_round: Callable[[dict], None] | None = None):
        config.method = resolved(config.method)  # method.name and the method's own settings checked; config.yaml records them
        self.method = build_method(config.method, config.clients, config.seed)
        if self.method.num_clients is not None:
            config.clients.count = config.clients.per_round = self.method.num_clients
        check_private_init(config.privacy, config.adapters, self.method.needs_init_gradients)
        if config.runtime.presum and not self.method.aggregates_by_mean:
            raise UsageError(f"runtime.presum: {config.method.name} does not aggregate by the weighted mean of the uploads, so workers "
                             "cannot sum them; set runtime.presum=false (methods that can: "
                             f"{', '.join(name for name, cls in METHODS.items() if cls.aggregate is Method.aggregate)})")
        check_server_optimizer(self.method, config.server, config.train.rounds)
        self.config = config
        self.output_dir = output_dir
        self.resumed = resumed
        self.progress = progress
        self.on_round = on_round
        self.round_rows: list[dict] = []
        self.client_rows: list[dict] = []
        self.contacted: set[int] = set()  # clients with a row so far (sampled in a round: trained, dropped or failed)
        self.measured_s: dict[int, float] = {}  # each client's last training time (the scheduler's estimate of its work)
        self.client_init: dict[int, dict] = {}  # adapters.init_at: client — each worker's build of the round-0 state

    # -- before Ray -------------------------------------------------------------------------------
    def prepare(self, dry_run: bool = False) -> dict[str, str]:
        """Check the inputs, then write ``config.yaml``, ``data/`` and ``label_counts.parquet`` — before Ray starts.

        Everything that can be wrong with the input (workload, partition, model, privacy calibration) fails before a
        single file is written. A resumed run reads what its first start wrote, and recalibrates σ for the rounds left.
        ``dry_run`` (``fedsim check``): check, write nothing; a model or data files not on this machine are skipped.
        Returns what could not be checked, and why.
        """
        c, unchecked = self.config, {}
        needs = self.method.needs_init_gradients
        if self.resumed:
            data = DataPlan.read(self.output_dir / "data")
            self.check_model(data.num_labels, dry_run, unchecked)
            self.privacy = self.privacy_plan(data.client_sizes)
            last_round = self.last_round()
            self.privacy.resume(last_round, read_rows(self.output_dir / "clients.parquet", last_round),
                                read_rows(self.output_dir / "rounds.parquet", last_round), str(self.output_dir))
            self.plan = RunPlan.resolve(c, data, str(self.output_dir))
            return unchecked
        missing = [path for path in (c.workload.path, c.workload.options.get("eval_path"))
                   if isinstance(path, str) and not Location(path).exists()]
        if dry_run and missing:
            unchecked["workload and partition"] = f"{', '.join(missing)} not on this machine"
            if c.privacy.enabled:
                unchecked["DP calibration"] = "it needs the clients' sizes, from the data"
            self.check_model(2, dry_run, unchecked)  # any head size: the layer names are what is checked
            return unchecked
        split = split_data(c, public_sample=(needs and c.adapters.init_data == "public") or c.adapters.head_init == "public")
        self.check_model(split.num_labels, dry_run, unchecked)
        self.privacy = self.privacy_plan(split.client_sizes)
        self.privacy.calibrate()
        if dry_run:
            return unchecked
        save_config(c, self.output_dir / "config.yaml")
        self.plan = RunPlan.resolve(c, write_data(split, self.output_dir), str(self.output_dir))
        return unchecked

    def check_model(self, num_labels: int, dry_run: bool, unchecked: dict[str, str]) -> None:
        """``modeling.check_model`` (no weights loaded); in a dry run a model that is not on this machine is skipped."""
        if dry_run and not reachable_offline(self.config.model.name):
            unchecked["model and target modules"] = f"model.name={self.config.model.name} is not on this machine or in the HF cache"
            return
        check_model(self.config, num_labels)

    def privacy_plan(self, client_sizes: list[int]) -> PrivacyPlan:
        """The run's privacy plan (σ, each client's ε), from the privacy section and what it reads of the others."""
        c = self.config
        return PrivacyPlan(c.privacy, client_sizes, [client_steps(c.train, n) for n in client_sizes], c.train.batch_size,
                           c.train.rounds, c.adapters.init_data if self.method.needs_init_gradients else None,
                           c.adapters.init_samples)

    def last_round(self) -> int:
        """The round of the latest complete checkpoint (where a resumed run takes up)."""
        stem = Location(latest_checkpoint(self.output_dir / "checkpoints"))
        return json.loads((stem.parent / f"{stem.name}.json").read_text())["round"]

    # -- actors ---------------------------------------------------------------------------------
    @property
    def local_ray(self) -> bool:
        """Ray on this machine alone (no ``runtime.address`` / ``RAY_ADDRESS``): no autoscaler to wait for."""
        return not (self.config.runtime.address or os.environ.get("RAY_ADDRESS"))

    def start_actors(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        actors = worker_actors(self.config.runtime)
        driver_node = ray.get_runtime_context().get_node_id()
        aggregator_gpus = actors["aggregator_gpus"]
        if aggregator_gpus > next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == driver_node), 0):
            raise UsageError(f"runtime.aggregator_gpus: {aggregator_gpus:g} GPU for the aggregator, but the driver's node has fewer; "
                             "set runtime.aggregator_gpus=0 or run the driver on a GPU node")
        bundle = actors["bundle"]
        self.placement_group, self.requested_resources = place_workers(actors["workers"], bundle, actors["placement_timeout_s"],
                                                                       self.local_ray, name=group_name(self.config.output_dir))
        # A call to a worker that dies waits for Ray to restart it (on another node if its node is gone: the placement
        # group reschedules the bundle) and is retried there, however long the restart takes; a worker that dies more
        # than max_restarts times fails its calls (ActorDiedError): its clients are reported failed and it gets no more.
        worker_cls = ray.remote(max_restarts=actors["max_restarts"], max_task_retries=-1)(ClientWorker)
        self.workers = [
            worker_cls.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(self.plan, i)
            for i in range(actors["workers"])
        ]
        self.live = list(range(actors["workers"]))  # workers not gone beyond their restarts
        # The global state lives beside the driver: a lost worker node takes clients with it, never the state.
        # Two threads: a round's checkpoint is written while the next round's calls come in.
        beside_driver = NodeAffinitySchedulingStrategy(driver_node, soft=False)
        self.aggregator = ray.remote(Aggregator).options(num_cpus=0, num_gpus=aggregator_gpus, max_concurrency=2,
                                                         scheduling_strategy=beside_driver).remote(self.plan)

    def stop_actors(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.workers, self.aggregator]:
            ray.kill(actor)
        remove_placement_group(self.placement_group)
        if self.requested_resources:  # withdraw the request, so that the autoscaler may scale down again
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])

    def initial_state(self) -> None:
        """Round 0's global state, made by one worker (the LoRA-SB init reads calibration data: ``adapters.init_data``)."""
        import ray

        ray.get(self.aggregator.set_state.remote(self.workers[0].initial_state.remote()))

    def build_client_inits(self) -> None:
        """``adapters.init_at: client``: every worker builds the round-0 state once, as a client does at its first contact;
        its seconds are the ``init_s`` of each first contact it trains. Before round 0 each is checked bit-identical to
        the server's (a worker whose device builds other B and A is named: its clients would train other adapters)."""
        import ray

        server_state = None if self.resumed else self.aggregator.get_state.remote()
        built = ray.get([self.workers[worker_id].build_client_init.remote(server_state) for worker_id in self.live])
        self.client_init = dict(zip(self.live, built))
        for worker_id, result in self.client_init.items():
            if result["identical"] is False:
                print(f"fedsim: worker {worker_id} built a round-0 state that differs from the server's: with adapters.init_at=client "
                      "the clients it trains would start from other adapters")

    def init_seconds(self, row: dict) -> float:
        """A row's ``init_s``: the client's compute to build the round-0 state, at its first contact under
        ``adapters.init_at: client`` (the seconds of the worker that trained it; of the workers' mean for a client that
        dropped out, which builds it all the same), else 0."""
        if not self.client_init or row["client_id"] in self.contacted:
            return 0.0
        seconds = {worker_id: result["init_s"] for worker_id, result in self.client_init.items()}
        return seconds.get(row["worker_id"], float(np.mean(list(seconds.values()))))

    # -- rounds ---------------------------------------------------------------------------------
    def run(self) -> Location:
        import ray
        from tqdm.auto import tqdm

        c = self.config
        started = time.perf_counter()
        self.start_actors()
        try:
            start_round = self.restore() if self.resumed else 0
            self.provenance = collect(c.seed, ray.get([self.workers[worker_id].provenance.remote() for worker_id in self.live]))
            changed = record_start(self.output_dir, self.provenance, start_round)
            if changed:
                print(changed)
            if not self.resumed:
                self.initial_state()
            if c.adapters.init_at == "client":
                self.build_client_inits()
            save_config(c, self.output_dir / "config.yaml")
            checkpoints = str(self.output_dir / "checkpoints")
            self.writer = RoundWriter(self.output_dir, self.round_columns,
                                      lambda round_idx: ray.get(self.aggregator.checkpoint.remote(checkpoints, round_idx)))
            bar = tqdm(total=c.train.rounds * c.clients.per_round, initial=start_round * c.clients.per_round,
                       unit="client", desc=f"{c.method.name}", disable=not self.progress, dynamic_ncols=True)
            for round_idx in range(start_round, c.train.rounds):
                self.run_round(round_idx, bar)
            bar.close()
            self.writer.close()
            self.finish(time.perf_counter() - started)
        finally:
            self.stop_actors()
        return self.output_dir

    def sample(self, round_idx: int) -> tuple[list[int], set[int]]:
        c = self.config.clients
        sampled = sorted(rng(self.config.seed, "sampling", round_idx).choice(c.count, size=c.per_round, replace=False).tolist())
        dropped = {cid for cid in sampled if rng(self.config.seed, "dropout", round_idx, cid).random() < c.dropout}
        return sampled, dropped

    def run_round(self, round_idx: int, bar) -> None:
        import ray

        start = time.perf_counter()
        sampled, dropped = self.sample(round_idx)
        active = [cid for cid in sampled if cid not in dropped]
        for attempt in range(self.config.runtime.max_restarts + 1):
            rows, upload_refs, train_s_max = self.train_clients(round_idx, active, bar)
            try:
                aggregation = ray.get(self.aggregator.aggregate.remote(round_idx, sampled, *upload_refs))
                break
            except ray.exceptions.ObjectLostError as error:  # uploads held by a node that is gone
                if attempt == self.config.runtime.max_restarts:
                    raise
                print(f"fedsim: round {round_idx}: uploads lost with a node ({type(error).__name__}); training the round's clients again")
        rows += [self.client_row(round_idx, cid, "dropped") for cid in sorted(dropped)]
        bar.update(len(dropped))
        for row in rows:
            row["bytes_down"] = aggregation["bytes_down"][row["client_id"]]
            row["init_s"] = self.init_seconds(row)
            row["eval_metric"] = row["eval_loss"] = float("nan")
        eval_started = time.perf_counter()
        eval_metric, eval_loss, by_set = float("nan"), float("nan"), {}
        if self.evaluates(round_idx):
            pooled = self.evaluate_clients(rows, round_idx) if self.config.eval.per_client > 0 else None
            if not self.method.client_kinds(round_idx):
                eval_metric, eval_loss, by_set = self.evaluate()
            elif pooled:  # every client has its own model and no global one exists: the round scores the clients' own
                eval_metric, eval_loss = pooled
        eval_s = time.perf_counter() - eval_started
        rows.sort(key=lambda row: row["client_id"])
        self.privacy.account(rows)
        self.contacted.update(row["client_id"] for row in rows)
        ok = [row for row in rows if row["status"] == "ok"]
        self.client_rows += rows
        wall_s = time.perf_counter() - start
        self.round_rows.append({
            "round": round_idx, "method": self.config.method.name, "clients_sampled": len(sampled),
            "clients_ok": len(ok), "bytes_up": sum(row["bytes_up"] for row in rows),
            "bytes_down": sum(row["bytes_down"] for row in rows), "agg_error": aggregation["agg_error"],
            "agg_error_se": aggregation["agg_error_se"],
            "train_loss": float(np.mean([row["train_loss"] for row in ok])) if ok else float("nan"),
            "eval_metric": eval_metric, "eval_loss": eval_loss, "wall_s": wall_s, "train_s_max": train_s_max,
            "aggregate_s": aggregation["aggregate_s"], "eval_s": eval_s,
            "overhead_s": wall_s - train_s_max - aggregation["aggregate_s"] - eval_s,
            "noise_multiplier": float("nan") if self.privacy.noise_multiplier is None else self.privacy.noise_multiplier,
            "epsilon_max": max((row["epsilon"] for row in rows), default=float("nan")),
            **{f"eval_metric_{name}": by_set.get(name, float("nan")) for name in self.plan.data.eval_sets},
        })
        self.writer.submit(round_idx, self.round_rows, self.client_rows)
        if self.on_round is not None:
            self.on_round(self.round_rows[-1])
        bar.set_postfix(round=round_idx, loss=f"{self.round_rows[-1]['train_loss']:.3f}", acc=f"{eval_metric:.3f}", refresh=False)

    def evaluates(self, round_idx: int) -> bool:
        """Whether the global model is evaluated after ``round_idx``: every ``eval.every`` rounds, and after the last."""
        return (round_idx + 1) % self.config.eval.every == 0 or round_idx == self.config.train.rounds - 1

    def assign(self, client_ids: list[int]) -> dict[int, list[int]]:
        """The round's clients over the live workers, balanced by predicted work (longest first, each to the least loaded
        worker): a client's last measured training time, or, before it has one, its steps × rows a step × characters a
        row at the rate measured so far. Which worker trains a client never changes what it computes."""
        data, train = self.plan.data, self.config.train
        def units(cid: int) -> float:  # steps × rows a step × characters a row
            n = data.client_sizes[cid]
            return client_steps(train, n) * min(train.batch_size, n) * data.client_chars[cid] / max(1, n)

        known_units = sum(units(cid) for cid in self.measured_s)
        rate = sum(self.measured_s.values()) / known_units if known_units > 0 else 1.0
        cost = {cid: self.measured_s.get(cid, rate * units(cid)) for cid in client_ids}
        loads = {worker_id: 0.0 for worker_id in self.live}
        shares: dict[int, list[int]] = {worker_id: [] for worker_id in self.live}
        for cid in sorted(client_ids, key=lambda cid: (-cost[cid], cid)):
            worker_id = min(self.live, key=lambda w: (loads[w], w))
            shares[worker_id].append(cid)
            loads[worker_id] += cost[cid]
        return {worker_id: sorted(share) for worker_id, share in shares.items() if share}

    def train_clients(self, round_idx: int, active: list[int], bar) -> tuple[list[dict], list, float]:
        """Each worker trains its share of the round in one call; returns their rows, the references to their uploads,
        and the slowest worker's training time (the sum of its clients' ``train_s``).

        A worker that dies is restarted by Ray (on another node if its node is gone) and its call retried; one that
        dies beyond ``runtime.max_restarts`` leaves its clients ``failed`` and is given no more clients.
        """
        import ray

        if not self.live:
            raise RuntimeError("every worker is gone beyond runtime.max_restarts")
        state_ref = self.aggregator.round_message.remote()
        calls = {}
        for worker_id, share in self.assign(active).items():
            calls[worker_id] = (share, *self.workers[worker_id].train.options(num_returns=2).remote(
                round_idx, state_ref, share, self.privacy.noise_multiplier))
        rows, upload_refs, train_s = [], [], {}
        pending = {call[2]: worker_id for worker_id, call in calls.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            worker_id = pending.pop(done[0])
            share, uploads_ref, rows_ref = calls[worker_id]
            try:
                worker_rows = ray.get(rows_ref)
                rows += worker_rows
                upload_refs.append(uploads_ref)
                train_s[worker_id] = sum(row["train_s"] for row in worker_rows)
                self.measured_s.update({row["client_id"]: row["train_s"] for row in worker_rows if row["steps"] > 0})
            except ray.exceptions.RayError as error:  # the actor died beyond its restarts: its clients failed
                rows += [self.client_row(round_idx, cid, "failed", worker_id) for cid in share]
                self.live.remove(worker_id)
                print(f"fedsim: worker {worker_id} failed in round {round_idx}: {type(error).__name__}")
            bar.update(len(share))
        return rows, upload_refs, max(train_s.values(), default=0.0)

    def client_row(self, round_idx: int, client_id: int, status: str, worker_id: int = -1) -> dict:
        return {"round": round_idx, "client_id": client_id, "worker_id": worker_id, "rank": self.plan.client_ranks[client_id],
                "samples": 0, "steps": 0, "train_loss": float("nan"), "bytes_up": 0, "bytes_down": 0,
                "train_s": 0.0, "status": status, "noise_multiplier": float("nan"), "sample_rate": float("nan")}

    @property
    def round_columns(self) -> list[str]:
        """``rounds.parquet``'s columns: ``eval_metric_<set>`` too for each evaluation subset of a causal-LM workload."""
        return ROUND_COLUMNS + [f"eval_metric_{name}" for name in self.plan.data.eval_sets]

    def evaluate(self) -> tuple[float, float, dict[str, float]]:
        """(eval_metric, eval_loss, per-subset metric). Classification: accuracy. Causal LM: the mean of the per-subset
        accuracies, as the paper averages its commonsense sets. The evaluation's fixed chunks are spread over the live
        workers and summed in chunk order, so the numbers do not depend on how many workers there are."""
        state_ref = self.aggregator.get_state.remote()
        chunks = list(range(self.plan.data.eval_chunks))
        shares = {worker_id: chunks[i::len(self.live)] for i, worker_id in enumerate(self.live)}
        calls = {worker_id: self.workers[worker_id].evaluate.remote(state_ref, share) for worker_id, share in shares.items() if share}
        parts = {chunk: sums for part in self.gather(calls, "its share of the evaluation data") for chunk, sums in part.items()}
        ordered = [parts[chunk] for chunk in sorted(parts)]
        count = sum(p["count"] for p in ordered)
        if count == 0:
            return float("nan"), float("nan"), {}
        loss = sum(p["loss_sum"] for p in ordered) / count
        if not self.plan.data.eval_sets:
            return sum(p["correct"] for p in ordered) / count, loss, {}
        totals = {name: [0.0, 0.0] for name in self.plan.data.eval_sets}
        for part in ordered:
            for name, tally in part.get("sets", {}).items():
                totals[name][0] += tally["correct"]
                totals[name][1] += tally["count"]
        by_set = {name: c / n for name, (c, n) in totals.items() if n > 0}
        return float(np.mean(list(by_set.values()))), loss, by_set

    def evaluate_clients(self, rows: list[dict], round_idx: int) -> tuple[float, float] | None:
        """``eval.per_client``: each of the round's clients' own model after the round (the new global model, with what
        a personalised client keeps over it) scored on the client's own held-out rows. Returns the pooled (accuracy,
        loss) over those rows: the round's score where the method keeps tensors on its clients (FedSA-LoRA), as the
        personalisation papers report it; None where no client had held-out rows."""
        state_ref = self.aggregator.get_state.remote()
        owners = [row["client_id"] for row in rows if self.plan.data.client_eval_sizes[row["client_id"]] > 0]
        calls = {worker_id: self.workers[worker_id].evaluate_clients.remote(state_ref, owners[i::len(self.live)], round_idx)
                 for i, worker_id in enumerate(self.live) if owners[i::len(self.live)]}
        scores = {cid: score for part in self.gather(calls, "its clients' own evaluation") for cid, score in part.items()}
        for row in rows:
            score = scores.get(row["client_id"])
            if score and score["count"]:
                row["eval_metric"], row["eval_loss"] = score["correct"] / score["count"], score["loss_sum"] / score["count"]
        count = sum(score["count"] for score in scores.values())
        if not count:
            return None
        return sum(score["correct"] for score in scores.values()) / count, sum(score["loss_sum"] for score in scores.values()) / count

    def gather(self, calls: dict, what: str) -> list:
        """The results of one call per worker; a worker gone beyond its restarts is left out (and given no more calls),
        with a message saying what is missing."""
        import ray

        results = []
        for worker_id, call in calls.items():
            try:
                results.append(ray.get(call))
            except ray.exceptions.ActorDiedError:
                self.live.remove(worker_id)
                print(f"fedsim: worker {worker_id} is gone; {what} is left out")
        return results

    # -- results --------------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the latest complete checkpoint and the result rows up to it; return the round to run next."""
        import ray

        stem = latest_checkpoint(self.output_dir / "checkpoints")
        last_round = ray.get(self.aggregator.restore.remote(stem))
        self.plan.client_store.rollback(last_round)  # what clients kept in rounds the checkpoint never saw
        self.round_rows += read_rows(self.output_dir / "rounds.parquet", last_round)
        self.client_rows += [{"init_s": 0.0, **row} for row in read_rows(self.output_dir / "clients.parquet", last_round)]
        for row in self.client_rows:
            self.contacted.add(row["client_id"])
            if row["steps"] > 0:
                self.measured_s[row["client_id"]] = row["train_s"]
        return last_round + 1

    def finish(self, wall_s: float) -> None:
        import ray

        state_ref = self.aggregator.get_state.remote()
        ray.get(self.workers[self.live[0]].export.remote(state_ref, str(self.output_dir / "adapter")))
        workers = ray.get([self.workers[worker_id].info.remote() for worker_id in self.live])
        last_eval = next((row for row in reversed(self.round_rows) if not math.isnan(row["eval_metric"])), None)
        train_s = sum(row["train_s"] for row in self.client_rows)
        rounds_wall = sum(row["wall_s"] for row in self.round_rows)
        summary = {
            "method": self.config.method.name,
            "rounds": len(self.round_rows),
            "final_eval_metric": last_eval["eval_metric"] if last_eval else None,
            "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
            "bytes_up": sum(row["bytes_up"] for row in self.round_rows),
            "bytes_down": sum(row["bytes_down"] for row in self.round_rows),
            "max_agg_error": max((row["agg_error"] for row in self.round_rows if not math.isnan(row["agg_error"])), default=None),
            "wall_s": wall_s,
            "efficiency": train_s / (rounds_wall * self.config.runtime.workers) if rounds_wall > 0 else None,
            "workers": workers,
            "model_loads": sum(w["model_loads"] for w in workers),
            "trainable_adapter_parameters": workers[0]["trainable_adapter_parameters"],
            "trainable_head_parameters": workers[0]["trainable_head_parameters"],
            "privacy": self.privacy.summary(),
            "provenance": self.provenance,
            **({"client_init": {str(worker_id): result for worker_id, result in self.client_init.items()}} if self.client_init else {}),
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from analysis.plots import write_run_plots

        write_run_plots(self.output_dir)


def group_name(output_dir: str) -> str:
    """The name of a run's placement group (``ray status`` and the dashboard show it): its output folder. `fedsim tune`
    finds the groups of a trial it stopped by it."""
    return f"fedsim:{output_dir}"


def place_workers(workers: int, bundle: dict, timeout_s: float, local: bool, name: str = ""):
    """A placement group of one bundle a worker, spread over the nodes, named ``name``; and whether the autoscaler was
    asked for it.

    A local Ray that cannot hold the workers is a clear error at once. On a cluster, what is missing may be
    on its way (an autoscaler adding GPU nodes): fedsim asks the autoscaler for the bundles and waits up to
    ``runtime.placement_timeout_s``, then fails with the same clear error.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    short = missing_resources(workers, bundle)
    if short and local:
        raise UsageError(short)
    if short:
        from ray.autoscaler.sdk import request_resources

        print(f"fedsim: waiting up to {timeout_s:g} s for the cluster to grow: {short.split(';')[0]}")
        request_resources(bundles=[bundle] * workers)
    group = placement_group([bundle] * workers, strategy="SPREAD", name=name)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        if short:
            request_resources(bundles=[])
        raise UsageError(missing_resources(workers, bundle) or
                         f"runtime.placement_timeout_s: the {workers} workers' resources ({bundle} each) were not free "
                         f"within {timeout_s:g} s; raise runtime.placement_timeout_s or free the cluster") from None
    return group, bool(short)


def missing_resources(workers: int, bundle: dict) -> str | None:
    """What the cluster lacks to hold the workers asked for, as a one-line error; None if it has it all."""
    import ray

    available = ray.cluster_resources()
    for resource, per_worker in bundle.items():
        needed = workers * per_worker
        if needed > available.get(resource, 0) + 1e-9:
            key = {"CPU": "runtime.cpus_per_worker", "GPU": "runtime.gpus_per_worker"}[resource]
            return (f"{key}: {workers} workers × {per_worker} {resource} = {needed:g} {resource}s, but the Ray cluster has "
                    f"{available.get(resource, 0):g}; lower runtime.workers or {key}")
    return None
