"""Tree-min loss on CPU tensors through the compiled kernel (``hieraloss._native``).

One pass over the logits per call. With a scalar reduction and logits that need a gradient, the
forward pass writes the gradient too (the kernel has every term in registers already) and backward
only scales it by the upstream gradient: one pass over memory per training step instead of two.
The cost is a logits-sized buffer held from the loss's forward to its backward; the eager op
(:mod:`.tree_min`) holds nothing but recomputes. ``reduction="none"`` recomputes in backward (the
upstream map is only known there), as does a second backward through a retained graph.

Eager calls run through :class:`torch.autograd.Function`s (the cheapest dispatch). Traced calls
(``torch.compile``, ``torch.export``) run the same kernel as the registered custom ops
``torch.ops.hieraloss.native_tree_min`` and ``native_hssn_objective`` (with fake implementations and
autograd formulas), which compilers see as one opaque operator: no graph break, fullgraph works.

Gradient buffers come from a small pool (:class:`hieraloss._native.BufferPool`): a fresh 100 MB
tensor costs about as much in page faults as the kernel's whole pass, because the CPU allocator
returns such blocks to the operating system on free. A pooled buffer is handed out again only once
no tensor uses it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import _native
from ...core.plan import plan_for
from ...hierarchy import Hierarchy
from .device import device_plan, reduction_scales

# Load the kernel (or learn why it cannot load) at import, outside any trace: torch.compile then reads
# only the loaded state, never the loader's lock.
_native.available()


def _dtype_code(t: torch.Tensor) -> int:
    return _native.FLOAT64 if t.dtype == torch.float64 else _native.FLOAT32


def _run(x, lc, hierarchy, gamma, *, channel_sums=None, loss_map=None, map_scale=None, grad=None,
         grad_scale=None, grad_up=None) -> None:
    def ptr(t):
        return 0 if t is None else t.data_ptr()

    _native.tree_min(_dtype_code(x), x.data_ptr(), tuple(x.shape), lc.data_ptr(), plan_for(hierarchy),
                     gamma, channel_sums=ptr(channel_sums), loss_map=ptr(loss_map), map_scale=ptr(map_scale),
                     grad=ptr(grad), grad_scale=ptr(grad_scale), grad_up=ptr(grad_up),
                     num_threads=torch.get_num_threads())


def _fresh_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised output buffer like ``x``, with huge pages asked for (see _native.advise_hugepages)."""
    out = torch.empty_like(x)
    _native.advise_hugepages(out.data_ptr(), out.numel() * out.element_size())
    return out


def _gradient_buffer(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer like ``x`` (C-contiguous): a pooled one when it is large
    (:class:`hieraloss._native.BufferPool`), else a fresh tensor."""
    arr = _native.BUFFERS.take(tuple(x.shape), np.dtype(str(x.dtype).removeprefix("torch.")))
    return _fresh_like(x) if arr is None else torch.from_numpy(arr)


def _scales(lc, hierarchy, reduction, weight) -> torch.Tensor:
    """float64 ``[N]``: loss = sum_v scale_v * (sum of node v's entries)."""
    scale = reduction_scales(lc, device_plan(hierarchy, lc.device), reduction, torch.float64)
    if weight is not None:
        scale = scale * weight.to(torch.float64)
    return scale.contiguous()


def _tree_min_values(x, lc, weight, hierarchy, gamma, reduction, want_grad):
    """One kernel pass over contiguous inputs: ``(value, grad, scale)``. ``value`` is the loss (the map
    for ``reduction="none"``); for a scalar reduction, ``grad`` the gradient for an upstream gradient
    of 1 when ``want_grad`` (else None) and ``scale`` the per-channel factors (both None for a map)."""
    if reduction == "none":
        out = _fresh_like(x)
        w = None if weight is None else weight.to(torch.float64).contiguous()
        _run(x, lc, hierarchy, gamma, loss_map=out, map_scale=w)
        return out, None, None
    scale = _scales(lc, hierarchy, reduction, weight)
    sums = torch.empty(x.shape[1], dtype=torch.float64)
    grad = _gradient_buffer(x) if want_grad else None
    _run(x, lc, hierarchy, gamma, channel_sums=sums, grad=grad, grad_scale=scale if grad is not None else None)
    return (sums * scale).sum().to(x.dtype), grad, scale


def _tree_min_map_grad(grad_map, x, lc, weight, hierarchy, gamma) -> torch.Tensor:
    """The gradient of ``sum(map * grad_map)`` (``reduction="none"``) with respect to ``x``."""
    grad = _gradient_buffer(x)
    w = None if weight is None else weight.to(torch.float64).contiguous()
    _run(x, lc, hierarchy, gamma, grad=grad, grad_scale=w, grad_up=grad_map.to(x.dtype).contiguous())
    return grad


class _NativeTreeMin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lc, weight, hierarchy, gamma, reduction, want_grad):
        ctx.config = (hierarchy, gamma, reduction)
        ctx.save_for_backward(x, lc, weight)
        value, ctx.fused_grad, ctx.scale = _tree_min_values(x, lc, weight, hierarchy, gamma, reduction, want_grad)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        x, lc, weight = ctx.saved_tensors
        hierarchy, gamma, reduction = ctx.config
        if reduction == "none":
            return _tree_min_map_grad(grad_out, x, lc, weight, hierarchy, gamma), None, None, None, None, None, None
        factor = float(grad_out)
        grad, ctx.fused_grad = ctx.fused_grad, None  # a second backward (retained graph) recomputes
        if grad is None:
            grad = _gradient_buffer(x)
            _run(x, lc, hierarchy, gamma, grad=grad, grad_scale=ctx.scale * factor)
        elif factor != 1.0:
            grad.mul_(factor)
        return grad, None, None, None, None, None, None


def _kernel_inputs(logits: torch.Tensor, label_channels: torch.Tensor, B: int, N: int, P: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's view of validated inputs: contiguous ``[B, N, P]`` logits (float16/bfloat16 as
    float32) and contiguous int64 ``[B, P]`` label channels."""
    x = logits.reshape(B, N, P)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.contiguous(), label_channels.reshape(B, P).to(torch.int64).contiguous()


# ---------------------------------------------------------------------------- the custom ops (traced calls)
_EMPTY = (0,)


@torch.library.custom_op("hieraloss::native_tree_min", mutates_args=())
def native_tree_min_op(x: torch.Tensor, lc: torch.Tensor, weight: torch.Tensor | None, key: str, gamma: float,
                       reduction: str, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, grad)``: the loss (a scalar, or the map for ``reduction="none"``) of contiguous kernel
    inputs, and for a scalar reduction with ``want_grad`` its gradient for an upstream gradient of 1
    (else an empty tensor). ``key``: the hierarchy's fingerprint."""
    value, grad, _ = _tree_min_values(x, lc, weight, Hierarchy.by_fingerprint(key), gamma, reduction, want_grad)
    return value, x.new_empty(_EMPTY) if grad is None else grad


@native_tree_min_op.register_fake
def _(x, lc, weight, key, gamma, reduction, want_grad):
    if reduction == "none":
        return torch.empty_like(x), x.new_empty(_EMPTY)
    return x.new_empty(()), torch.empty_like(x) if want_grad else x.new_empty(_EMPTY)


@torch.library.custom_op("hieraloss::native_tree_min_map_backward", mutates_args=())
def native_tree_min_map_backward_op(grad_map: torch.Tensor, x: torch.Tensor, lc: torch.Tensor,
                                    weight: torch.Tensor | None, key: str, gamma: float) -> torch.Tensor:
    """:func:`_tree_min_map_grad` as the registered op (the backward of ``native_tree_min``'s map)."""
    return _tree_min_map_grad(grad_map, x, lc, weight, Hierarchy.by_fingerprint(key), gamma)


@native_tree_min_map_backward_op.register_fake
def _(grad_map, x, lc, weight, key, gamma):
    return torch.empty_like(x)


def _tree_min_setup(ctx, inputs, output):
    x, lc, weight, key, gamma, reduction, _ = inputs
    ctx.reduction = reduction
    if reduction == "none":
        ctx.save_for_backward(x, lc, weight)
        ctx.args = (key, gamma)
    else:
        ctx.save_for_backward(output[1])


def _tree_min_backward(ctx, grad_value, _grad_grad):
    none = (None,) * 6
    if ctx.reduction == "none":
        x, lc, weight = ctx.saved_tensors
        return (native_tree_min_map_backward_op(grad_value, x, lc, weight, *ctx.args), *none)
    (grad,) = ctx.saved_tensors
    if grad.dim() == 1 and grad.numel() == 0:
        raise RuntimeError("hieraloss: the compiled CPU kernel ran without a gradient (the logits did not "
                           "require grad when the loss was traced)")
    return (grad * grad_value.to(grad.dtype), *none)


native_tree_min_op.register_autograd(_tree_min_backward, setup_context=_tree_min_setup)


def tree_min_native(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy, *, gamma: float,
                    reduction: str, node_weight: torch.Tensor | None) -> torch.Tensor:
    """Same contract as :func:`.tree_min.tree_min_op` (validated inputs, label channels with -1 = ignored)
    for CPU logits with at least one pixel. float16/bfloat16 logits compute in float32 (the gradient is cast back)."""
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    P = math.prod(spatial)
    x, lc = _kernel_inputs(logits, label_channels, B, N, P)
    want_grad = torch.is_grad_enabled() and x.requires_grad  # Function.forward itself runs without grad mode
    if torch.compiler.is_compiling():
        out, _ = native_tree_min_op(x, lc, node_weight, hierarchy.fingerprint, float(gamma), reduction,
                                    want_grad and reduction != "none")
    else:
        out = _NativeTreeMin.apply(x, lc, node_weight, hierarchy, float(gamma), reduction, want_grad)
    return out.reshape(B, N, *spatial) if reduction == "none" else out


# ---------------------------------------------------------------------------- the HSSN objective
class _NativeObjective(torch.autograd.Function):
    """tree_min_weight * TM + sum_d ce_w[d] * CE_d in one kernel pass; outputs (total, TM, CE [L]), the
    last two not differentiable. With a gradient needed, forward writes it (backward only scales)."""

    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, tm_scale, ce_scale, tree_min_weight, ce_w, want_grad):
        ctx.config = (hierarchy, gamma)
        ctx.save_for_backward(x, lc)
        ctx.scales = (tm_scale * tree_min_weight, np.ascontiguousarray(ce_scale * ce_w))
        total, tm_t, ce_t, ctx.fused_grad = _objective_pass(x, lc, hierarchy, gamma, tm_scale, ce_scale,
                                                            tree_min_weight, ce_w, want_grad)
        ctx.mark_non_differentiable(tm_t, ce_t)
        return total, tm_t, ce_t

    @staticmethod
    def backward(ctx, grad_out, _grad_tm, _grad_ce):
        x, lc = ctx.saved_tensors
        hierarchy, gamma = ctx.config
        factor = float(grad_out)
        grad, ctx.fused_grad = ctx.fused_grad, None  # a second backward (retained graph) recomputes
        if grad is None:
            grad_scale, ce_grad_scale = (np.ascontiguousarray(s * factor) for s in ctx.scales)
            grad = _gradient_buffer(x)
            _native.tree_min(_dtype_code(x), x.data_ptr(), tuple(x.shape), lc.data_ptr(),
                             plan_for(hierarchy), gamma, grad=grad.data_ptr(),
                             grad_scale=grad_scale.ctypes.data, ce_grad_scale=ce_grad_scale.ctypes.data,
                             num_threads=torch.get_num_threads())
        elif factor != 1.0:
            grad.mul_(factor)
        return grad, None, None, None, None, None, None, None, None


def _empty_objective(logits: torch.Tensor, hierarchy: Hierarchy
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No pixel at all (B = 0 or a zero-size spatial axis): every part is an exact 0, the total still
    connected to the logits (its gradient is the empty zero tensor of the logits' shape)."""
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    total = logits.to(ct).sum()  # a sum over no element: exactly 0
    return total, total.detach().clone(), torch.zeros(hierarchy.max_depth, dtype=ct, device=logits.device)


@torch.library.custom_op("hieraloss::native_hssn_objective", mutates_args=())
def native_hssn_objective_op(x: torch.Tensor, lc: torch.Tensor, weight: torch.Tensor | None, key: str, gamma: float,
                             tree_min_weight: float, ce_weights: list[float], want_grad: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, tree_min, ce [L], grad)`` of contiguous kernel inputs (see :func:`hssn_objective_native`);
    ``grad`` the gradient for an upstream gradient of 1 when ``want_grad``, else empty."""
    hierarchy = Hierarchy.by_fingerprint(key)
    tm_scale, ce_scale = _objective_scales(x, lc, hierarchy, weight)
    ce_w = np.ascontiguousarray(ce_weights, dtype=np.float64)
    total, tm, ce, grad = _objective_pass(x, lc, hierarchy, gamma, tm_scale, ce_scale, float(tree_min_weight), ce_w,
                                          want_grad)
    return total, tm, ce, x.new_empty(_EMPTY) if grad is None else grad


@native_hssn_objective_op.register_fake
def _(x, lc, weight, key, gamma, tree_min_weight, ce_weights, want_grad):
    L = Hierarchy.by_fingerprint(key).max_depth
    return (x.new_empty(()), x.new_empty(()), x.new_empty((L,)),
            torch.empty_like(x) if want_grad else x.new_empty(_EMPTY))


def _objective_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3])


def _objective_backward(ctx, grad_total, _grad_tm, _grad_ce, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.dim() == 1 and grad.numel() == 0:
        raise RuntimeError("hieraloss: the compiled CPU kernel ran without a gradient (the logits did not "
                           "require grad when the loss was traced)")
    return (grad * grad_total.to(grad.dtype), *(None,) * 7)


native_hssn_objective_op.register_autograd(_objective_backward, setup_context=_objective_setup)


def _objective_scales(x: torch.Tensor, lc: torch.Tensor, hierarchy: Hierarchy, node_weight: torch.Tensor | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel tree-min and per-depth cross-entropy scales of one batch (host numpy)."""
    N = x.shape[1]
    hist = torch.bincount(lc.reshape(-1) + 1, minlength=N + 1)[1:].to(torch.float64).numpy()
    weight = None if node_weight is None else node_weight.detach().to(torch.float64).cpu().numpy()
    return _native.hssn_scales(plan_for(hierarchy), hist, weight)


def _objective_pass(x, lc, hierarchy, gamma, tm_scale, ce_scale, tree_min_weight, ce_w, want_grad):
    """One kernel pass: ``(total, tm, ce, grad or None)`` as tensors (the gradient for an upstream of 1)."""
    grad_scale = tm_scale * tree_min_weight  # float64 numpy [N]
    ce_grad_scale = np.ascontiguousarray(ce_scale * ce_w)  # [L]
    sums = np.empty(x.shape[1], dtype=np.float64)
    ce_sums = np.empty(ce_scale.size, dtype=np.float64)
    grad = _gradient_buffer(x) if want_grad else None
    _native.tree_min(_dtype_code(x), x.data_ptr(), tuple(x.shape), lc.data_ptr(), plan_for(hierarchy),
                     gamma, channel_sums=sums.ctypes.data, ce_sums=ce_sums.ctypes.data,
                     grad=0 if grad is None else grad.data_ptr(),
                     grad_scale=0 if grad is None else grad_scale.ctypes.data,
                     ce_grad_scale=0 if grad is None else ce_grad_scale.ctypes.data,
                     num_threads=torch.get_num_threads())
    tm = float(np.dot(sums, tm_scale))
    ce = ce_sums * ce_scale
    total = tree_min_weight * tm + float(np.dot(ce_w, ce))
    return (torch.tensor(total, dtype=x.dtype), torch.tensor(tm, dtype=x.dtype), torch.from_numpy(ce).to(x.dtype),
            grad)


def hssn_objective_native(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy, *,
                          gamma: float, node_weight: torch.Tensor | None, tree_min_weight: float,
                          ce_weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-pixel HSSN objective on CPU logits in one pass of the compiled kernel:
    ``tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d``.

    ``TM``: the (focal, with ``gamma``) tree-min loss with the per-depth normalisation of
    ``reduction="hssn"`` without its factor 5, times ``node_weight``; ``CE_d``: the mean cross-entropy
    over ``hierarchy.depth_channels[d-1]`` (as :func:`.cross_entropy.depth_cross_entropy_op`). Validated
    inputs as for :func:`tree_min_native` (label channels, -1 = ignored); ``ce_weights``: L floats
    (already resolved, e.g. by ``hieraloss.core.rules.hssn_weights``; a weight 0 only drops that
    depth from the total and the gradient). Returns ``(total, tree_min, ce)``: ``total`` the
    differentiable scalar (float64 for float64 logits, else float32), ``tree_min`` the detached
    scalar ``TM`` and ``ce`` the detached ``[L]`` tensor of every ``CE_d``. float16/bfloat16 logits
    compute in float32 (the gradient is cast back)."""
    B, N = logits.shape[:2]
    ce_list = [float(w) for w in ce_weights]
    if len(ce_list) != hierarchy.max_depth:
        raise ValueError(f"ce_weights needs one weight per depth ({hierarchy.max_depth}), got {len(ce_list)}")
    P = math.prod(logits.shape[2:])  # explicit: reshape cannot infer -1 when B = 0
    if B * P == 0:
        return _empty_objective(logits, hierarchy)
    x, lc = _kernel_inputs(logits, label_channels, B, N, P)
    want_grad = torch.is_grad_enabled() and x.requires_grad
    if torch.compiler.is_compiling():
        total, tm, ce, _ = native_hssn_objective_op(x, lc, node_weight, hierarchy.fingerprint, float(gamma),
                                                    float(tree_min_weight), ce_list, want_grad)
        return total, tm.detach(), ce.detach()
    tm_scale, ce_scale = _objective_scales(x, lc, hierarchy, node_weight)
    return _NativeObjective.apply(x, lc, hierarchy, float(gamma), tm_scale, ce_scale, float(tree_min_weight),
                                  np.ascontiguousarray(ce_list, dtype=np.float64), want_grad)
