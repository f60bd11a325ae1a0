"""The pytest mark for tests that need the fused Triton kernels (a CUDA device, or the interpreter)."""

from __future__ import annotations

import importlib.util

import pytest


def kernels_ready() -> bool:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
        return False
    try:
        from hieraloss.torch import kernels
    except Exception:  # noqa: BLE001 - a broken kernels import: the fused tests skip
        return False
    return kernels.triton_available()


needs_kernels = pytest.mark.skipif(not kernels_ready(), reason="hieraloss.torch.kernels (Triton) not available")
