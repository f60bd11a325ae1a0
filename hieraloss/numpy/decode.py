"""Hierarchy-consistent decoding (SPEC section 7) in numpy. Returns node ids.

* ``path``: ``argmax_l sum_{u in A(l)} x_u`` (exact MAP over root-to-leaf paths).
* ``hssn``: softmax over all N channels, leaf score ``p_l + sum of p over strict ancestors``.
* ``top_down``: argmax among depth-1 nodes, then among the chosen node's children, ...
* ``independent``: argmax per depth over ``Hierarchy.depth_channels`` (may be inconsistent).

Ties go to the lowest channel (among leaves for ``path``/``hssn``, among candidates otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.plan import plan_for
from ..core.rules import DECODE_METHODS as DECODE_METHODS  # the rule lives in hieraloss.core.rules
from ..hierarchy import Hierarchy
from .losses import check_logits, compute_dtype

__all__ = ["decode", "DECODE_METHODS"]


def _path_sums(scores: np.ndarray, h: Hierarchy) -> np.ndarray:
    """``out[:, v] = sum of scores over A(v)``, accumulated root-first, one depth at a time."""
    plan = plan_for(h)
    out = scores.copy()
    for lv, par in zip(plan.levels[1:], plan.level_parents[1:], strict=False):
        out[:, lv] = out[:, par] + scores[:, lv]
    return out


def _best_leaf(path_scores: np.ndarray, h: Hierarchy) -> np.ndarray:
    leaves = plan_for(h).leaf_channels_sorted
    return leaves[np.argmax(path_scores[:, leaves], axis=1)]


def _top_down(x: np.ndarray, h: Hierarchy) -> np.ndarray:
    top = plan_for(h).levels[0]  # ascending
    chosen = top[np.argmax(x[:, top], axis=1)]
    ctab = h.children_table
    for _ in range(h.max_depth - 1):
        cand = ctab[chosen]  # [B, *spatial, Cmax]; rows are padded with the node itself
        cand = np.moveaxis(cand, -1, 1)  # [B, Cmax, *spatial]
        vals = np.take_along_axis(x, cand, axis=1)
        vals = np.where(cand == chosen[:, None], -np.inf, vals)  # mask the padding
        step = np.take_along_axis(cand, np.argmax(vals, axis=1)[:, None], axis=1)[:, 0]
        chosen = np.where(h.is_leaf[chosen], chosen, step)  # a chosen leaf stops the descent
    return chosen


def decode(logits: Any, hierarchy: Hierarchy, method: str = "path") -> tuple[np.ndarray, np.ndarray]:
    """Decode ``logits [B, N, *spatial]`` to ``(leaf_labels [B, *spatial], depth_labels [B, L, *spatial])``.

    ``depth_labels[:, d-1]`` is the node id at depth d of the chosen leaf's path (a leaf shallower
    than d repeats); for ``independent`` it is the per-depth argmax and may not form a path.
    ``logic``: :func:`hieraloss.numpy.logic_refine` with its defaults (LogicSeg's rule descent),
    then ``path``.
    """
    x = check_logits(logits, hierarchy)
    if method not in DECODE_METHODS:
        raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")
    h = hierarchy
    if method == "logic":  # LogicSeg's logic-guided reasoning, then the exact path decoding
        from .logic import logic_refine

        x, method = logic_refine(x, h), "path"
    x = x.astype(compute_dtype(x.dtype))
    if method == "independent":
        per_depth = [dc[np.argmax(x[:, dc], axis=1)] for dc in h.depth_channels]
        depth_ch = np.stack(per_depth, axis=1)
        return h.node_ids[per_depth[-1]], h.node_ids[depth_ch]
    if method == "path":
        leaf = _best_leaf(_path_sums(x, h), h)
    elif method == "hssn":
        shifted = x - x.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        leaf = _best_leaf(_path_sums(p, h), h)
    else:
        leaf = _top_down(x, h)
    depth_ch = np.moveaxis(h.ancestor_table[leaf], -1, 1)
    return h.node_ids[leaf], h.node_ids[depth_ch]
