"""Shared fixtures. ``tests/`` is on sys.path (pytest's rootdir conftest), so tests import ``tiny_models``."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

# Tests that start processes (Ray clusters, subprocesses, notebook kernels): `pytest -m "not slow"` leaves them out.
SLOW_FIXTURES = {"ray_local", "two_nodes", "s3_bucket"}


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that uses a Ray cluster (or another fixture that starts processes); modules that run
    subprocesses or notebooks mark themselves (``pytestmark = pytest.mark.slow``)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, on 127.0.0.1, no auth, no dashboard; the runtime reuses it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small BERT (random weights, 2 layers, hidden 64) with MiniLM's real tokenizer, saved as a local model folder."""
    from tiny_models import tiny_bert_with_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert_with_tokenizer(path)
    return str(path)
