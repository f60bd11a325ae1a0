"""Hierarchical objectives on a flat model's leaf logits (Bertinetto et al., CVPR 2020), paddle backend.

Same names, arguments and semantics as :mod:`hieraloss.numpy.leaf_losses` (the reference) and
:mod:`hieraloss.torch.leaf_losses`. The shared rules come from the core: argument checks and messages
(:mod:`hieraloss.core.checks`), the reductions and decoders (:mod:`hieraloss.core.rules`), the
bottom-up log-sum-exp plan, the hierarchical cross-entropy coefficients and the soft targets
(:mod:`hieraloss.core.leaf`).
Labels go through the same label checks as the other paddle losses. Values are float64 for float64
logits and float32 otherwise (float16/bfloat16 accumulate in float32); gradients come back in the
logits' dtype through autograd. Inputs are never modified.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import paddle
from paddle.autograd import PyLayer

from ..core.checks import (
    check_hierarchy,
    check_leaf_decode_method,
    check_leaf_logits,
    check_leaf_reduction,
    check_nonnegative,
    dtype_name,
    is_empty,
)
from ..core.leaf import check_hxe_weighting, hxe_coefficients, leaf_plan, soft_targets
from ..core.rules import LEAF_DECODE_METHODS, LEAF_REDUCTIONS
from ..hierarchy import Hierarchy
from ._tables import TENSOR_TYPES, building_program, place_of, tables_for, vec
from .functional import _check_finite, _labels_at_door, upsample_to_labels
from .ops.decode import decode_op
from .ops.device import argmax_nan_first, compute_dtype
from .ops.labels import label_channels

__all__ = [
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]


def _checked_leaf_logits(leaf_logits: Any, hierarchy: Hierarchy) -> paddle.Tensor:
    check_hierarchy(hierarchy)
    if not isinstance(leaf_logits, TENSOR_TYPES):
        raise TypeError(f"leaf_logits must be a paddle.Tensor, got {type(leaf_logits).__name__}")
    check_leaf_logits(tuple(leaf_logits.shape), dtype_name(leaf_logits.dtype), hierarchy)
    return leaf_logits


def _flat(x: paddle.Tensor) -> tuple[paddle.Tensor, int, list[int]]:
    """``[B, K, P]`` in the compute dtype (not for empty tensors: paddle's reshape reads a 0 in
    the target shape as "keep this axis")."""
    B, K = x.shape[:2]
    spatial = list(x.shape[2:])
    return x.reshape([B, K, math.prod(spatial)]).astype(compute_dtype(x.dtype)), B, spatial


def node_log_sum_exp(x: paddle.Tensor, hierarchy: Hierarchy) -> paddle.Tensor:
    """``[B, N, P]`` (channel order, no autograd): the log-sum-exp of the leaf logits ``x [B, K, P]``
    under each node, built bottom-up with ``logaddexp`` one child rank at a time (``LeafPlan``).
    Works on ``[N, B, P]`` rows so that every fill is a row scatter."""
    tab = tables_for(hierarchy, place_of(x))
    plan = leaf_plan(hierarchy)
    B, K, P = x.shape
    with paddle.no_grad():
        rows = paddle.zeros([hierarchy.num_nodes, B, P], dtype=x.dtype)
        rows = paddle.scatter(rows, tab.get("leaf_channels", lambda: plan.leaf_channels), x.transpose([1, 0, 2]))
        for i, (nodes, ranks) in enumerate(plan.steps):
            kids = [tab.get(("leaf_plan_kids", i, r), lambda k=k: k) for r, (_, k) in enumerate(ranks)]
            acc = paddle.index_select(rows, kids[0], axis=0)
            for (count, _), k in zip(ranks[1:], kids[1:], strict=True):
                head = paddle.logaddexp(acc[:count], paddle.index_select(rows, k, axis=0))
                acc = head if count == acc.shape[0] else paddle.concat([head, acc[count:]], axis=0)
            rows = paddle.scatter(rows, tab.get(("leaf_plan_nodes", i), lambda n=nodes: n), acc)
        return rows.transpose([1, 0, 2])


_TINY = {"float32": 1e-30, "float64": 1e-290}
_EXP_CAP = {"float32": 80.0, "float64": 700.0}


def _rows_from_t(table_t: paddle.Tensor, safe: paddle.Tensor) -> paddle.Tensor:
    """``table[safe]`` laid out as ``[B, K, P]``, for a transposed table ``table_t [K, N]`` and label
    channels ``safe [B, P]`` (pixels stay the contiguous axis, like the logits')."""
    B, P = safe.shape
    rows = paddle.index_select(table_t, safe.reshape([-1]), axis=1)  # [K, B * P]
    return rows.reshape([table_t.shape[0], B, P]).transpose([1, 0, 2])


def _common_depth(hierarchy: Hierarchy, safe: paddle.Tensor) -> paddle.Tensor:
    """``[B, K, P]``: how many nodes of each pixel's label path each leaf is under (``LeafPlan``)."""
    tab = tables_for(hierarchy, place_of(safe))
    table_t = tab.get("leaf_common_depth_t", lambda: np.ascontiguousarray(leaf_plan(hierarchy).common_depth.T))
    return _rows_from_t(table_t, safe)


def _exp(t: paddle.Tensor) -> paddle.Tensor:
    """``exp``, exactly 0 at -inf (paddle's CPU ``exp`` can return a subnormal there)."""
    return paddle.where(t == -math.inf, paddle.zeros_like(t), paddle.exp(t))


def _finite_shift(top: paddle.Tensor) -> paddle.Tensor:
    """The shift of a log-sum-exp: the maximum, or 0 where it is infinite (a +inf or an all -inf
    row gives +inf or -inf, not NaN from ``inf - inf``), as in the torch backend."""
    return paddle.where(paddle.isinf(top), paddle.zeros_like(top), top)


class _HierarchicalCE(PyLayer):
    """Per-pixel hierarchical cross-entropy; the same algorithm as the torch backend's
    ``_HierarchicalCE`` (see there): leaves bucketed by ``common_depth`` with one scatter-add of
    ``exp(x - max)``, rare recomputation of an underflowing subtree with its own maximum, and a
    backward of a few passes over the logits."""

    @staticmethod
    def forward(ctx, xf, safe, coef_np, hierarchy):
        L = hierarchy.max_depth
        B, _, P = xf.shape
        name = dtype_name(xf.dtype)
        tab = tables_for(hierarchy, place_of(xf))
        m = _common_depth(hierarchy, safe)  # [B, K, P]
        top = _finite_shift(xf.max(axis=1, keepdim=True))  # [B, 1, P]
        buckets = paddle.put_along_axis(paddle.zeros([B, L + 1, P], dtype=xf.dtype), m, _exp(xf - top),
                                        axis=1, reduce="add")
        sums = paddle.flip(paddle.cumsum(paddle.flip(buckets, [1]), axis=1), [1])
        depth = paddle.index_select(vec(tab, "depth"), safe.reshape([-1])).reshape([B, 1, P])
        d_index = paddle.minimum(paddle.arange(L + 1, dtype="int64").reshape([1, -1, 1]), depth)
        sums = paddle.take_along_axis(sums, d_index, axis=1)
        path = top + paddle.log(sums)
        if building_program():  # nothing to read back: redo every depth below the root
            redo = list(range(1, L + 1))
        else:
            small = (sums < _TINY[name]).astype("int32").sum(axis=[0, 2]).numpy()  # one read-back
            redo = [int(d) for d in np.flatnonzero(small)]
        if redo:  # rare: LSE of the subtree with the subtree's own maximum
            label_depth = m.max(axis=1, keepdim=True)
            neg_inf = paddle.full([1], -math.inf, dtype=xf.dtype)
            columns = []
            for d in range(L + 1):
                if d in redo:
                    masked = paddle.where(m >= paddle.clip(label_depth, max=d), xf, neg_inf)
                    best = _finite_shift(masked.max(axis=1, keepdim=True))
                    columns.append(best + paddle.log(_exp(masked - best).sum(axis=1, keepdim=True)))
                else:
                    columns.append(path[:, d: d + 1])
            path = paddle.concat(columns, axis=1)
        coef_t = paddle.to_tensor(coef_np, place=place_of(xf)).astype(xf.dtype)
        coef = paddle.index_select(coef_t, safe.reshape([-1])).reshape([B, P, L + 1]).transpose([0, 2, 1])
        ctx.save_for_backward(xf, safe, path, top, coef)
        ctx.config = (hierarchy, redo)
        # a 0 coefficient contributes 0 even where its LSE is infinite (a -inf label logit)
        return paddle.where(coef != 0, coef * path, paddle.zeros([1], dtype=path.dtype)).sum(axis=1)

    @staticmethod
    def backward(ctx, grad):
        xf, safe, path, top, coef = ctx.saved_tensor()
        hierarchy, redo = ctx.config
        name = dtype_name(xf.dtype)
        m = _common_depth(hierarchy, safe)
        coef = coef * grad.unsqueeze(1)  # [B, L+1, P]
        k = coef * paddle.exp(paddle.clip(top - path, max=_EXP_CAP[name]))  # 0 wherever coef is 0
        if redo:
            keep = np.ones(path.shape[1], dtype=np.float32)
            keep[redo] = 0  # those depths take the direct route below
            k = k * paddle.to_tensor(keep, place=place_of(xf)).astype(k.dtype).reshape([1, -1, 1])
        dx = paddle.exp(xf - top) * paddle.take_along_axis(paddle.cumsum(k, axis=1), m, axis=1)
        for d in redo:
            part = paddle.exp(xf - path[:, d: d + 1]) * (m >= d).astype(xf.dtype)
            dx = dx + paddle.nan_to_num(part, nan=0.0, posinf=0.0, neginf=0.0) * coef[:, d: d + 1]
        return dx, None


class _SoftLabelCE(PyLayer):
    """Per-pixel ``LSE(x) - sum_l q[c, l] x_l``; backward ``softmax(x) - q[c]`` (q gathered again)."""

    @staticmethod
    def forward(ctx, xf, safe, targets_np, hierarchy):
        root = paddle.logsumexp(xf, axis=1)  # [B, P]
        targets_t = paddle.to_tensor(np.ascontiguousarray(targets_np.T), place=place_of(xf)).astype(xf.dtype)
        q = _rows_from_t(targets_t, safe)
        ctx.save_for_backward(xf, safe, root, targets_t)
        return root - (q * xf).sum(axis=1)

    @staticmethod
    def backward(ctx, grad):
        xf, safe, root, targets_t = ctx.saved_tensor()
        dx = (paddle.exp(xf - root.unsqueeze(1)) - _rows_from_t(targets_t, safe)) * grad.unsqueeze(1)
        return dx, None


class _ProgramContext:
    """The ``ctx`` of a PyLayer's forward called directly while paddle builds a static program: the
    program's own autodiff takes the gradient, so nothing is saved for a backward."""

    def save_for_backward(self, *tensors: Any) -> None:
        pass


def _empty_result(x: paddle.Tensor, B: int, spatial: list[int], reduction: str) -> paddle.Tensor:
    """No pixel at all: an exact 0 (or an empty map) still connected to the logits."""
    zero = x.astype(compute_dtype(x.dtype)).sum() * 0
    if reduction == "none":
        return paddle.zeros([B, *spatial], dtype=zero.dtype) + zero
    return zero


def _reduce(loss: paddle.Tensor, valid: paddle.Tensor, reduction: str, B: int, spatial: list[int]):
    loss = paddle.where(valid, loss, paddle.zeros([1], dtype=loss.dtype))
    if reduction == "none":
        return loss.reshape([B, *spatial])
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / paddle.clip(valid.astype("int64").sum(), min=1).astype(loss.dtype)


def _leaf_loss(op, table, leaf_logits, labels, hierarchy, ignore_index, reduction, value, name, upsample_logits,
               check_finite):
    """Check the arguments, then ``op`` (a PyLayer) on ``[B, K, P]`` logits and label channels."""
    x = upsample_to_labels(_checked_leaf_logits(leaf_logits, hierarchy), labels, upsample_logits)
    v = check_nonnegative(value, name)
    check_leaf_reduction(reduction)
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    if check_finite:
        _check_finite(x, "leaf_logits")
    lc, _ = label_channels(labels, hierarchy, ignore_index)
    B, spatial = x.shape[0], list(x.shape[2:])
    if is_empty(x.shape):
        return _empty_result(x, B, spatial, reduction)
    xf, B, spatial = _flat(x)
    lc = lc.reshape([B, xf.shape[2]])
    if building_program():  # the program differentiates the forward's ops (no PyLayer enters it)
        loss = op.forward(_ProgramContext(), xf, paddle.clip(lc, min=0), table(hierarchy, v), hierarchy)
    else:
        loss = op.apply(xf, paddle.clip(lc, min=0), table(hierarchy, v), hierarchy)
    return _reduce(loss, lc >= 0, reduction, B, spatial)


def hierarchical_cross_entropy(leaf_logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                               alpha: float = 0.1, ignore_index: int = 255, reduction: str = "mean",
                               upsample_logits: bool = False, weighting: str = "depth",
                               normalize: bool = False, check_finite: bool = False) -> paddle.Tensor:
    """Hierarchical cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    ``-sum over the edges of the label's path of w(C) * log p(C | parent(C))``, with the published
    ``w(C) = exp(-alpha * depth(C))`` (``weighting="depth"``, a top-level node has depth 1; ``"height"``:
    ``exp(-alpha * height(C))``; ``normalize=True`` divides by the sum over all nodes, as the released
    code: :func:`hieraloss.core.leaf.hxe_edge_weights`),
    p from the softmax over leaves (``p(C)`` = sum of the leaf probabilities under C, computed as
    a log-sum-exp of the leaf logits). A partial label (internal node c) takes the edges from the
    root down to c. ``alpha = 0`` is the flat cross-entropy. ``reduction``: ``"mean"`` over
    counted (not ignored) pixels, ``"sum"`` or ``"none"`` (``[B, *spatial]``, 0 where ignored); no
    counted pixel gives an exact 0 connected to the graph. ``upsample_logits=True`` resizes leaf
    logits at a lower resolution than the labels first, as for :func:`~hieraloss.paddle.tree_min_loss`.
    """
    check_hxe_weighting(weighting, normalize)
    # a partial, not a closure: paddle's SOT mode passes a closure's cells for their values
    table = functools.partial(_hxe_table, weighting=weighting, normalize=bool(normalize))
    return _leaf_loss(_HierarchicalCE, table, leaf_logits, labels, hierarchy, ignore_index, reduction,
                      alpha, "alpha", upsample_logits, check_finite)


def _hxe_table(h: Hierarchy, a: float, *, weighting: str, normalize: bool) -> np.ndarray:
    return hxe_coefficients(h, a, weighting, normalize)


def soft_label_cross_entropy(leaf_logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                             beta: float = 1.0, ignore_index: int = 255, reduction: str = "mean",
                             upsample_logits: bool = False, check_finite: bool = False) -> paddle.Tensor:
    """Soft-label cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    Target over leaves ``q(l) = softmax_l(-beta * psi(c, l))`` for a pixel labelled c (psi =
    ``Hierarchy.node_leaf_distance``, edges through the lowest common ancestor). The paper uses the
    height of the lowest common ancestor over the tree height instead of psi: on a balanced tree of
    depth L, psi is twice that height, so its ``beta_paper`` is ``beta = beta_paper / (2 * L)`` here.
    Loss ``-sum_l q(l) log p(l)``. A partial label c measures the distances from the node c. Large beta tends to the
    flat cross-entropy. Reductions and ``upsample_logits`` as :func:`hierarchical_cross_entropy`.
    """
    return _leaf_loss(_SoftLabelCE, soft_targets, leaf_logits, labels, hierarchy, ignore_index, reduction,
                      beta, "beta", upsample_logits, check_finite)


def decode_leaf_logits(leaf_logits: paddle.Tensor, hierarchy: Hierarchy, method: str = "argmax"
                       ) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Decode ``leaf_logits [B, K, *spatial]`` to ``(leaf_ids [B, *spatial], depth_labels [B, L,
    *spatial])`` (int64 node ids; ``depth_labels[:, d-1]`` is the node at depth d of the chosen
    leaf's path, a shallow leaf repeating).

    ``"argmax"``: the leaf argmax (ties: lowest leaf id). ``"top_down"``: among the depth-1 nodes,
    then among the children of the chosen node, ..., the node with the largest summed leaf
    probability (compared as the log-sum-exp of its leaf logits; ties: lowest channel); a chosen
    leaf stops the descent.
    """
    x = _checked_leaf_logits(leaf_logits, hierarchy)
    check_leaf_decode_method(method)
    B, spatial, L = x.shape[0], list(x.shape[2:]), hierarchy.max_depth
    if is_empty(x.shape):
        return paddle.zeros([B, *spatial], dtype="int64"), paddle.zeros([B, L, *spatial], dtype="int64")
    with paddle.no_grad():
        xf, B, spatial = _flat(x.detach())
        if method == "top_down":
            lse = node_log_sum_exp(xf, hierarchy)
            return decode_op(lse.reshape([B, hierarchy.num_nodes, *spatial]), hierarchy, "top_down")
        tab = tables_for(hierarchy, place_of(xf))
        leaf = argmax_nan_first(xf, axis=1).reshape([-1])  # first maximum (a NaN first): lowest leaf id
        paths = tab.get("leaf_path_ids", lambda: leaf_plan(hierarchy).leaf_path_ids)
        depth = paddle.index_select(paths, leaf).reshape([B, -1, L]).transpose([0, 2, 1])
        return leaf.reshape([B, *spatial]), depth.reshape([B, L, *spatial])
