"""Triton kernels vs their torch references, bit for bit: under ``TRITON_INTERPRET=1`` on CPU (tiny shapes, a
subprocess so the interpreter setting cannot leak into other tests), and for real on CUDA when there is one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtool.errors import UsageError
from kvtool.kernels import pick_backend

HERE = Path(__file__).parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernels are tested instead")
def test_kernels_match_reference_interpreted() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(HERE / "kernel_checks.py")], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all equal" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_reference_cuda() -> None:
    r = subprocess.run([sys.executable, str(HERE / "kernel_checks.py"), "--device", "cuda"], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def test_backend_switch() -> None:
    assert pick_backend("auto", torch.device("cpu")) in ("numba", "torch")  # numba where it imports
    assert pick_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(UsageError):
        pick_backend("cuda", torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(UsageError, match="CUDA"):
            pick_backend("triton", torch.device("cpu"))
