"""The driver: partitions the data once, starts the actors, runs the rounds, writes results, checkpoints, resumes.

Round r: sample clients (seeded by (seed, r)); simulate dropout; give each worker its cohort in one
call with a reference to the global state; pass the workers' uploads, by reference, to the
aggregator; evaluate; write a row per round and per client; checkpoint. The driver never holds
training data or adapter tensors, only the per-client statistics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedsim.client import derive_seed
from fedsim.config import Config, config_to_dict, save_config
from fedsim.errors import UsageError
from fedsim.methods import build_method
from fedsim.modeling import check_model, offline_by_default
from fedsim.partition import HELD_OUT, assign_ranks, hold_out_per_client, label_counts, partition, write_partitioned
from fedsim.privacy import calibrate_noise, epsilon_spent
from fedsim.runtime.aggregator import Aggregator, latest_checkpoint
from fedsim.runtime.settings import init_spends_privacy, method_settings, privacy_history
from fedsim.runtime.worker import ClientWorker
from fedsim.storage import Location

ROUND_COLUMNS = ["round", "method", "clients_sampled", "clients_ok", "bytes_up", "bytes_down", "agg_error",
                 "train_loss", "eval_metric", "eval_loss", "wall_s", "epsilon_max"]
CLIENT_COLUMNS = ["round", "client_id", "worker_id", "rank", "samples", "steps", "train_loss", "bytes_up",
                  "bytes_down", "train_s", "status", "noise_multiplier", "sample_rate", "epsilon", "eval_metric", "eval_loss"]
SAMPLING_STREAM, DROPOUT_STREAM = 1, 2


def run(config: Config, resume: str | None = None, overwrite: bool = False, progress: bool = True) -> Path | Location:
    """Run (or resume) one federated experiment; return its output folder (a local path or a URI)."""
    offline_by_default()
    output_dir = Location(config.output_dir)
    if resume is None:
        prepare_output_dir(output_dir, overwrite)
    elif latest_checkpoint(output_dir / "checkpoints") is None:
        raise UsageError(f"--resume: {output_dir} has no complete checkpoint to resume from; start a new run instead")
    experiment = Experiment(config, output_dir, resumed=resume is not None, progress=progress)
    experiment.prepare()
    with ray_session(config):
        return experiment.run().native()


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
    from analysis.plots import write_run_plots

    write_run_plots(Location(output_dir))
    return Location(output_dir).native()


def prepare_output_dir(output_dir: Location, overwrite: bool) -> None:
    """Refuse to write into an existing run unless asked; never delete a folder that is not a fedsim run."""
    if output_dir.is_file():
        raise UsageError(f"output_dir: {output_dir} is a file; give a folder (it is created if absent)")
    if not output_dir.iterdir():
        return
    if not overwrite:
        raise UsageError(f"output_dir: {output_dir} already exists; pass --overwrite to replace it, --resume {output_dir} to continue it, or choose another output_dir")
    if not (output_dir / "config.yaml").exists():
        raise UsageError(f"output_dir: {output_dir} exists and is not a fedsim run folder; --overwrite only replaces fedsim runs")
    output_dir.delete()


@contextlib.contextmanager
def ray_session(config: Config):
    """Connect to ``runtime.address`` / ``RAY_ADDRESS``, reuse an initialised Ray, or start a local one on 127.0.0.1.

    A ``UsageError`` raised inside an actor reaches the caller as that ``UsageError``, not as a Ray traceback.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        address = config.runtime.address or os.environ.get("RAY_ADDRESS")
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TRANSFORMERS_VERBOSITY": "error",
                            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
        if address:
            ray.init(address=address, runtime_env=env)
        else:
            needed = math.ceil(config.runtime.workers * config.runtime.cpus_per_worker)
            ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, _node_ip_address="127.0.0.1",
                     runtime_env=env, logging_level="warning")
    try:
        yield
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UsageError):
            raise UsageError(str(error.cause)) from None
        raise
    finally:
        if started_here:
            ray.shutdown()


class Experiment:
    """One run: its data on disk, its actors, its rounds."""

    def __init__(self, config: Config, output_dir: Location, resumed: bool, progress: bool):
        self.config = config
        self.output_dir = output_dir
        self.resumed = resumed
        self.progress = progress
        self.method = build_method(config.method.name, method_settings(config))  # validates name and rank early
        p, a = config.privacy, config.adapters
        if p.enabled and self.method.needs_init_gradients and a.init_data != "public" and p.init_noise_multiplier is None:
            raise UsageError(f"privacy.init_noise_multiplier: LoRA-SB's initialisation reads client data (adapters.init_data={a.init_data}); "
                             "set adapters.init_data=public, or a privacy.init_noise_multiplier so that it is computed privately and counted")
        if self.method.num_clients is not None:
            config.clients.count = config.clients.per_round = self.method.num_clients
        self.data_dir = output_dir / "data"
        self.round_rows: list[dict] = []
        self.client_rows: list[dict] = []
        self.client_history: dict[int, list[dict]] = {}  # a client's rows so far (its privacy history)
        c = config
        self.ranks = assign_ranks(c.clients.ranks, c.clients.count, c.method.rank, c.seed)

    # -- data ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the inputs and write ``config.yaml``, ``data/`` and ``label_counts.parquet`` — before Ray starts.

        Everything that can be wrong with the input (workload, partition, model) fails here, before a
        single file is written. A resumed run reads what its first start wrote.
        """
        if self.resumed:
            self.meta = json.loads((self.data_dir / "meta.json").read_text())
            check_model(self.config, self.meta["num_labels"])
            return
        from workloads import load_workload

        c = self.config
        workload = load_workload(c.workload.name, c.workload.path, c.workload.train_limit, c.workload.eval_limit,
                                 c.seed, **c.workload.options)
        if workload.task != c.model.task:
            raise UsageError(f"model.task: {c.model.task} does not fit workload {workload.name}, a {workload.task} task; set model.task={workload.task}")
        public = self.hold_out_public(workload)  # before partitioning: the public sample belongs to no client
        labels = workload.train_labels
        client_ids = partition(labels, c.clients.count, c.clients.partition, alpha=c.clients.alpha, seed=c.seed,
                               dominant_share=c.clients.dominant_share)
        check_model(c, workload.num_labels)
        save_config(c, self.output_dir / "config.yaml")
        held_out = hold_out_per_client(client_ids, c.eval.per_client, c.seed)
        train = workload.train.append_column(HELD_OUT, pa.array(held_out)) if held_out.any() else workload.train
        write_partitioned(train, client_ids, self.data_dir / "train.parquet")
        if public is not None:
            write_partitioned(public, np.zeros(public.num_rows, dtype=np.int64), self.data_dir / "public.parquet")
        eval_shards = np.arange(workload.eval.num_rows) % c.runtime.workers
        write_partitioned(workload.eval, eval_shards, self.data_dir / "eval.parquet")
        (self.output_dir / "label_counts.parquet").write_table(label_counts(client_ids, labels, c.clients.count, workload.num_labels))
        self.meta = {"workload": workload.name, "num_labels": workload.num_labels, "label_names": workload.label_names,
                     "train_rows": workload.train.num_rows, "eval_rows": workload.eval.num_rows,
                     "client_sizes": np.bincount(client_ids[~held_out], minlength=c.clients.count).tolist(),
                     "client_eval_sizes": np.bincount(client_ids[held_out], minlength=c.clients.count).tolist(),
                     "eval_sets": sorted(set(workload.eval.column("subset").to_pylist())) if workload.task == "causal-lm" else []}
        self.meta["noise_multiplier"] = self.noise_multiplier(self.meta["client_sizes"])
        (self.data_dir / "meta.json").write_text(json.dumps(self.meta))

    def noise_multiplier(self, client_sizes: list[int]) -> float | None:
        """DP-SGD's σ for every client: ``privacy.noise_multiplier``, or calibrated so that the smallest client (the
        largest sampling rate) spends at most ``privacy.epsilon`` if it took part in every round — after the cost of
        a private LoRA-SB init where that read client data. Every other client then spends less."""
        p, c = self.config.privacy, self.config
        if not p.enabled:
            return None
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        sample_rate = min(1.0, c.train.batch_size / max(1, min(client_sizes)))
        spends = any(init_spends_privacy(c, self.method.needs_init_gradients, cid) for cid in range(c.clients.count))
        spent = [(p.init_noise_multiplier, 1.0, 1)] if spends else []
        try:
            return calibrate_noise(p.epsilon, p.delta, sample_rate, c.train.rounds * c.train.local_steps, p.accountant, spent)
        except ValueError as error:
            raise UsageError(f"privacy.init_noise_multiplier: {error}; raise it or use adapters.init_data=public") from None

    def hold_out_public(self, workload):
        """``adapters.init_data: public``: a seeded sample of ``adapters.init_samples`` training rows, taken out of
        the training data before it is partitioned, is the public calibration set of the LoRA-SB init.
        It belongs to no client, so reading it costs no client any privacy."""
        a = self.config.adapters
        if a.init_data != "public" or not self.method.needs_init_gradients:
            return None
        rows = workload.train.num_rows
        if a.init_samples >= rows:
            raise UsageError(f"adapters.init_samples: {a.init_samples} public rows would leave no training data ({rows} rows); use fewer")
        rng = np.random.default_rng(derive_seed(self.config.seed, 0, 0, 5))
        public_index = np.sort(rng.choice(rows, size=a.init_samples, replace=False))
        keep = np.setdiff1d(np.arange(rows), public_index)
        public = workload.train.take(public_index)
        workload.train = workload.train.take(keep)
        return public

    # -- actors ---------------------------------------------------------------------------------
    @property
    def local_ray(self) -> bool:
        """Ray on this machine alone (no ``runtime.address`` / ``RAY_ADDRESS``): no autoscaler to wait for."""
        return not (self.config.runtime.address or os.environ.get("RAY_ADDRESS"))

    def start_actors(self, num_labels: int) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        r = self.config.runtime
        driver_node = ray.get_runtime_context().get_node_id()
        if r.aggregator_gpus > next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == driver_node), 0):
            raise UsageError(f"runtime.aggregator_gpus: {r.aggregator_gpus:g} GPU for the aggregator, but the driver's node has fewer; "
                             "set runtime.aggregator_gpus=0 or run the driver on a GPU node")
        bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
        self.placement_group, self.requested_resources = place_workers(r.workers, bundle, r.placement_timeout_s, self.local_ray)
        owners = np.arange(self.config.clients.count) % r.workers
        config_dict = config_to_dict(self.config)
        # A call to a worker that dies waits for Ray to restart it (on another node if its node is gone: the placement
        # group reschedules the bundle) and is retried there, however long the restart takes; a worker that dies more
        # than max_restarts times fails its calls (ActorDiedError), and its clients are reported failed.
        worker_cls = ray.remote(max_restarts=r.max_restarts, max_task_retries=-1)(ClientWorker)
        self.workers = [
            worker_cls.options(
                num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(config_dict, i, r.workers, str(self.data_dir), np.flatnonzero(owners == i).tolist(), num_labels)
            for i in range(r.workers)
        ]
        self.owner = owners
        # The global state lives beside the driver: a lost worker node takes clients with it, never the state.
        beside_driver = NodeAffinitySchedulingStrategy(driver_node, soft=False)
        self.aggregator = ray.remote(Aggregator).options(num_cpus=0, num_gpus=r.aggregator_gpus,
                                                         scheduling_strategy=beside_driver).remote(config_dict)

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
        """Round-0 state, computed on one worker; for LoRA-SB the calibration gradients come from the clients' own data
        (``adapters.init_data``). Pooled: ⌈init_samples / count⌉ rows from each of the first init_samples clients, gathered
        by that worker (rows are small; the d×k gradient sums never leave its device, only B, R, A do)."""
        import ray

        a = self.config.adapters
        worker = self.workers[0]
        if not self.method.needs_init_gradients:
            call = worker.initial_state.remote()
        elif a.init_data == "public":
            call = worker.initial_state.remote(None, 0, a.init_batch_size)
        elif a.init_data == "client":
            call = self.workers[int(self.owner[0])].initial_state.remote([0], a.init_samples, a.init_batch_size)
        else:  # pooled: every client (up to init_samples of them) contributes a share of the calibration sample
            count = self.config.clients.count
            share = max(1, math.ceil(a.init_samples / count))
            call = worker.initial_state.remote(list(range(min(count, a.init_samples))), share, a.init_batch_size)
        ray.get(self.aggregator.set_state.remote(call))

    # -- rounds ---------------------------------------------------------------------------------
    def run(self) -> Location:
        from tqdm.auto import tqdm

        c = self.config
        started = time.perf_counter()
        self.start_actors(self.meta["num_labels"])
        try:
            start_round = self.restore() if self.resumed else 0
            if not self.resumed:
                self.initial_state()
            save_config(c, self.output_dir / "config.yaml")
            bar = tqdm(total=c.train.rounds * c.clients.per_round, initial=start_round * c.clients.per_round,
                       unit="client", desc=f"{c.method.name}", disable=not self.progress, dynamic_ncols=True)
            for round_idx in range(start_round, c.train.rounds):
                self.run_round(round_idx, bar)
            bar.close()
            self.finish(time.perf_counter() - started)
        finally:
            self.stop_actors()
        return self.output_dir

    def sample(self, round_idx: int) -> tuple[list[int], set[int]]:
        c = self.config.clients
        rng = np.random.default_rng(derive_seed(self.config.seed, round_idx, SAMPLING_STREAM))
        sampled = sorted(rng.choice(c.count, size=c.per_round, replace=False).tolist())
        dropped = {cid for cid in sampled
                   if np.random.default_rng(derive_seed(self.config.seed, round_idx, cid, DROPOUT_STREAM)).random() < c.dropout}
        return sampled, dropped

    def run_round(self, round_idx: int, bar) -> None:
        import ray

        start = time.perf_counter()
        sampled, dropped = self.sample(round_idx)
        active = [cid for cid in sampled if cid not in dropped]
        bytes_down = ray.get(self.aggregator.downlink_bytes.remote(sampled))
        for attempt in range(self.config.runtime.max_restarts + 1):
            rows, upload_refs = self.train_cohorts(round_idx, active, bar)
            try:
                aggregation = ray.get(self.aggregator.aggregate.remote(round_idx, *upload_refs))
                break
            except ray.exceptions.ObjectLostError as error:  # uploads held by a node that is gone
                if attempt == self.config.runtime.max_restarts:
                    raise
                print(f"fedsim: round {round_idx}: uploads lost with a node ({type(error).__name__}); training the round's clients again")
        rows += [self.client_row(round_idx, cid, "dropped", 0) for cid in sorted(dropped)]
        bar.update(len(dropped))
        for row in rows:
            row["bytes_down"] = bytes_down[row["client_id"]]
        eval_metric = eval_loss = float("nan")
        self.eval_by_set = {}
        for row in rows:
            row["eval_metric"] = row["eval_loss"] = float("nan")
        if (round_idx + 1) % self.config.eval.every == 0 or round_idx == self.config.train.rounds - 1:
            eval_metric, eval_loss = self.evaluate()
            if self.config.eval.per_client > 0:
                self.evaluate_clients(rows)
        rows.sort(key=lambda row: row["client_id"])
        self.account(rows)
        ok = [row for row in rows if row["status"] == "ok"]
        self.client_rows += rows
        self.round_rows.append({
            "round": round_idx, "method": self.config.method.name, "clients_sampled": len(sampled),
            "clients_ok": len(ok), "bytes_up": sum(row["bytes_up"] for row in rows),
            "bytes_down": sum(row["bytes_down"] for row in rows), "agg_error": aggregation["agg_error"],
            "train_loss": float(np.mean([row["train_loss"] for row in ok])) if ok else float("nan"),
            "eval_metric": eval_metric, "eval_loss": eval_loss, "wall_s": time.perf_counter() - start,
            "epsilon_max": max((row["epsilon"] for row in rows), default=float("nan")),
            **{f"eval_metric_{name}": self.eval_by_set.get(name, float("nan")) for name in self.eval_sets},
        })
        self.write_tables()
        ray.get(self.aggregator.checkpoint.remote(str(self.output_dir / "checkpoints"), round_idx))
        bar.set_postfix(round=round_idx, loss=f"{self.round_rows[-1]['train_loss']:.3f}", acc=f"{eval_metric:.3f}", refresh=False)

    def train_cohorts(self, round_idx: int, active: list[int], bar) -> tuple[list[dict], list]:
        """Each worker trains its clients of the round in one call; returns their rows and the references to their uploads.

        A worker that dies is restarted by Ray (on another node if its node is gone) and its call retried;
        one that dies beyond ``runtime.max_restarts`` leaves its clients ``failed``.
        """
        import ray

        state_ref = self.aggregator.get_state.remote()
        calls = {}
        for worker_id, worker in enumerate(self.workers):
            cohort = [cid for cid in active if self.owner[cid] == worker_id]
            if cohort:
                calls[worker_id] = (cohort, *worker.run_cohort.options(num_returns=2).remote(round_idx, state_ref, cohort))
        rows, upload_refs = [], []
        pending = {call[2]: worker_id for worker_id, call in calls.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            worker_id = pending.pop(done[0])
            cohort, uploads_ref, rows_ref = calls[worker_id]
            try:
                rows += ray.get(rows_ref)
                upload_refs.append(uploads_ref)
            except ray.exceptions.RayError as error:  # the actor died beyond its restarts: its clients failed
                rows += [self.client_row(round_idx, cid, "failed", 0, worker_id) for cid in cohort]
                print(f"fedsim: worker {worker_id} failed in round {round_idx}: {type(error).__name__}")
            bar.update(len(cohort))
        return rows, upload_refs

    def client_row(self, round_idx: int, client_id: int, status: str, bytes_down: int, worker_id: int | None = None) -> dict:
        return {"round": round_idx, "client_id": client_id,
                "worker_id": int(self.owner[client_id]) if worker_id is None else worker_id, "rank": int(self.ranks[client_id]),
                "samples": 0, "steps": 0, "train_loss": float("nan"), "bytes_up": 0, "bytes_down": bytes_down,
                "train_s": 0.0, "status": status, "noise_multiplier": float("nan"), "sample_rate": float("nan")}

    def account(self, rows: list[dict]) -> None:
        """ε spent so far by each client of the round (Opacus's accountant over its whole history); NaN without DP."""
        p = self.config.privacy
        for row in rows:
            self.client_history.setdefault(row["client_id"], []).append(row)
        for row in rows:
            if not p.enabled:
                row["epsilon"] = float("nan")
                continue
            history = privacy_history(self.config, self.method.needs_init_gradients, row["client_id"], self.client_history[row["client_id"]])
            row["epsilon"] = epsilon_spent(history, p.delta, p.accountant)

    @property
    def eval_sets(self) -> list[str]:
        """The evaluation subsets of a causal-LM workload (each gets an ``eval_metric_<set>`` column); [] for classification."""
        return self.meta.get("eval_sets", [])

    def evaluate(self) -> tuple[float, float]:
        """(eval_metric, eval_loss). Classification: accuracy. Causal LM: the mean of the per-subset accuracies
        (each also kept in ``self.eval_by_set``), as the paper averages its commonsense sets."""
        state_ref = self.aggregator.get_state.remote()
        parts = from_live_workers([worker.evaluate.remote(state_ref) for worker in self.workers], "its share of the evaluation data")
        count = sum(p["count"] for p in parts)
        if count == 0:
            return float("nan"), float("nan")
        loss = sum(p["loss_sum"] for p in parts) / count
        if not self.eval_sets:
            return sum(p["correct"] for p in parts) / count, loss
        totals = {name: [0.0, 0.0] for name in self.eval_sets}
        for part in parts:
            for name, tally in part.get("sets", {}).items():
                totals[name][0] += tally["correct"]
                totals[name][1] += tally["count"]
        self.eval_by_set = {name: c / n for name, (c, n) in totals.items() if n > 0}
        return float(np.mean(list(self.eval_by_set.values()))), loss

    def evaluate_clients(self, rows: list[dict]) -> None:
        """``eval.per_client``: the new global model scored on each of the round's clients' own held-out rows."""
        state_ref = self.aggregator.get_state.remote()
        calls = [worker.evaluate_clients.remote(state_ref, [row["client_id"] for row in rows if self.owner[row["client_id"]] == i])
                 for i, worker in enumerate(self.workers)]
        scores = {client_id: score for part in from_live_workers(calls, "its clients' own evaluation") for client_id, score in part.items()}
        for row in rows:
            score = scores.get(row["client_id"])
            if score and score["count"]:
                row["eval_metric"], row["eval_loss"] = score["correct"] / score["count"], score["loss_sum"] / score["count"]

    # -- results --------------------------------------------------------------------------------
    def write_tables(self) -> None:
        write_rows(self.round_rows, ROUND_COLUMNS + [f"eval_metric_{name}" for name in self.eval_sets], self.output_dir / "rounds.parquet")
        write_rows(self.client_rows, CLIENT_COLUMNS, self.output_dir / "clients.parquet")

    def restore(self) -> int:
        """Load the latest complete checkpoint and the result rows up to it; return the round to run next."""
        import ray

        stem = latest_checkpoint(self.output_dir / "checkpoints")
        last_round = ray.get(self.aggregator.restore.remote(stem))
        for name, rows in (("rounds.parquet", self.round_rows), ("clients.parquet", self.client_rows)):
            table = (self.output_dir / name).read_table()
            rows += [row for row in table.to_pylist() if row["round"] <= last_round]
        for row in self.client_rows:
            self.client_history.setdefault(row["client_id"], []).append(row)
        return last_round + 1

    def privacy_summary(self) -> dict:
        p, a = self.config.privacy, self.config.adapters
        if not p.enabled:
            return {"enabled": False}
        spent = [row["epsilon"] for row in self.client_rows if row["epsilon"] == row["epsilon"]]
        return {
            "enabled": True, "target_epsilon": p.epsilon, "noise_multiplier": self.meta["noise_multiplier"], "delta": p.delta,
            "accountant": p.accountant, "max_grad_norm": p.max_grad_norm, "epsilon_max": max(spent, default=0.0),
            "init": ("no data (LoRA's random initialisation)" if not self.method.needs_init_gradients
                     else "public data held out from every client (no privacy spent)" if a.init_data == "public"
                     else f"private: clipped at {p.max_grad_norm}, noise multiplier {p.init_noise_multiplier}, counted once per client ({a.init_data})"),
        }

    def finish(self, wall_s: float) -> None:
        import ray

        state_ref = self.aggregator.get_state.remote()
        ray.get(self.workers[0].export.remote(state_ref, str(self.output_dir / "adapter")))
        workers = ray.get([worker.info.remote() for worker in self.workers])
        last_eval = next((row for row in reversed(self.round_rows) if not math.isnan(row["eval_metric"])), None)
        summary = {
            "method": self.config.method.name,
            "rounds": len(self.round_rows),
            "final_eval_metric": last_eval["eval_metric"] if last_eval else None,
            "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
            "bytes_up": sum(row["bytes_up"] for row in self.round_rows),
            "bytes_down": sum(row["bytes_down"] for row in self.round_rows),
            "max_agg_error": max((row["agg_error"] for row in self.round_rows if not math.isnan(row["agg_error"])), default=None),
            "wall_s": wall_s,
            "workers": workers,
            "model_loads": sum(w["model_loads"] for w in workers),
            "trainable_adapter_parameters": workers[0]["trainable_adapter_parameters"],
            "trainable_head_parameters": workers[0]["trainable_head_parameters"],
            "privacy": self.privacy_summary(),
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from analysis.plots import write_run_plots

        write_run_plots(self.output_dir)


def from_live_workers(calls: list, what: str) -> list:
    """The results of one call per worker; a worker gone beyond its restarts is left out, with a message saying what is missing."""
    import ray

    results = []
    for worker_id, call in enumerate(calls):
        try:
            results.append(ray.get(call))
        except ray.exceptions.ActorDiedError:
            print(f"fedsim: worker {worker_id} is gone; {what} is left out")
    return results


def write_rows(rows: list[dict], columns: list[str], path: Location) -> None:
    """Write the rows as Parquet, atomically (``Location.write_table``): a crash never leaves half a file."""
    table = pa.Table.from_pylist(rows, schema=None) if rows else pa.table({c: [] for c in columns})
    path.write_table(table.select(columns))


def place_workers(workers: int, bundle: dict, timeout_s: float, local: bool):
    """A placement group of one bundle a worker, spread over the nodes; and whether the autoscaler was asked for it.

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
    group = placement_group([bundle] * workers, strategy="SPREAD")
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
