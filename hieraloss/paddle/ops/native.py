"""Tree-min loss on CPU paddle tensors through the compiled kernel (``hieraloss._native``).

The paddle twin of :mod:`hieraloss.torch.ops.native`. One pass over the logits per call. With a
scalar reduction and logits that need a gradient, the forward pass writes the gradient too and
backward only scales it by the upstream gradient: one pass over memory per training step instead
of two, at the cost of a logits-sized buffer held from forward to backward. ``reduction="none"``
recomputes in backward (the upstream map is only known there), as does a second backward through a
retained graph (``paddle.grad(..., retain_graph=True)``; paddle 3.3 crashes on a second
``Tensor.backward()`` through any ``PyLayer``). The host arithmetic around the kernel (the
reduction's factors, the objective's sums and total) is :mod:`hieraloss._native`'s, shared with torch;
this module holds the ``PyLayer``s and the buffers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import paddle
from paddle.autograd import PyLayer

from ... import _native
from ...core.plan import plan_for
from ...hierarchy import Hierarchy
from .device import compute_dtype, empty_loss, no_pixel

_HALVES = (paddle.float16, paddle.bfloat16)


def num_threads() -> int:
    """Threads for the kernel: ``OMP_NUM_THREADS`` if set, else the CPUs this process may use
    (paddle has no getter for its own CPU thread count)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _call(x: paddle.Tensor, lc: paddle.Tensor, hierarchy: Hierarchy) -> tuple:
    """The leading arguments of the ``_native`` calls on contiguous kernel inputs."""
    dtype = _native.FLOAT64 if x.dtype == paddle.float64 else _native.FLOAT32
    return dtype, x.data_ptr(), tuple(x.shape), lc.data_ptr(), plan_for(hierarchy)


def _fresh_like(x: paddle.Tensor) -> paddle.Tensor:
    """An uninitialised output buffer like ``x``, with huge pages asked for (see _native.advise_hugepages)."""
    out = paddle.empty_like(x)  # on x's place (paddle.empty would use the default device)
    _native.advise_hugepages(out.data_ptr(), int(out.numel()) * out.element_size())
    return out


def _gradient_buffer(x: paddle.Tensor) -> paddle.Tensor:
    """An uninitialised gradient buffer like ``x``: a pooled numpy array wrapped without a copy
    (DLPack; the wrapping tensor keeps the array referenced while it lives, which is what
    :class:`hieraloss._native.BufferPool` relies on) when it is large, else a fresh tensor."""
    arr = _native.BUFFERS.take(tuple(x.shape), np.float64 if x.dtype == paddle.float64 else np.float32)
    if arr is None:
        return _fresh_like(x)
    return paddle.utils.dlpack.from_dlpack(arr.__dlpack__())


def _scaled_gradient(ctx, x: paddle.Tensor, grad_out: paddle.Tensor, recompute) -> paddle.Tensor:
    """The gradient the forward pass wrote (``ctx.fused_grad``, for an upstream gradient of 1) times
    ``grad_out``. It is handed out once: a second backward through a retained graph gets a fresh
    buffer that ``recompute(buffer, factor)`` fills."""
    factor = float(grad_out)
    grad, ctx.fused_grad = ctx.fused_grad, None
    if grad is None:
        grad = _gradient_buffer(x)
        recompute(grad, factor)
    elif factor != 1.0:
        grad.scale_(factor)
    return grad


class _NativeTreeMin(PyLayer):
    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, reduction, scale, weight, needs_grad):
        # scale: float64 [N] (scalar reductions); weight: float64 [N] or None (reduction "none")
        ctx.config = (hierarchy, gamma, reduction, scale, weight)
        ctx.fused_grad = None
        ctx.save_for_backward(x, lc)
        if reduction == "none":
            out = _fresh_like(x)
            _native.tree_min(*_call(x, lc, hierarchy), gamma, loss_map=out.data_ptr(),
                             map_scale=_native.address(weight), num_threads=num_threads())
            return out
        grad = _gradient_buffer(x) if needs_grad else None
        value = _native.tree_min_value(*_call(x, lc, hierarchy), gamma, scale, grad=_native.address(grad),
                                       num_threads=num_threads())
        ctx.fused_grad = grad
        return paddle.to_tensor(np.asarray(value, dtype=_host_dtype(x)), place=x.place)

    @staticmethod
    def backward(ctx, grad_out):
        x, lc = ctx.saved_tensor()
        hierarchy, gamma, reduction, scale, weight = ctx.config
        if reduction == "none":
            grad = _gradient_buffer(x)
            up = grad_out.astype(x.dtype).contiguous()  # bound: the kernel reads it by address
            _native.tree_min(*_call(x, lc, hierarchy), gamma, grad=grad.data_ptr(), grad_scale=_native.address(weight),
                             grad_up=up.data_ptr(), num_threads=num_threads())
            return grad, None
        grad = _scaled_gradient(ctx, x, grad_out, lambda buf, factor: _native.tree_min_value(
            *_call(x, lc, hierarchy), gamma, scale, grad=buf.data_ptr(), factor=factor, values=False,
            num_threads=num_threads()))
        return grad, None


def _host_dtype(x: paddle.Tensor) -> type:
    return np.float64 if x.dtype == paddle.float64 else np.float32


def _histogram(lc: paddle.Tensor, hierarchy: Hierarchy) -> np.ndarray:
    return _native.label_histogram(lc.numpy(), hierarchy.num_nodes)


def _kernel_inputs(logits: paddle.Tensor, label_channels: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The kernel's view of validated inputs: contiguous ``[B, N, P]`` logits (float16/bfloat16 as
    float32) and contiguous int64 ``[B, P]`` label channels."""
    B, N = logits.shape[:2]
    P = math.prod(logits.shape[2:])
    x = logits
    if x.dtype in _HALVES:
        x = x.astype(paddle.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    lc = label_channels.reshape([B, P])
    if lc.dtype != paddle.int64:
        lc = lc.astype(paddle.int64)
    if not lc.is_contiguous():
        lc = lc.contiguous()
    return x.reshape([B, N, P]), lc


def tree_min_native(logits: paddle.Tensor, label_channels: paddle.Tensor, hierarchy: Hierarchy, *, gamma: float,
                    reduction: str, node_weight: paddle.Tensor | None) -> paddle.Tensor:
    """Same contract as :func:`.tree_min.tree_min_op` (validated inputs, label channels with -1 =
    ignored) for CPU logits. float16/bfloat16 logits compute in float32 (the gradient is cast back)."""
    if no_pixel(logits.shape):  # no pixel: an exact 0 (or the empty map) connected to the logits
        return empty_loss(logits, reduction)
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    x, lc = _kernel_inputs(logits, label_channels)
    weight = None if node_weight is None else np.ascontiguousarray(node_weight.astype(paddle.float64).numpy())
    scale = None
    if reduction != "none":
        scale = _native.reduction_scale(plan_for(hierarchy), _histogram(lc, hierarchy), reduction, weight)
    needs_grad = not x.stop_gradient and paddle.is_grad_enabled()
    out = _NativeTreeMin.apply(x, lc, hierarchy, float(gamma), reduction, scale, weight, needs_grad)
    return out.reshape([B, N, *spatial]) if reduction == "none" else out


# ---------------------------------------------------------------------------- the HSSN objective
class _NativeObjective(PyLayer):
    """tree_min_weight * TM + sum_d ce_w[d] * CE_d in one kernel pass. Returns the total; the detached
    parts (TM, CE [L]) are left in ``parts``. With a gradient needed, forward writes it (backward
    only scales it, or recomputes it for a second backward through a retained graph)."""

    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, scales, tree_min_weight, ce_w, needs_grad, parts):
        ctx.config = (hierarchy, gamma, scales, tree_min_weight, ce_w)
        ctx.save_for_backward(x, lc)
        grad = _gradient_buffer(x) if needs_grad else None
        total, parts["tree_min"], parts["ce"] = _native.hssn_objective(
            *_call(x, lc, hierarchy), gamma, scales, tree_min_weight, ce_w, grad=_native.address(grad),
            num_threads=num_threads())
        ctx.fused_grad = grad
        return paddle.to_tensor(np.asarray(total, dtype=_host_dtype(x)), place=x.place)

    @staticmethod
    def backward(ctx, grad_out):
        x, lc = ctx.saved_tensor()
        hierarchy, gamma, scales, tree_min_weight, ce_w = ctx.config
        grad = _scaled_gradient(ctx, x, grad_out, lambda buf, factor: _native.hssn_objective(
            *_call(x, lc, hierarchy), gamma, scales, tree_min_weight, ce_w, grad=buf.data_ptr(), factor=factor,
            values=False, num_threads=num_threads()))
        return grad, None


def hssn_objective_native(logits: paddle.Tensor, label_channels: paddle.Tensor, hierarchy: Hierarchy, *,
                          gamma: float, node_weight: paddle.Tensor | None, tree_min_weight: float,
                          ce_weights) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The paddle twin of :func:`hieraloss.torch.ops.native.hssn_objective_native`: the per-pixel HSSN
    objective ``tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d`` on CPU logits in one pass of the
    compiled kernel. Returns ``(total, tree_min, ce)``: ``total`` differentiable (float64 for float64
    logits, else float32), ``tree_min`` (hssn normalisation without the 5) and ``ce`` ``[L]`` detached.
    Validated inputs (label channels, -1 = ignored); float16/bfloat16 logits compute in float32."""
    B, N = logits.shape[:2]
    ce_w = np.ascontiguousarray([float(w) for w in ce_weights], dtype=np.float64)
    if ce_w.size != hierarchy.max_depth:
        raise ValueError(f"ce_weights needs one weight per depth ({hierarchy.max_depth}), got {ce_w.size}")
    if no_pixel(logits.shape):  # no pixel: every part an exact 0, the total connected to the logits
        total = empty_loss(logits, "mean")
        ct = compute_dtype(logits.dtype)
        return total, paddle.zeros([], dtype=ct), paddle.zeros([hierarchy.max_depth], dtype=ct)
    x, lc = _kernel_inputs(logits, label_channels)
    weight = None if node_weight is None else node_weight.astype(paddle.float64).numpy()
    scales = _native.hssn_scales(plan_for(hierarchy), _histogram(lc, hierarchy), weight)
    needs_grad = not x.stop_gradient and paddle.is_grad_enabled()
    parts: dict = {}
    total = _NativeObjective.apply(x, lc, hierarchy, float(gamma), scales, float(tree_min_weight), ce_w, needs_grad,
                                   parts)
    dtype = paddle.float64 if x.dtype == paddle.float64 else paddle.float32
    tree_min = paddle.to_tensor(np.asarray(parts["tree_min"]), dtype=dtype, place=x.place)
    ce = paddle.to_tensor(parts["ce"], dtype=dtype, place=x.place)
    return total, tree_min, ce
