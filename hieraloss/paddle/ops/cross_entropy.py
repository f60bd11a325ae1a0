"""The cross-entropy over the classes of one depth, in paddle ops, and its routing."""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from ...hierarchy import Hierarchy
from .. import _bridge
from .._tables import place_of, tables_for, vec
from . import route
from .device import compute_dtype, empty_loss, no_pixel
from .labels import label_channels


def depth_cross_entropy_op(logits, label_channels, hierarchy, depth):
    """Mean cross-entropy over the classes at ``depth``; see :func:`depth_cross_entropy`."""
    if no_pixel(logits.shape):
        return empty_loss(logits, "mean")
    tab = tables_for(hierarchy, place_of(logits))
    plan = tab.plan
    B, N = logits.shape[:2]
    P = math.prod(logits.shape[2:])
    ct = compute_dtype(logits.dtype)
    classes = tab.get(("depth_channels", depth), lambda: plan.depth_channels[depth - 1])
    x = paddle.index_select(logits.reshape([B, N, P]), classes, axis=1).astype(ct)  # [B, C, P]
    lc = label_channels.reshape([B, P])
    safe = paddle.clip(lc, min=0).reshape([-1])
    target_ch = paddle.index_select(vec(tab, "anc_col", depth - 1), safe)
    label_depth = paddle.index_select(vec(tab, "depth"), safe)
    leaf = paddle.index_select(tab.get("is_leaf", lambda: plan.is_leaf), safe)
    known = (lc.reshape([-1]) >= 0) & (leaf | (label_depth >= depth))
    position = np.full(N, 0, dtype=np.int64)
    position[plan.depth_channels[depth - 1]] = np.arange(plan.depth_channels[depth - 1].size)
    target = paddle.index_select(tab.get(("position", depth), lambda: position), target_ch)
    logp = F.log_softmax(x, axis=1)  # [B, C, P]
    picked = paddle.take_along_axis(logp, target.reshape([B, 1, -1]), axis=1).reshape([-1])
    total = -paddle.where(known, picked, paddle.zeros([1], dtype=ct)).sum()
    return total / paddle.clip(known.astype("int64").sum(), min=1).astype(ct)


def depth_cross_entropy(x: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, depth: int, *,
                        ignore_index: int, backend: str, check_labels: bool) -> paddle.Tensor:
    """:func:`depth_cross_entropy_op` of node-id ``labels`` (checked at the door but for their values),
    or the fused Triton objective with only that depth's weight where :mod:`.route` picks it (there
    is no compiled CPU kernel for it alone: ``"native"`` runs the paddle op)."""
    lc, _ = label_channels(labels, hierarchy, ignore_index, check_labels)
    if route.use_triton(backend, x, hierarchy):
        ce_w = [0.0] * hierarchy.max_depth
        ce_w[depth - 1] = 1.0
        total, _ = _bridge.fused_objective(x, lc, hierarchy, gamma=0.0, tm_weight=0.0, ce_weights=ce_w,
                                           node_weight=None, tree_min=False)
        return total
    return depth_cross_entropy_op(x, lc, hierarchy, depth)
