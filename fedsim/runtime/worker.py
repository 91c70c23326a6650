"""The ClientWorker actor: one resident base model that trains whichever clients the driver hands it.

A worker loads the model once. Any worker can train any client: it reads a client's rows on demand from the
partitioned dataset (one filtered Parquet read for a round's new clients) and keeps the tokenised rows of
recent clients in a bounded cache, so memory grows with the number of workers, not of clients. For each client
of its share it swaps in the global adapter state, trains, and sends back the client's upload. Nothing a
client computes depends on which worker trains it or in what order.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np
import torch

from fedsim.data import InstructionRows, TokenizedRows, evaluate, make_rows
from fedsim.adapters.head import fit_head
from fedsim.adapters.state import HEAD_PREFIX, State, nbytes
from fedsim.methods import Upload
from fedsim.modeling import load_model, load_tokenizer, offline_by_default
from fedsim.partition import HELD_OUT, read_clients
from fedsim.presum import partial_sum
from fedsim.provenance import worker_record
from fedsim.privacy import PrivacySettings, poisson_batches, private_gradient_sum
from fedsim.privacy_plan import dp_sample_rate, init_rows_per_client, init_sample_rate
from fedsim.runtime.aggregator import CHECKPOINTS_KEPT
from fedsim.runtime.plan import RunPlan
from fedsim.seeds import derive_seed, rng
from fedsim.storage import Location
from fedsim.training.engine import ClientResult, train_clients
from fedsim.training.fedprox import Proximal
from fedsim.training.scaffold import ControlVariates, controls, without_controls
from fedsim.training.schedule import client_steps

Rows = TokenizedRows | InstructionRows
CACHED_ROWS = 200_000  # tokenised training rows a worker keeps between rounds (least recently used clients go first)


class ClientWorker:
    """Ray actor (wrapped with ``ray.remote`` by the driver); also usable as a plain object in tests."""

    def __init__(self, plan: RunPlan, worker_id: int):
        offline_by_default()
        self.plan = plan
        self.config = plan.config
        self.method = plan.method
        self.worker_id = worker_id
        torch.set_num_threads(max(1, int(self.config.runtime.cpus_per_worker)))
        self.device = "cuda" if self.config.runtime.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(self.config)
        self.model = load_model(self.config, plan.data.num_labels, self.device)
        self.model_loads = 1
        self.method.prepare(self.model, self.config.model.target_modules)
        self.data_dir = Location(plan.data.data_dir)  # a local folder or a URI on shared storage
        self.cache: OrderedDict[int, tuple[Rows, Rows | None]] = OrderedDict()  # client -> (training rows, held-out rows)
        self.eval_rows: dict[int, Rows] = {}  # evaluation chunk -> rows (a worker is given the same chunks every round)
        self.store = plan.client_store  # what personalised clients keep between their rounds
        self.cohort_size = self.config.runtime.cohort_size

    # -- data, on demand ------------------------------------------------------------------------
    def client_rows(self, client_ids: list[int]) -> dict[int, tuple[Rows, Rows | None]]:
        """Each client's (training rows, held-out rows or None): from the cache, the others in one Parquet read."""
        missing = sorted(cid for cid in set(client_ids) if cid not in self.cache)
        if missing:
            table = read_clients(self.data_dir / "train.parquet", missing)
            column = table.column("client_id").to_numpy()
            held_out = (table.column(HELD_OUT).to_numpy(zero_copy_only=False) if HELD_OUT in table.column_names
                        else np.zeros(len(column), bool))
            for cid in missing:
                mine = column == cid
                train = make_rows(table.take(np.flatnonzero(mine & ~held_out)), self.tokenizer, self.config)
                own_eval = (make_rows(table.take(np.flatnonzero(mine & held_out)), self.tokenizer, self.config)
                            if (mine & held_out).any() else None)
                self.cache[cid] = (train, own_eval)
        for cid in client_ids:
            self.cache.move_to_end(cid)
        wanted = {cid: self.cache[cid] for cid in client_ids}
        while len(self.cache) > len(wanted) and sum(len(rows) for rows, _ in self.cache.values()) > CACHED_ROWS:
            self.cache.popitem(last=False)
        return wanted

    def info(self) -> dict:
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "node_id": context.get_node_id() if context else None,
            "model_loads": self.model_loads,
            "restarted": bool(context and context.was_current_actor_reconstructed),
            **self.trainable_counts(),
            "cached_clients": len(self.cache),
            **self.provenance(),
        }

    def provenance(self) -> dict:
        """This worker's device, torch threads and library versions (``fedsim.provenance``)."""
        return worker_record(self.device)

    def trainable_counts(self) -> dict[str, int]:
        """What a full-rank client trains (under DP, what its noise matters on): adapter tensors as they travel
        (``Method.pack``: Ravan's heads' blocks, not all of R), and the head."""
        self.method.load_state(self.model, {}, self.method.rank)
        params = self.method.pack({key: p.detach() for key, p in self.method.trainable_parameters(self.model, 0).items()})
        head = sum(p.numel() for key, p in params.items() if key.startswith(HEAD_PREFIX))
        return {"trainable_adapter_parameters": sum(p.numel() for p in params.values()) - head, "trainable_head_parameters": head}

    def client_privacy(self, client_id: int, noise_multiplier: float | None) -> PrivacySettings | None:
        """The client's DP-SGD parameters: Poisson rate q_i = batch_size / n_i, and the σ in force this round (the
        driver's, sent with each call: it is recalibrated when a run is resumed)."""
        if not self.config.privacy.enabled:
            return None
        if noise_multiplier is None:
            raise ValueError("a private run's round needs the noise multiplier in force (train's noise_multiplier)")
        n = self.plan.data.client_sizes[client_id]
        sample_rate = dp_sample_rate(self.config, n)
        return PrivacySettings(noise_multiplier, self.config.privacy.max_grad_norm, sample_rate, max(1, round(sample_rate * n)))

    # -- the LoRA-SB initialisation ------------------------------------------------------------
    def initial_state(self) -> State:
        """The round-0 global state: LoRA's random A and B = 0, or LoRA-SB's B, R, A from the gradient of the full model
        on its calibration data (``adapters.init_data``): the public sample, client 0's rows, or a share of every
        client's rows (pooled), summed in client order by this one worker, whatever the number of workers."""
        a = self.config.adapters
        grad_sums = None
        if self.method.needs_init_gradients:
            if a.init_data == "public":
                rows = make_rows(read_clients(self.data_dir / "public.parquet", [0]), self.tokenizer, self.config)
                grad_sums = self._base_gradient_sum(list(rows.in_order(a.init_batch_size)))
            else:  # client 0's rows, or a share of every client's rows (pooled)
                count = 1 if a.init_data == "client" else min(self.config.clients.count, a.init_samples)
                grad_sums = self.init_gradients(list(range(count)))
        state = self.method.init_state(self.model, grad_sums, a.init_lr or self.config.train.lr)
        if a.head_init == "public":
            rows = make_rows(read_clients(self.data_dir / "public.parquet", [0]), self.tokenizer, self.config)
            self.method.load_state(self.model, state)
            state = {**state, **fit_head(self.model, list(rows.in_order(a.init_batch_size)))}
        return state

    def build_client_init(self, server_state: State | None = None) -> dict:
        """What a client does at its first contact under ``adapters.init_at: client``: build the round-0 state with the
        server's code (``initial_state``) on this worker's device. Returns its seconds (``init_s``, the client's compute)
        and, given the server's round-0 state, whether every tensor came out bit-identical to it."""
        start = time.perf_counter()
        built = self.initial_state()
        seconds = time.perf_counter() - start
        identical = None if server_state is None else built.keys() == server_state.keys() and all(
            torch.equal(built[key].cpu(), server_state[key].cpu()) for key in built)
        return {"init_s": seconds, "identical": identical}

    def init_gradients(self, client_ids: list[int]) -> dict[str, torch.Tensor]:
        """Σ of the full model's gradients on calibration rows of these clients (in client order), in batches of
        ``adapters.init_batch_size``.

        Without DP: a seeded sample of ``privacy.init_rows_per_client`` rows of each client. Under DP
        (``privacy.init_noise_multiplier``) each of a client's records joins independently with probability
        q = min(1, rows / n_i); the records' gradients are clipped to C and their sum noised once. That is the sampled
        Gaussian mechanism at rate q, booked so (``privacy.privacy_history``): adding or removing a record changes the
        sum by at most C, whatever the other records. Poisson sampling rather than all of a client's records: the cost
        stays that of ``adapters.init_samples`` rows (not a pass over each client's data with per-sample gradients of
        full weight matrices), and the rate actually used is accounted, which also amplifies the privacy. (A
        fixed-size seeded subset, as without DP, would be neither: removing one record reshuffles it.)
        """
        batch_size = self.config.adapters.init_batch_size
        sums: dict[str, torch.Tensor] = {}
        for client_id, (rows, _) in self.client_rows(client_ids).items():
            generator = rng(self.config.seed, "init-sample", client_id)
            rate = init_sample_rate(self.config, self.method.needs_init_gradients, client_id, len(rows))
            if rate is None:
                order = generator.permutation(len(rows))[: min(len(rows), init_rows_per_client(self.config))]
            else:
                order = np.flatnonzero(generator.random(len(rows)) < rate)
            batches = [rows.batch(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
            part = self._base_gradient_sum(batches, derive_seed(self.config.seed, "init-noise", client_id) if rate is not None else None)
            for name, grad in part.items():
                sums[name] = grad if name not in sums else sums[name].add_(grad)
            del part
        return sums

    def _base_gradient_sum(self, batches: list[dict], private_seed: int | None = None) -> dict[str, torch.Tensor]:
        """Σ ∂loss/∂W0 of every adapted layer's base weight, keyed by layer, on this worker's device; clipped and noised
        when ``private_seed`` is set.

        The adapters are still zero (LoRA-SB's B = 0), so the adapted model computes the base model.
        """
        from fedsim.adapters import accumulate_gradients, adapted_layers

        batches = [{k: v.to(self.device) for k, v in batch.items()} for batch in batches]
        layer_names = [f"{name}.base_layer" for name in adapted_layers(self.model)]
        if private_seed is None:
            sums = accumulate_gradients(self.model, layer_names, batches)
        else:
            p = self.config.privacy
            sums = private_gradient_sum(self.model, layer_names, batches, p.max_grad_norm, p.init_noise_multiplier, private_seed)
        return {name.removesuffix(".base_layer"): grad for name, grad in sums.items()}

    # -- a round --------------------------------------------------------------------------------
    def train(self, round_idx: int, state: State, client_ids: list[int], noise_multiplier: float | None = None
              ) -> tuple[list[dict], list[dict]]:
        """Train this worker's share of the round, in client-id order, ``runtime.cohort_size`` clients at a time
        (``fedsim.training.engine``; under DP each client with its own DP-SGD settings). Returns (uploads, stats rows)."""
        state = {key: value.to(self.device) for key, value in state.items()}  # the server's control variates too (SCAFFOLD)
        deadline = self.config.runtime.deadline_s
        start = time.perf_counter()
        uploads, rows = [], []
        order = sorted(client_ids)
        data = self.client_rows(order)
        trained: dict[int, ClientResult] = {}  # the clients of the cohort trained last
        for position, client_id in enumerate(order):
            self._maybe_die(round_idx, position)
            client_rows = data[client_id][0]
            rank = self.plan.client_ranks[client_id]
            privacy = self.client_privacy(client_id, noise_multiplier)
            row = {"round": round_idx, "client_id": client_id, "worker_id": self.worker_id, "rank": rank,
                   "samples": len(client_rows), "steps": 0, "train_loss": float("nan"), "bytes_up": 0, "train_s": 0.0,
                   "noise_multiplier": privacy.noise_multiplier if privacy else float("nan"),
                   "sample_rate": privacy.sample_rate if privacy else float("nan")}
            if deadline is not None and time.perf_counter() - start > deadline:  # it would only report later still
                rows.append({**row, "status": "straggler"})
                continue
            if client_id not in trained:
                cohort = order[position : position + self.cohort_size]
                trained = self.train_clients(round_idx, state, cohort, {cid: data[cid][0] for cid in cohort}, noise_multiplier)
            result = trained.pop(client_id)
            upload, stats = result.upload, result.stats
            if result.kept:  # a personalised client keeps part of what it trained
                self.store.write(client_id, round_idx, result.kept, keep_from=max(0, round_idx - CHECKPOINTS_KEPT - 1))
            if client_id in self.config.clients.corrupt:
                upload = {key: torch.full_like(value, float("nan")) for key, value in upload.items()}
            status = "ok" if is_finite(upload) else "nonfinite"
            if deadline is not None and time.perf_counter() - start > deadline:
                status = "straggler"  # trained, but its update arrived after the deadline
            row.update(steps=stats.steps, train_loss=stats.train_loss, bytes_up=nbytes(upload), train_s=stats.train_s, status=status)
            rows.append(row)
            if status == "ok":
                uploads.append({"client_id": client_id, "num_samples": len(client_rows), "tensors": upload})
        if self.config.runtime.presum:  # one weighted sum of this worker's uploads crosses the object store
            ok = [Upload(u["client_id"], u["num_samples"], u["tensors"]) for u in uploads]
            return [partial_sum(self.method, state, ok, round_idx, self.config.seed)], rows
        return uploads, rows

    def train_clients(self, round_idx: int, state: State, client_ids: list[int], rows: dict[int, Rows],
                      noise_multiplier: float | None = None) -> dict[int, ClientResult]:
        """These clients trained from the global ``state`` (each with its own kept tensors over it) in one pass of the
        engine (``fedsim.training.engine``), whatever their number. The pass is seeded by the first client's training
        seed (``model.dropout: 0`` compares cohorts exactly); under DP each client's noise comes from its own training
        seed, as it would alone."""
        train = self.config.train
        privacy = [self.client_privacy(cid, noise_multiplier) for cid in client_ids]
        owns = [self.own_tensors(cid, round_idx - 1) for cid in client_ids]
        global_state = without_controls(state)
        states = [self._with_own(global_state, own) for own in owns]
        rules = []
        if train.prox_mu > 0:
            rules.append(Proximal(train.prox_mu))
        if train.control_variates:
            rules.append(ControlVariates(controls(state), [controls(own) for own in owns]))
        ranks = [self.plan.client_ranks[cid] for cid in client_ids]
        steps = [client_steps(train, len(rows[cid])) for cid in client_ids]
        seeds = [derive_seed(self.config.seed, "training", round_idx, cid) for cid in client_ids]
        batches = [self._batches(round_idx, cid, rows[cid], settings) for cid, settings in zip(client_ids, privacy)]
        private = self.config.privacy.enabled
        results = train_clients(self.model, self.method, round_idx, states, ranks, batches, train, steps, seeds[0],
                                self.config.model.task, privacy=privacy if private else None,
                                noise_seeds=seeds if private else None, rules=rules)
        return dict(zip(client_ids, results))

    def _batches(self, round_idx: int, client_id: int, rows: Rows, privacy: PrivacySettings | None):
        """The client's endless seeded batches (Poisson batches under DP), on the worker's device."""
        batch_seed = derive_seed(self.config.seed, "batches", round_idx, client_id)
        if privacy is not None:
            batches = poisson_batches(rows, privacy.sample_rate, batch_seed)
        else:
            batches = rows.batches(self.config.train.batch_size, batch_seed)
        return (None if b is None else {k: v.to(self.device) for k, v in b.items()} for b in batches)

    def own_tensors(self, client_id: int, as_of_round: int) -> State:
        """What the client kept after ``as_of_round`` (a personalised method's tensors, its SCAFFOLD control variates), on
        this worker's device; ``{}`` where it keeps nothing."""
        if not (self.method.client_kinds(max(0, as_of_round)) or self.config.train.control_variates):
            return {}
        return {key: value.to(self.device) for key, value in self.store.read(client_id, as_of_round).items()}

    def client_state(self, state: State, client_id: int, as_of_round: int) -> State:
        """The model a client holds after ``as_of_round``: the global state, with what the client kept over it."""
        return self._with_own(state, self.own_tensors(client_id, as_of_round))

    def _with_own(self, state: State, own: State) -> State:
        """``state`` with the method's part of what a client kept over it (its control variates are the rule's, not the model's)."""
        mine = without_controls(own)
        return self.method.client_state(state, mine) if mine else state

    def _maybe_die(self, round_idx: int, position: int) -> None:
        """Fault injection (``runtime.kill_worker_round``): worker 0 dies once, after its first client."""
        if self.worker_id == 0 and position == 1 and round_idx == self.config.runtime.kill_worker_round:
            import ray

            if not ray.get_runtime_context().was_current_actor_reconstructed:
                os._exit(1)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state: State, chunks: list[int]) -> dict[int, dict]:
        """The global model on the given chunks of the evaluation data: ``{chunk: sums}`` (``fedsim.data.evaluate``).
        Chunks are fixed by the data preparation, so the sums do not depend on how many workers share them."""
        missing = [chunk for chunk in chunks if chunk not in self.eval_rows]
        if missing:
            table = read_clients(self.data_dir / "eval.parquet", missing)
            column = table.column("client_id").to_numpy()
            for chunk in missing:
                self.eval_rows[chunk] = make_rows(table.take(np.flatnonzero(column == chunk)), self.tokenizer, self.config)
        self.method.load_state(self.model, {key: value.to(self.device) for key, value in state.items()})
        e = self.config.eval
        return {chunk: evaluate(self.model, self.eval_rows[chunk], e.batch_size, self.device, e.max_new_tokens) for chunk in chunks}

    def evaluate_clients(self, state: State, client_ids: list[int], round_idx: int) -> dict[int, dict[str, float]]:
        """Each given client's own model after ``round_idx`` — the global model, with what a personalised client keeps
        over it — on the client's own held-out rows: ``{client_id: {correct, loss_sum, count}}``."""
        state = {key: value.to(self.device) for key, value in state.items()}
        e = self.config.eval
        scores = {}
        for cid, (_, held_out) in self.client_rows(client_ids).items():
            if held_out is not None:
                self.method.load_state(self.model, self.client_state(state, cid, round_idx), self.plan.client_ranks[cid])
                scores[cid] = evaluate(self.model, held_out, e.batch_size, self.device, e.max_new_tokens)
        return scores

    def export(self, state: State, path: str) -> str:
        """Write the global adapter in PEFT format to ``path`` (a folder or URI; loads a fresh, un-adapted base model)."""
        from fedsim.adapters.export import export_peft

        base = load_model(self.config, self.plan.data.num_labels)
        with Location(path).local_folder() as folder:
            export_peft(base, state, self.method.scaling, str(folder))
        return path


def is_finite(tensors: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())
