"""The backward of a fused op whose forward already wrote the gradient of its scalar output.

The forward of such an op (the objective, the triplet loss) returns a gradient buffer for an
upstream gradient of 1; the backward only has to scale it by the real upstream gradient. This
module is that backward, shared so that both ops treat a second backward, tracing and
``create_graph=True`` the same way.

In eager mode the ops' implementations run through :class:`EagerFusedLoss` instead of
``torch.library``'s dispatcher: a call through the registered op costs about twice the host time of
the implementation itself, more than the whole Cityscapes kernel on the device (docs/performance.md,
"The kernels' constants"). Traced (``torch.compile``,
AOTAutograd, dispatch modes, functorch transforms), the registered op is what runs, so compilers
see one opaque operator.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION, SCALE_PROGRAMS_ENV, launch_switch, on_device


@triton.jit
def _scale_kernel(g_ptr, scale_ptr, n, BLOCK: tl.constexpr, F64: tl.constexpr):
    """``g *= scale`` in place, skipped when ``scale == 1`` (read on the device: no host sync); each
    program takes every ``programs``-th block of ``BLOCK`` entries."""
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    scale = tl.load(scale_ptr).to(CT)
    if scale != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask)
            tl.store(g_ptr + offs, (g.to(CT) * scale).to(g_ptr.dtype.element_ty), mask=mask)


_SCALE_BLOCK = 4096
# Programs per SM of the scaling: enough to stream the buffer, few enough that the usual call, an
# upstream gradient of 1 (``loss.backward()``), is one short wave of programs that read the scale
# and stop (one program per block would be about 27000 of them for a Cityscapes step).
_SCALE_PROGRAMS_PER_SM = 8


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def scale_in_place(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad *= scale`` (``grad`` dense, in any memory order) by a kernel that skips the pass when
    ``scale`` is 1 (``loss.backward()`` on the loss itself). Launched directly, not as a mutating op:
    autograd's version of the saved buffer stays as it was, and :func:`scaled_gradient` keeps track of
    the scale itself."""
    n = grad.numel()
    if n:
        programs = (launch_switch(SCALE_PROGRAMS_ENV)
                    or _multiprocessors(grad.device) * _SCALE_PROGRAMS_PER_SM)
        with on_device(grad.device):
            _scale_kernel[(min(triton.cdiv(n, _SCALE_BLOCK), programs),)](
                grad, scale.reshape(1), n, BLOCK=_SCALE_BLOCK, F64=grad.dtype == torch.float64, num_warps=4,
                **FP_FUSION)


def tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced (torch.compile, AOTAutograd, make_fx, fake tensors, any dispatch
    mode): then the backward must be plain ops, since a kernel launched on the data would not be traced."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor or torch._C._len_torch_dispatch_stack() > 0


def scaled_gradient(ctx, grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """The gradient ``grad * upstream`` for the backward of ``ctx``, where ``grad`` is the buffer the
    forward wrote for an upstream gradient of 1.

    The first backward scales the buffer in place and hands it to autograd, which keeps it as
    ``.grad`` without a copy: no second pass over the input. A further backward (``retain_graph``,
    gradcheck) reads the buffer (it may be the caller's ``.grad`` by then) and returns a new tensor;
    it has the one host sync of this path. Traced, or with ``create_graph=True``: plain ops, so the
    result stays differentiable with respect to ``upstream``.
    """
    if tracing(grad) or torch.is_grad_enabled():
        return grad * upstream.to(grad.dtype)
    applied = getattr(ctx, "applied_scale", None)
    if applied is None:
        scale_in_place(grad, upstream)
        ctx.applied_scale = upstream
        return grad.detach()
    if bool((applied == 0).any()):
        raise RuntimeError("hieraloss: a second backward through a fused loss whose first backward "
                           "had a zero upstream gradient; compute the loss again")
    return grad * (upstream / applied).to(grad.dtype)


def saved_buffer_gradient(ctx, upstream: torch.Tensor, loss: str, why: str) -> torch.Tensor:
    """The backward of a fused op for its input: the buffer its forward saved (``ctx.saved_tensors``),
    scaled by ``upstream`` (:func:`scaled_gradient`); ``loss`` and ``why`` word the error raised when
    the forward wrote none."""
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad.dim() == 1:
        raise RuntimeError(f"hieraloss: {loss} ran without a gradient ({why})")
    return scaled_gradient(ctx, grad, upstream)


def eager(t: torch.Tensor) -> bool:
    """Whether a fused op on ``t`` may run its implementation through :class:`EagerFusedLoss` rather
    than through the registered op: a plain tensor, nothing traced, no functorch transform."""
    return not tracing(t) and not torch._C._are_functorch_transforms_active()


class EagerFusedLoss(torch.autograd.Function):
    """``EagerFusedLoss.apply(impl, x, *args)``: the eager twin of a fused op. ``impl(x, *args)`` is the
    op's implementation and returns ``(value, *extras, grad)``, ``grad`` the buffer its forward wrote
    for an upstream gradient of 1 (empty without one); the result is ``value`` (with extras:
    ``(value, *extras)``, extras not differentiable), differentiable with respect to ``x`` through
    :func:`saved_buffer_gradient`, as the op's own backward."""

    @staticmethod
    def forward(ctx, impl, x, *args):
        *outs, grad = impl(x, *args)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.num_args = len(args)
        ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, grad_value, *_):
        rest = (None,) * ctx.num_args
        if grad_value is None:
            return (None, None, *rest)
        return (None, saved_buffer_gradient(ctx, grad_value, "a fused loss", "its input did not require grad"),
                *rest)
