"""Hierarchical objectives on a flat model's leaf logits (Bertinetto et al., CVPR 2020), paddle backend.

Same names, arguments and semantics as :mod:`hieraloss.numpy.leaf_losses` (the reference, which
also holds the shared rules: argument checks and messages, the bottom-up log-sum-exp plan, the
hierarchical cross-entropy coefficients and the soft targets) and :mod:`hieraloss.torch.leaf_losses`.
Labels go through the same label checks as the other paddle losses. Values are float64 for float64
logits and float32 otherwise (float16/bfloat16 accumulate in float32); gradients come back in the
logits' dtype through autograd. Inputs are never modified.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import paddle

from .._checks import check_hierarchy
from ..hierarchy import Hierarchy
from ..numpy.leaf_losses import (
    LEAF_DECODE_METHODS,
    LEAF_REDUCTIONS,
    check_leaf_decode_method,
    check_leaf_logits,
    check_leaf_reduction,
    check_nonnegative,
    hxe_coefficients,
    leaf_plan,
    soft_targets,
)
from . import functional as F

__all__ = [
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]


def _checked_leaf_logits(leaf_logits: Any, hierarchy: Hierarchy) -> paddle.Tensor:
    check_hierarchy(hierarchy)
    if not isinstance(leaf_logits, paddle.Tensor):
        raise TypeError(f"leaf_logits must be a paddle.Tensor, got {type(leaf_logits).__name__}")
    check_leaf_logits(tuple(leaf_logits.shape), F._dtype_name(leaf_logits.dtype), hierarchy)
    return leaf_logits


def _flat(x: paddle.Tensor) -> tuple[paddle.Tensor, int, list[int]]:
    """``[B, K, P]`` in the compute dtype (not for empty tensors: paddle's reshape reads a 0 in
    the target shape as "keep this axis")."""
    B, K = x.shape[:2]
    spatial = list(x.shape[2:])
    return x.reshape([B, K, math.prod(spatial)]).astype(F.compute_dtype(x.dtype)), B, spatial


def node_log_sum_exp(x: paddle.Tensor, hierarchy: Hierarchy) -> paddle.Tensor:
    """``[B, N, P]`` (channel order): the log-sum-exp of the leaf logits ``x [B, K, P]`` under each
    node, built bottom-up with ``logaddexp`` one child rank at a time (differentiable)."""
    tab = F._tables(hierarchy, x.place)
    plan = leaf_plan(hierarchy)
    vals = x
    for i, (_, ranks) in enumerate(plan.steps):
        index = [tab.get(("leaf_plan_rank", i, r), lambda pos=pos: pos) for r, (_, pos) in enumerate(ranks)]
        acc = paddle.index_select(vals, index[0], axis=1)
        for (count, _), pos in zip(ranks[1:], index[1:], strict=True):
            head = paddle.logaddexp(acc[:, :count], paddle.index_select(vals, pos, axis=1))
            acc = head if count == acc.shape[1] else paddle.concat([head, acc[:, count:]], axis=1)
        vals = paddle.concat([vals, acc], axis=1)
    return paddle.index_select(vals, tab.get("leaf_plan_position", lambda: plan.position), axis=1)


def _empty_result(x: paddle.Tensor, B: int, spatial: list[int], reduction: str) -> paddle.Tensor:
    """No pixel at all: an exact 0 (or an empty map) still connected to the logits."""
    zero = x.astype(F.compute_dtype(x.dtype)).sum() * 0
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


def _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, value, name):
    x = _checked_leaf_logits(leaf_logits, hierarchy)
    v = check_nonnegative(value, name)
    check_leaf_reduction(reduction)
    lc, _ = F._checked_labels(labels, x, hierarchy, ignore_index)
    return x, lc, v


def _rows(table: np.ndarray, index: paddle.Tensor, dtype: Any) -> paddle.Tensor:
    """``table[index]`` (a small per-call table: it depends on alpha / beta) in ``dtype``."""
    return paddle.index_select(paddle.to_tensor(table, place=index.place).astype(dtype), index)


def hierarchical_cross_entropy(leaf_logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                               alpha: float = 0.1, ignore_index: int = 255, reduction: str = "mean"
                               ) -> paddle.Tensor:
    """Hierarchical cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    ``-sum over the edges of the label's path of exp(-alpha * height(C)) * log p(C | parent(C))``,
    p from the softmax over leaves (``p(C)`` = sum of the leaf probabilities under C, computed as
    a log-sum-exp of the leaf logits). A partial label (internal node c) takes the edges from the
    root down to c. ``alpha = 0`` is the flat cross-entropy. ``reduction``: ``"mean"`` over
    counted (not ignored) pixels, ``"sum"`` or ``"none"`` (``[B, *spatial]``, 0 where ignored); no
    counted pixel gives an exact 0 connected to the graph.
    """
    x, lc, a = _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, alpha, "alpha")
    B, spatial = x.shape[0], list(x.shape[2:])
    if x.size == 0:
        return _empty_result(x, B, spatial, reduction)
    xf, B, spatial = _flat(x)
    P, L = xf.shape[2], hierarchy.max_depth
    tab = F._tables(hierarchy, xf.place)
    lc = lc.reshape([B, P])
    valid = lc >= 0
    safe = paddle.clip(lc, min=0).reshape([-1])
    lse = node_log_sum_exp(xf, hierarchy)  # [B, N, P]
    root = paddle.logsumexp(xf, axis=1)  # [B, P]
    coef = _rows(hxe_coefficients(hierarchy, a), safe, xf.dtype).reshape([B, P, L + 1])
    anc = paddle.index_select(F._vec(tab, "ancestor_table"), safe).reshape([B, P, L]).transpose([0, 2, 1])
    on_path = paddle.take_along_axis(lse, anc, axis=1)  # [B, L, P]
    loss = coef[:, :, 0] * root + (coef[:, :, 1:].transpose([0, 2, 1]) * on_path).sum(axis=1)
    return _reduce(loss, valid, reduction, B, spatial)


def soft_label_cross_entropy(leaf_logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                             beta: float = 1.0, ignore_index: int = 255, reduction: str = "mean"
                             ) -> paddle.Tensor:
    """Soft-label cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    Target over leaves ``q(l) = softmax_l(-beta * psi(c, l))`` for a pixel labelled c (psi =
    ``Hierarchy.node_leaf_distance``, edges through the lowest common ancestor; the paper divides
    its distance by the tree height, a constant factor absorbed in beta); loss ``-sum_l q(l) log
    p(l)``. A partial label c measures the distances from the node c. Large beta tends to the
    flat cross-entropy. Reductions as :func:`hierarchical_cross_entropy`.
    """
    x, lc, b = _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, beta, "beta")
    B, spatial = x.shape[0], list(x.shape[2:])
    if x.size == 0:
        return _empty_result(x, B, spatial, reduction)
    xf, B, spatial = _flat(x)
    P, K = xf.shape[2], hierarchy.num_leaves
    lc = lc.reshape([B, P])
    valid = lc >= 0
    safe = paddle.clip(lc, min=0).reshape([-1])
    q = _rows(soft_targets(hierarchy, b), safe, xf.dtype)
    q = q.reshape([B, P, K]).transpose([0, 2, 1])  # [B, K, P]
    loss = paddle.logsumexp(xf, axis=1) - (q * xf).sum(axis=1)
    return _reduce(loss, valid, reduction, B, spatial)


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
    if x.size == 0:
        return paddle.zeros([B, *spatial], dtype="int64"), paddle.zeros([B, L, *spatial], dtype="int64")
    with paddle.no_grad():
        xf, B, spatial = _flat(x.detach())
        if method == "top_down":
            lse = node_log_sum_exp(xf, hierarchy)
            return F.decode_op(lse.reshape([B, hierarchy.num_nodes, *spatial]), hierarchy, "top_down")
        tab = F._tables(hierarchy, xf.place)
        leaf = paddle.argmax(xf, axis=1).reshape([-1])  # first maximum: lowest leaf id
        paths = tab.get("leaf_path_ids", lambda: leaf_plan(hierarchy).leaf_path_ids)
        depth = paddle.index_select(paths, leaf).reshape([B, -1, L]).transpose([0, 2, 1])
        return leaf.reshape([B, *spatial]), depth.reshape([B, L, *spatial])
