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

The host arithmetic around the kernel (the reduction's factors, the objective's sums and total) is
:mod:`hieraloss._native`'s, shared with paddle; this module holds what is torch's: the autograd
functions, the custom ops and the buffers.

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

# Load the kernel (or learn why it cannot load) at import, outside any trace: torch.compile then reads
# only the loaded state, never the loader's lock.
_native.available()


def _call(x: torch.Tensor, lc: torch.Tensor, hierarchy: Hierarchy) -> tuple:
    """The leading arguments of the ``_native`` calls on contiguous kernel inputs."""
    dtype = _native.FLOAT64 if x.dtype == torch.float64 else _native.FLOAT32
    return dtype, x.data_ptr(), tuple(x.shape), lc.data_ptr(), plan_for(hierarchy)


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


def _host(weight: torch.Tensor | None) -> np.ndarray | None:
    """Node weights as a contiguous float64 host array (or None)."""
    return None if weight is None else np.ascontiguousarray(weight.detach().to(torch.float64).cpu().numpy())


def _tree_min_values(x, lc, weight, hierarchy, gamma, reduction, want_grad):
    """One kernel pass over contiguous inputs: ``(value, grad, scale)``. ``value`` is the loss (the map
    for ``reduction="none"``); for a scalar reduction, ``grad`` the gradient for an upstream gradient
    of 1 when ``want_grad`` (else None) and ``scale`` the per-channel factors (both None for a map)."""
    threads = torch.get_num_threads()
    if reduction == "none":
        out = _fresh_like(x)
        w = _host(weight)
        _native.tree_min(*_call(x, lc, hierarchy), gamma, loss_map=out.data_ptr(),
                         map_scale=_native.address(w), num_threads=threads)
        return out, None, None
    hist = _native.label_histogram(lc.numpy(), x.shape[1])
    scale = _native.reduction_scale(plan_for(hierarchy), hist, reduction, _host(weight))
    grad = _gradient_buffer(x) if want_grad else None
    value = _native.tree_min_value(*_call(x, lc, hierarchy), gamma, scale, grad=_native.address(grad),
                                   num_threads=threads)
    return torch.tensor(value, dtype=x.dtype), grad, scale


def _tree_min_map_grad(grad_map, x, lc, weight, hierarchy, gamma) -> torch.Tensor:
    """The gradient of ``sum(map * grad_map)`` (``reduction="none"``) with respect to ``x``."""
    grad = _gradient_buffer(x)
    w = _host(weight)
    up = grad_map.to(x.dtype).contiguous()  # bound: the kernel reads it by address
    _native.tree_min(*_call(x, lc, hierarchy), gamma, grad=grad.data_ptr(), grad_scale=_native.address(w),
                     grad_up=up.data_ptr(), num_threads=torch.get_num_threads())
    return grad


def _scaled_gradient(ctx, x: torch.Tensor, grad_out: torch.Tensor, recompute) -> torch.Tensor:
    """The gradient the forward pass wrote (``ctx.fused_grad``, for an upstream gradient of 1) times
    ``grad_out``. It is handed out once: a second backward through a retained graph gets a fresh
    buffer that ``recompute(buffer, factor)`` fills."""
    factor = float(grad_out)
    grad, ctx.fused_grad = ctx.fused_grad, None
    if grad is None:
        grad = _gradient_buffer(x)
        recompute(grad, factor)
    elif factor != 1.0:
        grad.mul_(factor)
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
        grad = _scaled_gradient(ctx, x, grad_out, lambda buf, factor: _native.tree_min_value(
            *_call(x, lc, hierarchy), gamma, ctx.scale, grad=buf.data_ptr(), factor=factor, values=False,
            num_threads=torch.get_num_threads()))
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
    def forward(ctx, x, lc, hierarchy, gamma, scales, tree_min_weight, ce_w, want_grad):
        ctx.config = (hierarchy, gamma, scales, tree_min_weight, ce_w)
        ctx.save_for_backward(x, lc)
        total, tm_t, ce_t, ctx.fused_grad = _objective_pass(x, lc, hierarchy, gamma, scales, tree_min_weight, ce_w,
                                                            want_grad)
        ctx.mark_non_differentiable(tm_t, ce_t)
        return total, tm_t, ce_t

    @staticmethod
    def backward(ctx, grad_out, _grad_tm, _grad_ce):
        x, lc = ctx.saved_tensors
        hierarchy, gamma, scales, tree_min_weight, ce_w = ctx.config
        grad = _scaled_gradient(ctx, x, grad_out, lambda buf, factor: _native.hssn_objective(
            *_call(x, lc, hierarchy), gamma, scales, tree_min_weight, ce_w, grad=buf.data_ptr(), factor=factor,
            values=False, num_threads=torch.get_num_threads()))
        return grad, None, None, None, None, None, None, None


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
    ce_w = np.ascontiguousarray(ce_weights, dtype=np.float64)
    total, tm, ce, grad = _objective_pass(x, lc, hierarchy, gamma, _objective_scales(lc, hierarchy, weight),
                                          float(tree_min_weight), ce_w, want_grad)
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


def _objective_scales(lc: torch.Tensor, hierarchy: Hierarchy, node_weight: torch.Tensor | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel tree-min and per-depth cross-entropy scales of one batch (host numpy)."""
    hist = _native.label_histogram(lc.numpy(), hierarchy.num_nodes)
    return _native.hssn_scales(plan_for(hierarchy), hist, _host(node_weight))


def _objective_pass(x, lc, hierarchy, gamma, scales, tree_min_weight, ce_w, want_grad):
    """One kernel pass: ``(total, tm, ce, grad or None)`` as tensors (the gradient for an upstream of 1)."""
    grad = _gradient_buffer(x) if want_grad else None
    total, tm, ce = _native.hssn_objective(*_call(x, lc, hierarchy), gamma, scales, tree_min_weight, ce_w,
                                           grad=_native.address(grad), num_threads=torch.get_num_threads())
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
    return _NativeObjective.apply(x, lc, hierarchy, float(gamma), _objective_scales(lc, hierarchy, node_weight),
                                  float(tree_min_weight), np.ascontiguousarray(ce_list, dtype=np.float64), want_grad)
