"""A run's result tables (``rounds.parquet``: a row per round; ``clients.parquet``: a row per client and round)
and the writer that keeps them and the checkpoints on disk off the rounds' critical path.

Every round, the driver hands ``RoundWriter`` the rows so far; a thread writes both tables (atomically:
``Location.write_table``) and only then asks the aggregator to checkpoint that round, so that a complete
checkpoint always has its rows on disk: a resume reads the rows up to the checkpoint's round.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import pyarrow as pa

from fedsim.storage import Location

ROUND_COLUMNS = ["round", "method", "clients_sampled", "clients_ok", "bytes_up", "bytes_down", "agg_error", "agg_error_se",
                 "train_loss", "eval_metric", "eval_loss", "wall_s", "train_s_max", "aggregate_s", "eval_s", "overhead_s",
                 "noise_multiplier", "epsilon_max"]
CLIENT_COLUMNS = ["round", "client_id", "worker_id", "rank", "samples", "steps", "train_loss", "bytes_up",
                  "bytes_down", "train_s", "init_s", "status", "noise_multiplier", "sample_rate", "epsilon", "eval_metric", "eval_loss"]


def write_rows(rows: list[dict], columns: list[str], path: Location) -> None:
    """Write the rows as Parquet, atomically (``Location.write_table``): a crash never leaves half a file."""
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in columns})
    path.write_table(table.select(columns))


def read_rows(path: Location, last_round: int) -> list[dict]:
    """The rows of a result table up to and including ``last_round`` (a resume's starting point)."""
    return [row for row in path.read_table().to_pylist() if row["round"] <= last_round]


class RoundWriter:
    """Writes each round's tables, then its checkpoint, in a background thread, in round order.

    ``submit`` returns at once; ``flush`` waits for everything submitted. An error in the thread is raised by the
    next ``submit`` or ``flush``, so a failed write never goes unnoticed.
    """

    def __init__(self, output_dir: Location, round_columns: list[str], checkpoint: Callable[[int], None]):
        self.output_dir = output_dir
        self.round_columns = round_columns
        self.checkpoint = checkpoint
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="fedsim-round-writer", daemon=True)
        self.thread.start()

    def submit(self, round_idx: int, round_rows: list[dict], client_rows: list[dict]) -> None:
        self._raise()
        self.jobs.put((round_idx, list(round_rows), list(client_rows)))

    def flush(self) -> None:
        self.jobs.join()
        self._raise()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    round_idx, round_rows, client_rows = job
                    write_rows(round_rows, self.round_columns, self.output_dir / "rounds.parquet")
                    write_rows(client_rows, CLIENT_COLUMNS, self.output_dir / "clients.parquet")
                    self.checkpoint(round_idx)
            except BaseException as error:  # noqa: BLE001 — handed to the driver's thread
                self.error = error
            finally:
                self.jobs.task_done()
