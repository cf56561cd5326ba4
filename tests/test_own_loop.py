"""The own-loop example of the docs runs as a script and checks what it shows (δ
refreshed on schedule, ONNX agreement in onnxruntime)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "own_loop.py"


def test_the_own_loop_example_runs():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchvision")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "onnxruntime agrees on top-1" in done.stdout
    assert "δ after 8 steps" in done.stdout
