"""``adapters.init_at: client``: each client builds LoRA-SB's B and A itself, from the public calibration sample, the base
model and the run seed, with the server's code (on a real local Ray). The run's numbers are those of B and A downloaded,
bit for bit, on 1, 2 and 3 workers; what differs is the bill: a first contact's bytes, and the client's compute."""

import json

import pyarrow.parquet as pq
import torch

from fedsim.cli import main
from fedsim.adapters.state import nbytes
from fedsim.runtime import run
from runtime.test_end_to_end import final_state, make_config, rows

PUBLIC = {"method.name": "fed-sb", "adapters.init_data": "public", "clients.count": 8, "clients.per_round": 4, "train.rounds": 2,
          "workload.train_limit": 200}


def test_clients_build_the_servers_b_and_a_on_any_number_of_workers(ray_local, tiny_model_dir, tmp_path):
    run(make_config(tmp_path, tiny_model_dir, "server", **PUBLIC, **{"runtime.workers": 1}), progress=False)
    server_rows = pq.read_table(tmp_path / "server" / "clients.parquet").to_pylist()
    state = final_state(tmp_path / "server")
    frozen = {key: value for key, value in state.items() if key.endswith((".lora_A", ".lora_B"))}
    changing = {key: value for key, value in state.items() if key not in frozen}  # R and the head
    assert frozen and changing
    for workers in (1, 2, 3):
        name = f"client-{workers}"
        run(make_config(tmp_path, tiny_model_dir, name, **PUBLIC, **{"runtime.workers": workers, "adapters.init_at": "client"}),
            progress=False)
        built = json.loads((tmp_path / name / "summary.json").read_text())["client_init"]
        assert len(built) == workers and all(result["identical"] and result["init_s"] > 0 for result in built.values())
        client_rows = pq.read_table(tmp_path / name / "clients.parquet").to_pylist()
        assert_same_run_but_the_bill(tmp_path / "server", tmp_path / name)  # the same training, bit for bit
        seen = set()
        for row, before in zip(client_rows, server_rows):
            first = row["client_id"] not in seen
            seen.add(row["client_id"])
            if first:  # built, not downloaded: round 0's state is the client's own, later ones send what changed (R, head)
                assert row["init_s"] == built[str(row["worker_id"])]["init_s"] if row["worker_id"] >= 0 else row["init_s"] > 0
                assert before["bytes_down"] == nbytes(frozen) + nbytes(changing)
                assert row["bytes_down"] == (0 if row["round"] == 0 else nbytes(changing))
            else:
                assert row["init_s"] == 0.0 and row["bytes_down"] == before["bytes_down"]
        assert {row["init_s"] for row in server_rows} == {0.0}


def assert_same_run_but_the_bill(server_dir, client_dir):
    """The same final state, bit for bit, and the same rows but for the bytes down, init_s, timings and worker ids."""
    server, client = final_state(server_dir), final_state(client_dir)
    assert server.keys() == client.keys() and all(torch.equal(server[key], client[key]) for key in server)
    timings = ["wall_s", "train_s_max", "aggregate_s", "eval_s", "overhead_s", "bytes_down"]
    assert rows(server_dir, "rounds.parquet", timings) == rows(client_dir, "rounds.parquet", timings)
    bill = ["train_s", "worker_id", "bytes_down", "init_s"]
    assert rows(server_dir, "clients.parquet", bill) == rows(client_dir, "clients.parquet", bill)


def test_client_init_needs_the_public_sample(tmp_path, capsys):
    """A LoRA-SB init from pooled or one client's rows cannot be built by every client: one line, exit 2."""
    assert main(["check", f"output_dir={tmp_path / 'x'}", "method.name=fed-sb", "adapters.init_at=client"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsim: error: adapters.init_at: client needs adapters.init_data=public") and err.count("\n") == 1
