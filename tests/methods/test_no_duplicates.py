"""What the methods share lives once: the `duplicates` tool finds no copied blocks in fedsim/methods."""

import shutil
import subprocess
from pathlib import Path

import pytest


def test_methods_folder_has_no_copied_blocks():
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the `duplicates` tool is not installed on this machine (it ships with the dev workplace)")
    methods = Path(__file__).resolve().parents[2] / "fedsim" / "methods"
    output = subprocess.run([tool, "--repo", str(methods)], capture_output=True, text=True, timeout=60).stdout
    assert output.startswith("no duplicates"), output
