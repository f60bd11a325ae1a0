"""The decoders and the path scores in paddle ops, and the routing of decoding."""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from ...core.objective import LOGIC_STEP_SIZE, LOGIC_STEPS
from ...hierarchy import Hierarchy
from .. import _bridge
from .._tables import col, place_of, tables_for, vec
from . import route
from .device import argmax_nan_first, compute_dtype, no_pixel
from .logicseg import refine


def _path_scores(scores, tab):
    """``[B, K, P]``: sum of ``scores`` along each leaf's path, root first (leaves by channel)."""
    plan = tab.plan
    out = paddle.index_select(scores, vec(tab, "leaf_cols", 0), axis=1)
    zero = paddle.zeros([1], dtype=scores.dtype)
    for d in range(1, plan.max_depth):
        part = paddle.index_select(scores, vec(tab, "leaf_cols", d), axis=1)
        if plan.leaf_on[d].all():
            out = out + part
        else:
            out = out + paddle.where(col(tab, "leaf_on", d), part, zero)
    return out


def _top_down(x, tab):
    plan = tab.plan
    top = vec(tab, "levels", 0)
    chosen = paddle.index_select(
        top, argmax_nan_first(paddle.index_select(x, top, axis=1), axis=1).reshape([-1])
    )
    B, P = x.shape[0], x.shape[2]
    chosen = chosen.reshape([B, P])
    ctab = tab.get("children_table", lambda: plan.children_table)
    nkids = tab.get("num_children", lambda: plan.num_children)
    cmax = plan.children_table.shape[1]
    slots = tab.get("slot_range", lambda: np.arange(cmax).reshape(1, -1, 1))
    leaf = tab.get("is_leaf", lambda: plan.is_leaf)
    neg_inf = paddle.full([1], -math.inf, dtype=x.dtype)
    for _ in range(plan.max_depth - 1):
        flat = chosen.reshape([-1])
        cand = paddle.index_select(ctab, flat).reshape([B, P, cmax]).transpose([0, 2, 1])  # [B, Cmax, P]
        vals = paddle.take_along_axis(x, cand, axis=1)
        real = slots < paddle.index_select(nkids, flat).reshape([B, 1, P])
        vals = paddle.where(real, vals, neg_inf)
        step = paddle.take_along_axis(cand, argmax_nan_first(vals, axis=1, keepdim=True), axis=1).squeeze(1)
        chosen = paddle.where(paddle.index_select(leaf, flat).reshape([B, P]), chosen, step)
    return chosen


def decode_op(logits, hierarchy, method):
    """``(leaf node ids [B, *spatial], depth node ids [B, L, *spatial])`` (int64)."""
    tab = tables_for(hierarchy, place_of(logits))
    plan = tab.plan
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    L = plan.max_depth
    if no_pixel(logits.shape):  # no pixel: empty maps of the right shapes
        return paddle.zeros([B, *spatial], dtype="int64"), paddle.zeros([B, L, *spatial], dtype="int64")
    node_ids = vec(tab, "node_ids")
    with paddle.no_grad():
        x = logits.detach().reshape([B, N, math.prod(spatial)]).astype(compute_dtype(logits.dtype))
        P = x.shape[2]
        if method == "independent":
            per_depth = []
            for d in range(L):
                dc = vec(tab, "depth_channels", d)
                best = argmax_nan_first(paddle.index_select(x, dc, axis=1), axis=1)
                per_depth.append(paddle.index_select(dc, best.reshape([-1])).reshape([B, P]))
            depth_ch = paddle.stack(per_depth, axis=1)
            leaf = per_depth[-1]
        else:
            if method == "top_down":
                leaf = _top_down(x, tab)
            else:
                scores = x if method == "path" else F.softmax(x, axis=1)
                best = argmax_nan_first(_path_scores(scores, tab), axis=1)  # first max = lowest leaf channel
                leaf = paddle.index_select(vec(tab, "leaf_sorted"), best.reshape([-1])).reshape([B, P])
            depth_ch = (
                paddle.index_select(vec(tab, "ancestor_table"), leaf.reshape([-1]))
                .reshape([B, P, L])
                .transpose([0, 2, 1])
            )
        leaf_ids = paddle.index_select(node_ids, leaf.reshape([-1])).reshape([B, *spatial])
        depth_ids = paddle.index_select(node_ids, depth_ch.reshape([-1])).reshape([B, L, *spatial])
    return leaf_ids, depth_ids



def path_scores_op(logits, hierarchy):
    """Leaf scores ``[B, K, *spatial]`` in leaf-id order: the sum of ``logits`` along each leaf's path
    (root first, in the compute dtype; differentiable). Their argmax over axis 1 is the leaf that
    ``decode_op(logits, hierarchy, "path")`` picks (as a position in leaf-id order)."""
    tab = tables_for(hierarchy, place_of(logits))
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    x = logits.astype(compute_dtype(logits.dtype))
    if no_pixel(logits.shape):  # no pixel: the empty map, still connected to the logits
        return paddle.index_select(x, vec(tab, "leaf_sorted"), axis=1)
    scores = _path_scores(x.reshape([B, N, math.prod(spatial)]), tab)  # leaves by channel
    order = tab.plan.leaf_id_order
    if not np.array_equal(order, np.arange(order.size)):
        scores = paddle.index_select(scores, vec(tab, "leaf_id_order"), axis=1)
    return scores.reshape([B, hierarchy.num_leaves, *spatial])


def decode(x: paddle.Tensor, hierarchy: Hierarchy, method: str, backend: str) -> tuple[paddle.Tensor, paddle.Tensor]:
    """:func:`decode_op`, or the fused Triton decoder for ``"path"`` and ``"top_down"`` where
    :mod:`.route` picks it; ``"logic"`` refines the logits by LogicSeg's rule descent (its defaults)
    first and then decodes by ``"path"``. Decoding has no compiled CPU kernel."""
    if method == "logic":
        x, method = refine(x, hierarchy, LOGIC_STEPS, LOGIC_STEP_SIZE, 5.0, "siblings"), "path"
    if method in ("path", "top_down") and route.use_triton(backend, x, hierarchy, "decode"):
        return _bridge.fused_decode(x.detach(), hierarchy, method)
    return decode_op(x, hierarchy, method)
