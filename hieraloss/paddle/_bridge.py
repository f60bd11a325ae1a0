"""Zero-copy DLPack bridge from paddle tensors to the fused Triton kernels of ``hieraloss.torch.kernels``.

Logits and label channels are handed to torch as DLPack views (no copy), the torch kernels run
(on paddle's current CUDA stream, so no device sync is needed), and the results come back to
paddle as DLPack views. The gradient takes the same route inside a ``paddle.autograd.PyLayer``:
the torch graph of the forward (which saves only what the kernel op saves) is kept and asked for
the gradient with respect to the logits view.

The triplet loss takes the labels the same way: their per-pixel codes are computed by the torch
kernel from a DLPack view of the labels (no host copy), the random key order comes from the numpy
Generator (the core's permutation, one read-back of the number of taking-part pixels), and the
value and gradient from the fused triplet kernels on a view of the embeddings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import paddle
from paddle.autograd import PyLayer

from ..hierarchy import Hierarchy

__all__ = ["to_torch", "to_paddle", "unavailable_reason", "unsupported_reason", "triplet_unsupported_reason",
           "fused_tree_min_loss", "fused_objective", "fused_decode", "fused_triplet_loss"]


def _kernels():
    from ..torch import kernels

    return kernels


def unavailable_reason(x: paddle.Tensor) -> str | None:
    """Why the fused path cannot run for ``x`` (None when it can)."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (the fused kernels are torch/Triton kernels)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        kernels = _kernels()
    except Exception as exc:  # noqa: BLE001 - a broken kernels import means "not available"
        return f"the fused Triton kernels failed to import: {exc!r}"
    if not hasattr(kernels, "fused_tree_min_loss") or not kernels.triton_available():
        return "the fused Triton kernels are not available here (no CUDA device and no TRITON_INTERPRET=1)"
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.place.is_gpu_place() or (interpreting and x.place.is_cpu_place())):
        return f"the fused kernels need GPU tensors (or CPU tensors with TRITON_INTERPRET=1); got {x.place}"
    return None


def to_torch(x: paddle.Tensor):
    """A torch view of ``x`` sharing its memory (DLPack)."""
    import torch.utils.dlpack

    if not x.is_contiguous():
        x = x.contiguous()
    return torch.utils.dlpack.from_dlpack(paddle.utils.dlpack.to_dlpack(x.detach()))


def to_paddle(t) -> paddle.Tensor:
    """A paddle view of the torch tensor ``t`` sharing its memory (DLPack)."""
    import torch.utils.dlpack

    return paddle.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t.detach().contiguous()))


@contextlib.contextmanager
def _on_paddle_stream(x: paddle.Tensor):
    """Run torch work on paddle's current CUDA stream so both frameworks see one ordered queue."""
    import torch

    if not x.place.is_gpu_place():
        yield
        return
    gpu = x.place.gpu_device_id()
    stream = paddle.device.current_stream(f"gpu:{gpu}")
    handle = stream.__cuda_stream__()[1]  # the raw cudaStream_t (CUDA stream protocol)
    with torch.cuda.stream(torch.cuda.ExternalStream(handle, device=torch.device("cuda", gpu))):
        yield


class _FusedTreeMin(PyLayer):
    """Forward and backward through the torch kernel op; saves the logits and labels (as views)."""

    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, reduction, weight):
        import torch

        with _on_paddle_stream(x):
            xt = to_torch(x).requires_grad_(True)
            wt = None if weight is None else to_torch(weight)
            with torch.enable_grad():
                out = _kernels().fused_tree_min_loss(
                    xt,
                    to_torch(lc),
                    hierarchy,
                    gamma=None if gamma == 0 else gamma,
                    reduction=reduction,
                    node_weight=wt,
                )
            ctx.torch_graph = (out, xt)
            return to_paddle(out)

    @staticmethod
    def backward(ctx, grad_out):
        import torch

        out, xt = ctx.torch_graph
        with _on_paddle_stream(grad_out):
            (gx,) = torch.autograd.grad(out, xt, grad_outputs=to_torch(grad_out.astype(_dtype_of(out))))
            ctx.torch_graph = None
            return to_paddle(gx), None


class _FusedObjective(PyLayer):
    """The HSSN objective's per-pixel part (tree-min + CE at every depth) through the torch op:
    outputs (total, parts); parts are values only (not differentiable)."""

    @staticmethod
    def forward(ctx, x, lc, hierarchy, gamma, tm_weight, ce_weights, weight, tree_min=True):
        import torch

        with _on_paddle_stream(x):
            xt = to_torch(x).requires_grad_(True)
            wt = None if weight is None else to_torch(weight)
            with torch.enable_grad():
                total, parts = _kernels().fused_objective(
                    xt, to_torch(lc), hierarchy, ignore_index=None, gamma=gamma, reduction="hssn",
                    tree_min=tree_min, tm_weight=tm_weight, ce_weights=ce_weights, node_weight=wt,
                )
            ctx.torch_graph = (total, xt)
            ctx.has_weight = weight is not None
            parts_p = to_paddle(parts)
            ctx.mark_non_differentiable(parts_p)
            return to_paddle(total), parts_p

    @staticmethod
    def backward(ctx, grad_total, grad_parts=None):
        import torch

        total, xt = ctx.torch_graph
        with _on_paddle_stream(grad_total):
            (gx,) = torch.autograd.grad(total, xt, grad_outputs=to_torch(grad_total.astype(_dtype_of(total))))
            ctx.torch_graph = None
            # One gradient per tensor input: logits, label channels and the node weights when given.
            return (to_paddle(gx), None) + ((None,) if ctx.has_weight else ())


def fused_objective(
    logits: paddle.Tensor,
    label_channels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    gamma: float,
    tm_weight: float,
    ce_weights,
    node_weight: paddle.Tensor | None,
    tree_min: bool = True,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(total, parts)`` of :func:`hieraloss.torch.kernels.fused_objective` with ``reduction="hssn"``
    on label channels: ``parts = [TM (with the factor 5), CE_1, ..., CE_L]``, values only;
    ``tree_min=False`` leaves the tree-min term out (TM is then 0)."""
    weight = (
        None
        if node_weight is None
        else node_weight.astype("float64" if logits.dtype == paddle.float64 else "float32")
    )
    return _FusedObjective.apply(logits, label_channels, hierarchy, float(gamma), float(tm_weight),
                                 [float(w) for w in ce_weights], weight, bool(tree_min))


def _dtype_of(t) -> Any:
    return str(t.dtype).replace("torch.", "")


def fused_tree_min_loss(
    logits: paddle.Tensor,
    label_channels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    gamma: float,
    reduction: str,
    node_weight: paddle.Tensor | None,
) -> paddle.Tensor:
    """Tree-min / focal tree-min loss through the fused kernel (``gamma=0``: plain tree-min)."""
    weight = (
        None
        if node_weight is None
        else node_weight.astype("float64" if logits.dtype == paddle.float64 else "float32")
    )
    return _FusedTreeMin.apply(logits, label_channels, hierarchy, float(gamma), reduction, weight)


def fused_decode(
    logits: paddle.Tensor, hierarchy: Hierarchy, method: str
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(leaf node ids, depth node ids)`` from the fused decoder (``path`` or ``top_down``)."""
    with _on_paddle_stream(logits):
        leaf, depth = _kernels().fused_decode(to_torch(logits), hierarchy, method)
        return to_paddle(leaf), to_paddle(depth)


def unsupported_reason(x: paddle.Tensor, hierarchy: Hierarchy, op: str = "objective") -> str | None:
    """Why the fused objective (``op="objective"``) or decode kernel cannot take these logits of
    ``hierarchy`` (None when it can); assumes :func:`unavailable_reason` is None."""
    return _kernels().unsupported_reason(tuple(x.shape), hierarchy, op)


def triplet_unsupported_reason(x: paddle.Tensor, hierarchy: Hierarchy) -> str | None:
    """Why the fused triplet kernels do not take these sizes (None when they do); assumes
    :func:`unavailable_reason` is None."""
    kernels = _kernels()
    if not hasattr(kernels, "fused_triplet_loss"):
        return "the fused triplet kernels are not available in this version of hieraloss.torch.kernels"
    import torch

    # The size rule reads only the shape: a meta tensor of that shape stands in for the embeddings.
    if kernels.triplet_supported(hierarchy, torch.empty((), device="meta").expand(*x.shape)):
        return None
    from ..torch.kernels import triplet

    return triplet.unsupported_reason(hierarchy, tuple(x.shape))


class _FusedTriplet(PyLayer):
    """The triplet loss (times ``scale``, applied in the kernel) through the torch kernel op, whose
    forward also writes the gradient (for an upstream gradient of 1); the backward asks the torch graph
    for it, scaled by the upstream gradient (no pass when that is 1)."""

    @staticmethod
    def forward(ctx, x, codes, order, hierarchy, max_per_class, base_margin, scale, want_grad):
        import torch

        with _on_paddle_stream(x):
            xt = to_torch(x).requires_grad_(want_grad)
            with torch.enable_grad():
                out = _kernels().fused_triplet_loss(xt, codes, hierarchy, max_per_class=max_per_class,
                                                    base_margin=base_margin, order=order, scale=scale)
            ctx.torch_graph = (out, xt) if want_grad else None
            return to_paddle(out)

    @staticmethod
    def backward(ctx, grad_out):
        import torch

        if ctx.torch_graph is None:  # run without a gradient wanted (cannot normally be reached)
            raise RuntimeError("hieraloss: the fused triplet loss ran without a gradient (embeddings had "
                               "stop_gradient=True or gradients were off)")
        out, xt = ctx.torch_graph
        with _on_paddle_stream(grad_out):
            (gx,) = torch.autograd.grad(out, xt, grad_outputs=to_torch(grad_out.astype(_dtype_of(out))))
            ctx.torch_graph = None
            return to_paddle(gx)


def fused_triplet_loss(
    embeddings: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    ignore_index: int,
    max_per_class: int,
    base_margin: float,
    sampling: str,
    generator: Any,
    scale: float = 1.0,
) -> paddle.Tensor:
    """The hierarchy triplet loss of ``embeddings [B, C, h, w]`` (any float dtype) for node-id
    ``labels [B, H, W]`` (any integer dtype; resampled nearest to ``h x w`` by the codes kernel)
    through the fused Triton triplet kernels: float64 for float64 embeddings, else float32,
    differentiable with respect to ``embeddings``; times ``scale``, which the kernel applies to the
    value and the gradient it writes (no multiply of its own, nor a pass in the backward).

    ``sampling="first"``: flat key order. ``"random"``: ``generator`` is a numpy Generator, and the
    key order is the core's permutation of the taking-part pixels
    (:func:`hieraloss.core.triplets.random_order`, one draw, also when none takes part), so the
    triplets are those of the paddle ops, numpy and torch for the same int seed. Label values that
    are neither leaf ids nor ``ignore_index`` do not take part (no check here).
    """
    from ..core import triplets as core_triplets
    from ..torch.ops.triplet import key_order

    kernels = _kernels()
    size = tuple(int(n) for n in embeddings.shape[2:])
    with _on_paddle_stream(embeddings):
        codes = kernels.triplet_codes(to_torch(labels), hierarchy, ignore_index=int(ignore_index), size=size)
        order = None
        if sampling == "random":
            if codes.numel():
                order = key_order(codes, sampling, generator)
            else:  # no pixel: nothing to order, but the draw is made as in every backend
                core_triplets.random_order(0, generator)
    want_grad = bool(paddle.is_grad_enabled() and not embeddings.stop_gradient)
    return _FusedTriplet.apply(embeddings, codes, order, hierarchy, int(max_per_class), float(base_margin),
                               float(scale), want_grad)
