"""The ClientWorker actor: one resident base model, the data of its own clients, virtual clients one after another.

A worker loads the model once, reads only its clients' rows of the partitioned dataset, and for each
client of a cohort swaps in the global adapter state, trains, and sends back the client's upload.
Memory grows with the number of workers, not the number of clients.
"""

from __future__ import annotations

import json
import os
import time
import numpy as np
import torch

from fedsim.client import derive_seed, is_finite, run_client
from fedsim.config import Config, config_from_dict
from fedsim.data import InstructionRows, TokenizedRows, evaluate, make_rows
from fedsim.methods import build_method, nbytes
from fedsim.methods.base import State
from fedsim.modeling import load_model, load_tokenizer, offline_by_default
from fedsim.partition import HELD_OUT, assign_ranks, read_clients
from fedsim.privacy import PrivacySettings, poisson_batches, private_gradient_sum
from fedsim.runtime.settings import init_spends_privacy, method_settings, train_settings
from fedsim.storage import Location


class ClientWorker:
    """Ray actor (wrapped with ``ray.remote`` by the driver); also usable as a plain object in tests."""

    def __init__(self, config: dict, worker_id: int, num_workers: int, data_dir: str, client_ids: list[int], num_labels: int):
        offline_by_default()
        self.config: Config = config_from_dict(config)
        self.worker_id = worker_id
        threads = max(1, int(self.config.runtime.cpus_per_worker))
        torch.set_num_threads(threads)
        self.device = "cuda" if self.config.runtime.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.method = build_method(self.config.method.name, method_settings(self.config))
        self.tokenizer = load_tokenizer(self.config)
        self.model = load_model(self.config, num_labels, self.device)
        self.model_loads = 1
        c = self.config
        self.ranks = assign_ranks(c.clients.ranks, c.clients.count, c.method.rank, c.seed)
        self.method.prepare(self.model, self.config.model.target_modules)
        self.data_dir = Location(data_dir)  # a local folder or a URI on shared storage
        self.client_rows = self._read_clients(client_ids)
        eval_table = read_clients(self.data_dir / "eval.parquet", [worker_id % num_workers]) if (self.data_dir / "eval.parquet").exists() else None
        self.eval_rows = make_rows(eval_table, self.tokenizer, self.config) if eval_table is not None and eval_table.num_rows else None

    def _read_clients(self, client_ids: list[int]) -> dict[int, TokenizedRows | InstructionRows]:
        """Each client's training rows; its held-out rows (``eval.per_client``) go to ``self.client_eval_rows``."""
        table = read_clients(self.data_dir / "train.parquet", client_ids)
        column = table.column("client_id").to_numpy()
        held_out = table.column(HELD_OUT).to_numpy(zero_copy_only=False) if HELD_OUT in table.column_names else np.zeros(len(column), bool)
        rows, self.client_eval_rows = {}, {}
        for client_id in client_ids:
            mine = column == client_id
            rows[client_id] = make_rows(table.take(np.flatnonzero(mine & ~held_out)), self.tokenizer, self.config)
            if (mine & held_out).any():
                self.client_eval_rows[client_id] = make_rows(table.take(np.flatnonzero(mine & held_out)), self.tokenizer, self.config)
        return rows

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
            "clients": len(self.client_rows),
            "device": self.device,
        }

    def trainable_counts(self) -> dict[str, int]:
        """What a full-rank client trains (and, under DP, what gets noised): adapter tensors, and the head."""
        from fedsim.methods.base import HEAD_PREFIX

        self.method.load_state(self.model, {}, self.method.rank)
        params = self.method.trainable_parameters(self.model, 0)
        head = sum(p.numel() for key, p in params.items() if key.startswith(HEAD_PREFIX))
        return {"trainable_adapter_parameters": sum(p.numel() for p in params.values()) - head, "trainable_head_parameters": head}

    def client_rank(self, client_id: int) -> int:
        """The client's adapter rank (``clients.ranks``; default ``method.rank``)."""
        return int(self.ranks[client_id])

    def client_privacy(self, client_id: int) -> PrivacySettings | None:
        """The client's DP-SGD parameters: Poisson rate q_i = batch_size / n_i, and the run's noise multiplier
        (calibrated once by the driver, ``data/meta.json``)."""
        p, c = self.config.privacy, self.config
        if not p.enabled:
            return None
        if not hasattr(self, "_noise_multiplier"):
            self._noise_multiplier = json.loads((self.data_dir / "meta.json").read_text())["noise_multiplier"]
        n = len(self.client_rows[client_id])
        sample_rate = min(1.0, c.train.batch_size / n)
        return PrivacySettings(self._noise_multiplier, p.max_grad_norm, sample_rate, max(1, round(sample_rate * n)))

    def initial_state(self, client_ids: list[int] | None = None, samples: int = 0, batch_size: int = 1) -> State:
        """The round-0 global state, computed here end to end; only the adapters' factors (and the head) leave.

        LoRA-SB: the calibration gradient of ``samples`` seeded rows of each of ``client_ids`` (any clients: their
        rows are read from the partitioned data, a few rows each, whichever worker owns them), or of the public
        sample when ``client_ids`` is None, summed in the target weights' own gradient buffers on this worker's
        device; each layer's B, R, A are then taken there (``fedsim.adapters.init``). No d×k sum crosses Ray.
        """
        grad_sums = None
        if self.method.needs_init_gradients:
            grad_sums = self.public_gradients(batch_size) if client_ids is None else self.init_gradients(client_ids, samples, batch_size)
        init_lr = self.config.adapters.init_lr or self.config.train.lr
        return self.method.init_state(self.model, grad_sums, init_lr)

    def init_gradients(self, client_ids: list[int], samples: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Σ of the full model's gradients on a seeded calibration sample of these clients' rows (LoRA-SB init), on this
        worker's device. Under DP each client's sum is clipped per sample and noised (``privacy.init_noise_multiplier``)."""
        table = read_clients(self.data_dir / "train.parquet", client_ids)
        column = table.column("client_id").to_numpy()
        held_out = table.column(HELD_OUT).to_numpy(zero_copy_only=False) if HELD_OUT in table.column_names else np.zeros(len(column), bool)
        batches = {}
        for client_id in client_ids:
            mine = np.flatnonzero((column == client_id) & ~held_out)
            order = np.random.default_rng(derive_seed(self.config.seed, 0, client_id, 3)).permutation(len(mine))[:samples]
            rows = make_rows(table.take(mine[order]), self.tokenizer, self.config)  # only the sampled rows are tokenised
            batches[client_id] = list(rows.in_order(batch_size))
        if not any(init_spends_privacy(self.config, self.method.needs_init_gradients, client_id) for client_id in client_ids):
            return self._base_gradient_sum([batch for client_id in client_ids for batch in batches[client_id]])
        sums: dict[str, torch.Tensor] = {}
        for client_id in client_ids:  # under DP each client's sum is its own Gaussian mechanism
            part = self._base_gradient_sum(batches[client_id], derive_seed(self.config.seed, 0, client_id, 4))
            for name, grad in part.items():
                sums[name] = grad if name not in sums else sums[name].add_(grad)
            del part
        return sums

    def public_gradients(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The LoRA-SB init's gradient sum on the public calibration sample (``data/public.parquet``; no client's data)."""
        rows = make_rows(read_clients(self.data_dir / "public.parquet", [0]), self.tokenizer, self.config)
        return self._base_gradient_sum(list(rows.in_order(batch_size)))

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

    def run_cohort(self, round_idx: int, state: State, client_ids: list[int]) -> tuple[list[dict], list[dict]]:
        """Train this round's clients of this worker, in client-id order. Returns (uploads, stats rows)."""
        state = {key: value.to(self.device) for key, value in state.items()}
        settings = train_settings(self.config)
        deadline = self.config.runtime.deadline_s
        start = time.perf_counter()
        uploads, rows = [], []
        for position, client_id in enumerate(sorted(client_ids)):
            self._maybe_die(round_idx, position)
            rows_of_client = self.client_rows[client_id]
            privacy = self.client_privacy(client_id)
            row = {"round": round_idx, "client_id": client_id, "worker_id": self.worker_id, "rank": self.client_rank(client_id),
                   "samples": len(rows_of_client), "steps": 0, "train_loss": float("nan"), "bytes_up": 0, "train_s": 0.0,
                   "noise_multiplier": privacy.noise_multiplier if privacy else float("nan"),
                   "sample_rate": privacy.sample_rate if privacy else float("nan")}
            late = deadline is not None and time.perf_counter() - start > deadline
            if late:  # the round's deadline has passed: this client would only report later still
                rows.append({**row, "status": "straggler"})
                continue
            batch_seed = derive_seed(self.config.seed, round_idx, client_id, 1)
            if privacy is not None:
                batches = poisson_batches(rows_of_client, privacy.sample_rate, batch_seed)
            else:
                batches = rows_of_client.batches(settings.batch_size, batch_seed)
            batches = (None if b is None else {k: v.to(self.device) for k, v in b.items()} for b in batches)
            upload, stats = run_client(self.model, self.method, state, round_idx, batches, settings,
                                       derive_seed(self.config.seed, round_idx, client_id), self.client_rank(client_id), privacy)
            if client_id in self.config.clients.corrupt:
                upload = {key: torch.full_like(value, float("nan")) for key, value in upload.items()}
            status = "ok" if is_finite(upload) else "nonfinite"
            if deadline is not None and time.perf_counter() - start > deadline:
                status = "straggler"  # trained, but its update arrived after the deadline
            row.update(steps=stats.steps, train_loss=stats.train_loss, bytes_up=nbytes(upload), train_s=stats.train_s, status=status)
            rows.append(row)
            if status == "ok":
                uploads.append({"client_id": client_id, "num_samples": len(rows_of_client), "tensors": upload})
        return uploads, rows

    def _maybe_die(self, round_idx: int, position: int) -> None:
        """Fault injection (``runtime.kill_worker_round``): worker 0 dies once, after its first client."""
        if self.worker_id == 0 and position == 1 and round_idx == self.config.runtime.kill_worker_round:
            import ray

            if not ray.get_runtime_context().was_current_actor_reconstructed:
                os._exit(1)

    def evaluate(self, state: State) -> dict[str, float]:
        if self.eval_rows is None:
            return {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
        self.method.load_state(self.model, {key: value.to(self.device) for key, value in state.items()})
        return evaluate(self.model, self.eval_rows, self.config.eval.batch_size, self.device, self.config.eval.max_new_tokens)

    def evaluate_clients(self, state: State, client_ids: list[int]) -> dict[int, dict[str, float]]:
        """The global model on each given client's own held-out rows: ``{client_id: {correct, loss_sum, count}}``."""
        self.method.load_state(self.model, {key: value.to(self.device) for key, value in state.items()})
        c = self.config.eval
        return {client_id: evaluate(self.model, self.client_eval_rows[client_id], c.batch_size, self.device, c.max_new_tokens)
                for client_id in client_ids if client_id in self.client_eval_rows}

    def export(self, state: State, path: str) -> str:
        """Write the global adapter in PEFT format to ``path`` (a folder or URI; loads a fresh, un-adapted base model)."""
        from fedsim.adapters.export import export_peft

        base = load_model(self.config, self.model.config.num_labels)
        with Location(path).local_folder() as folder:
            export_peft(base, state, self.method.scaling, str(folder))
        return path
