"""Shared fixtures. ``tests/`` is on sys.path (pytest's rootdir conftest), so tests import ``tiny_models``."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
