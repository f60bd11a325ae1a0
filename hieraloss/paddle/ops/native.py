"""Tree-min loss on CPU paddle tensors through the compiled kernel (``hieraloss._native``).

The paddle twin of :mod:`hieraloss.torch.ops.native`. One pass over the logits per call. With a
scalar reduction and logits that need a gradient, the forward pass writes the gradient too and
backward only scales it by the upstream gradient: one pass over memory per training step instead
of two, at the cost of a logits-sized buffer held from forward to backward. ``reduction="none"``
recomputes in backward (the upstream map is only known there), as does a second backward through a
retained graph (``paddle.grad(..., retain_graph=True)``; paddle 3.3 crashes on a second
``Tensor.backward()`` through any ``PyLayer``).
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
from .._tables import tables_for
from .device import compute_dtype, depth_coefs, empty_loss, no_pixel

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


def _ptr(buf) -> int:
    if buf is None:
        return 0
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()


def _run(x, lc, hierarchy, gamma, *, channel_sums=None, loss_map=None, map_scale=None, grad=None,
         grad_scale=None, grad_up=None) -> None:
    dtype = _native.FLOAT64 if x.dtype == paddle.float64 else _native.FLOAT32
    _native.tree_min(dtype, x.data_ptr(), tuple(x.shape), lc.data_ptr(), plan_for(hierarchy), gamma,
                     channel_sums=_ptr(channel_sums), loss_map=_ptr(loss_map), map_scale=_ptr(map_scale),
                     grad=_ptr(grad), grad_scale=_ptr(grad_scale), grad_up=_ptr(grad_up),
                     num_threads=num_threads())


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


def _scales(lc, hierarchy, reduction, weight) -> np.ndarray:
    """float64 ``[N]``: loss = sum_v scale_v * (sum of node v's entries), from the paddle op's
    per-depth reduction factors (:func:`.device.depth_coefs`)."""
    tab = tables_for(hierarchy, lc.place)
    coefs = depth_coefs(lc, tab, reduction, 1.0, paddle.float64)
    by_depth = np.array([float(c) for c in coefs], dtype=np.float64)
    scale = by_depth[tab.plan.depth - 1]
    return np.ascontiguousarray(scale if weight is None else scale * weight)


class _NativeTreeMin(PyLayer):
    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, reduction, scale, weight, needs_grad):
        # scale: float64 [N] (scalar reductions); weight: float64 [N] or None (reduction "none")
        ctx.config = (hierarchy, gamma, reduction, scale, weight)
        ctx.fused_grad = None
        ctx.save_for_backward(x, lc)
        if reduction == "none":
            out = _fresh_like(x)
            _run(x, lc, hierarchy, gamma, loss_map=out, map_scale=weight)
            return out
        sums = np.empty(x.shape[1], dtype=np.float64)
        grad = _gradient_buffer(x) if needs_grad else None
        _run(x, lc, hierarchy, gamma, channel_sums=sums, grad=grad, grad_scale=scale if grad is not None else None)
        ctx.fused_grad = grad
        value = np.asarray(np.dot(sums, scale), dtype=np.float64 if x.dtype == paddle.float64 else np.float32)
        return paddle.to_tensor(value, place=x.place)

    @staticmethod
    def backward(ctx, grad_out):
        x, lc = ctx.saved_tensor()
        hierarchy, gamma, reduction, scale, weight = ctx.config
        if reduction == "none":
            grad = _gradient_buffer(x)
            up = grad_out.astype(x.dtype).contiguous()
            _run(x, lc, hierarchy, gamma, grad=grad, grad_scale=weight, grad_up=up)
            return grad, None
        factor = float(grad_out)
        grad, ctx.fused_grad = ctx.fused_grad, None  # a second backward (retained graph) recomputes
        if grad is None:
            grad = _gradient_buffer(x)
            _run(x, lc, hierarchy, gamma, grad=grad, grad_scale=np.ascontiguousarray(scale * factor))
        elif factor != 1.0:
            grad.scale_(factor)
        return grad, None


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
        scale = _scales(lc, hierarchy, reduction, weight)
    needs_grad = not x.stop_gradient and paddle.is_grad_enabled()
    out = _NativeTreeMin.apply(x, lc, hierarchy, float(gamma), reduction, scale, weight, needs_grad)
    return out.reshape([B, N, *spatial]) if reduction == "none" else out


# ---------------------------------------------------------------------------- the HSSN objective
class _NativeObjective(PyLayer):
    """tree_min_weight * TM + sum_d ce_w[d] * CE_d in one kernel pass. Returns the total; the detached
    parts (TM, CE [L]) are left in ``parts``. With a gradient needed, forward writes it (backward
    only scales it, or recomputes it for a second backward through a retained graph)."""

    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, tm_scale, ce_scale, tree_min_weight, ce_w, needs_grad, parts):
        grad_scale = tm_scale * tree_min_weight  # float64 [N]
        ce_grad_scale = np.ascontiguousarray(ce_scale * ce_w)  # float64 [L]
        ctx.config = (hierarchy, gamma, grad_scale, ce_grad_scale)
        ctx.save_for_backward(x, lc)
        sums = np.empty(x.shape[1], dtype=np.float64)
        ce_sums = np.empty(ce_scale.size, dtype=np.float64)
        grad = _gradient_buffer(x) if needs_grad else None
        _run_objective(x, lc, hierarchy, gamma, channel_sums=sums, ce_sums=ce_sums, grad=grad,
                       grad_scale=grad_scale if grad is not None else None,
                       ce_grad_scale=ce_grad_scale if grad is not None else None)
        ctx.fused_grad = grad
        parts["tree_min"] = float(np.dot(sums, tm_scale))
        parts["ce"] = ce_sums * ce_scale
        total = tree_min_weight * parts["tree_min"] + float(np.dot(ce_w, parts["ce"]))
        value = np.asarray(total, dtype=np.float64 if x.dtype == paddle.float64 else np.float32)
        return paddle.to_tensor(value, place=x.place)

    @staticmethod
    def backward(ctx, grad_out):
        x, lc = ctx.saved_tensor()
        hierarchy, gamma, grad_scale, ce_grad_scale = ctx.config
        factor = float(grad_out)
        grad, ctx.fused_grad = ctx.fused_grad, None  # a second backward (retained graph) recomputes
        if grad is None:
            grad = _gradient_buffer(x)
            _run_objective(x, lc, hierarchy, gamma, grad=grad, grad_scale=np.ascontiguousarray(grad_scale * factor),
                           ce_grad_scale=np.ascontiguousarray(ce_grad_scale * factor))
        elif factor != 1.0:
            grad.scale_(factor)
        return grad, None


def _run_objective(x, lc, hierarchy, gamma, *, channel_sums=None, ce_sums=None, grad=None, grad_scale=None,
                   ce_grad_scale=None) -> None:
    dtype = _native.FLOAT64 if x.dtype == paddle.float64 else _native.FLOAT32
    _native.tree_min(dtype, x.data_ptr(), tuple(x.shape), lc.data_ptr(), plan_for(hierarchy), gamma,
                     channel_sums=_ptr(channel_sums), ce_sums=_ptr(ce_sums), grad=_ptr(grad),
                     grad_scale=_ptr(grad_scale), ce_grad_scale=_ptr(ce_grad_scale), num_threads=num_threads())


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
    hist = paddle.bincount(lc.reshape([-1]) + 1, minlength=N + 1)[1:].numpy().astype(np.float64)
    weight = None if node_weight is None else node_weight.astype(paddle.float64).numpy()
    tm_scale, ce_scale = _native.hssn_scales(plan_for(hierarchy), hist, weight)
    needs_grad = not x.stop_gradient and paddle.is_grad_enabled()
    parts: dict = {}
    total = _NativeObjective.apply(x, lc, hierarchy, float(gamma), tm_scale, ce_scale, float(tree_min_weight), ce_w,
                                   needs_grad, parts)
    dtype = paddle.float64 if x.dtype == paddle.float64 else paddle.float32
    tree_min = paddle.to_tensor(np.asarray(parts["tree_min"]), dtype=dtype, place=x.place)
    ce = paddle.to_tensor(parts["ce"], dtype=dtype, place=x.place)
    return total, tree_min, ce
