"""Which implementation runs an op: the fused Triton kernels, the compiled CPU kernel or the torch ops.

Every op file routes through these three questions, so the rules read the same everywhere:
``backend="triton"`` and ``"native"`` are demands (an error that names why they cannot run),
``"auto"`` takes the fused kernels on CUDA when they run and take the tree, and the compiled kernel
on the CPU when it was built; ``"torch"`` always runs the torch ops.
"""

from __future__ import annotations

import torch

from ... import _native
from ...core.checks import check_choice
from ...core.rules import AUTO_FUSED_MAX_NODES
from ...hierarchy import Hierarchy

BACKENDS = ("auto", "torch", "native", "triton")


def kernels():
    """:mod:`hieraloss.torch.kernels`, or a ``RuntimeError`` that says why it cannot run."""
    try:
        from .. import kernels
    except ImportError as exc:  # triton missing or the kernels failed to import
        raise RuntimeError(f"backend='triton' needs the fused Triton kernels, which failed to import: {exc}") from exc
    if not kernels.triton_available():
        raise RuntimeError("backend='triton' was asked for, but Triton is not available here")
    return kernels


def use_triton(backend: str, x: torch.Tensor, hierarchy: Hierarchy | None = None, op: str = "objective") -> bool:
    """Whether ``x`` (logits of ``hierarchy``, or embeddings without it) goes to the fused kernels:
    asked for, or ``"auto"`` on a CUDA device where they run and take its batch and tree, for trees
    of at most ``AUTO_FUSED_MAX_NODES`` nodes (the compile time of larger ones)."""
    check_choice(backend, BACKENDS, "backend")
    if backend == "triton":
        reason = kernels().unsupported_reason(x.shape, hierarchy, op)
        if reason:
            raise ValueError(f"backend='triton': {reason}")
        return True
    if backend == "auto" and x.is_cuda and (hierarchy is None or hierarchy.num_nodes <= AUTO_FUSED_MAX_NODES):
        try:
            from .. import kernels as fused
        except ImportError:
            return False
        return bool(fused.triton_available()) and fused.unsupported_reason(x.shape, hierarchy, op) is None
    return False


def use_native(backend: str, x: torch.Tensor) -> bool:
    """Whether ``x`` goes to the compiled CPU kernel (``"native"`` demands it, ``"auto"`` on the CPU)."""
    return _native.use_for(backend, on_cpu=x.device.type == "cpu", device=str(x.device))
