"""Which implementation runs an op: the fused Triton kernels (through the DLPack bridge), the compiled
CPU kernel or the paddle ops; the rules of :mod:`hieraloss.torch.ops.route`, plus a static program
(``paddle.jit.to_static(full_graph=True)``), which only the paddle ops can build."""

from __future__ import annotations

import paddle

from ... import _native
from ...core.checks import check_choice
from ...core.rules import AUTO_FUSED_MAX_NODES
from ...hierarchy import Hierarchy
from .. import _bridge
from .._tables import building_program, no_kernel_in_program, place_of

BACKENDS = ("auto", "paddle", "native", "triton")


def use_native(backend: str, x: paddle.Tensor) -> bool:
    """Whether ``x`` goes to the compiled CPU kernel (``"native"`` demands it, ``"auto"`` on the CPU)."""
    if building_program():
        return no_kernel_in_program(backend, "native")
    return _native.use_for(backend, on_cpu=bool(x.place.is_cpu_place()), device=str(place_of(x)))


def is_gpu(x: paddle.Tensor) -> bool:
    """Whether ``x`` lives on a GPU (inside a static program: whether the program is built for one)."""
    if building_program():
        return paddle.device.get_device().startswith("gpu")
    return bool(x.place.is_gpu_place())


def use_triton(backend: str, x: paddle.Tensor, hierarchy: Hierarchy, op: str = "objective") -> bool:
    """Whether ``x`` goes to the fused kernels: asked for, or ``"auto"`` on a GPU where they run and
    take its batch and tree, for trees of at most ``AUTO_FUSED_MAX_NODES`` nodes."""
    check_choice(backend, BACKENDS, "backend")
    if building_program():
        return no_kernel_in_program(backend, "triton")
    if backend == "triton":
        reason = _bridge.unavailable_reason(x)
        if reason:
            raise RuntimeError(f"backend='triton' was asked for, but {reason}")
        reason = _bridge.unsupported_reason(x, hierarchy, op)
        if reason:
            raise ValueError(f"backend='triton': {reason}")
        return True
    if backend == "auto" and is_gpu(x) and hierarchy.num_nodes <= AUTO_FUSED_MAX_NODES:
        return _bridge.unavailable_reason(x) is None and _bridge.unsupported_reason(x, hierarchy, op) is None
    return False


def deterministic() -> bool:
    """Whether paddle was asked for deterministic GPU kernels (``FLAGS_cudnn_deterministic``; a CPU
    build has no such flag): the fused triplet kernels add their gradient with atomic adds."""
    try:
        return bool(paddle.get_flags(["FLAGS_cudnn_deterministic"])["FLAGS_cudnn_deterministic"])
    except (ValueError, KeyError):
        return False
