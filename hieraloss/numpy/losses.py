"""Tree-min and focal tree-min losses in numpy (forward only): the reference for every backend.

With ``zmin_v = min over A(v) of x`` and ``zmax_v = max over D(v) of x`` (SPEC section 4)::

    l_v = y_v * softplus(-zmin_v) + (1 - y_v) * softplus(zmax_v)
    focal: positives times sigmoid(-zmin_v)^gamma, negatives times sigmoid(zmax_v)^gamma

``zmin`` is swept top-down and ``zmax`` bottom-up one depth at a time, so the work is O(N) per
pixel and no ``[B, N, N, ...]`` or ``[B, N, Dmax, ...]`` array is ever built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import checks as _checks
from ..core.checks import check_hierarchy
from ..core.plan import Plan, plan_for
from ..core.rules import HSSN_SCALE
from ..core.rules import REDUCTIONS as REDUCTIONS  # public: hieraloss.numpy.REDUCTIONS
from ..hierarchy import Hierarchy

__all__ = ["tree_min_loss", "focal_tree_min_loss", "expand_targets"]

NUMPY_DTYPES = ("float16", "float32", "float64")  # numpy has no bfloat16


# ---------------------------------------------------------------------------- validation
def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 is computed in float64; float32 and float16 in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def check_logits(logits: Any, hierarchy: Hierarchy, name: str = "logits") -> np.ndarray:
    x = np.asarray(logits)
    _checks.check_logits(x.shape, _checks.dtype_name(x.dtype), hierarchy, name, dtypes=NUMPY_DTYPES)
    return x


def check_finite_values(x: np.ndarray, name: str = "logits") -> None:
    _checks.check_finite_count(int(x.size - np.count_nonzero(np.isfinite(x))), name)


def check_label_dtype(labels: Any) -> np.ndarray:
    """The labels as an array of an integer dtype (not bool), else the shared :class:`LabelError`."""
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):  # bool is not an integer dtype in numpy
        raise _checks.label_dtype_error(_checks.dtype_name(lab.dtype))
    return lab


def check_labels(
    labels: Any, expected_shape: tuple[int, ...], hierarchy: Hierarchy, ignore_index: int
) -> np.ndarray:
    """Label channels (-1 = ignored) after checking dtype, shape, ``ignore_index`` and values."""
    lab = check_label_dtype(labels)
    _checks.check_label_shape(lab.shape, expected_shape)
    ignore_index = _checks.check_ignore_index(hierarchy, ignore_index)
    return hierarchy.label_channels(lab, ignore_index)


def check_reduction(reduction: Any) -> None:
    _checks.check_reduction(reduction)


def check_node_weight(node_weight: Any, hierarchy: Hierarchy) -> np.ndarray | None:
    if node_weight is None:
        return None
    w = np.asarray(node_weight)
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise _checks.node_weight_dtype_error(_checks.dtype_name(w.dtype))
    _checks.check_node_weight_shape(w.shape, hierarchy)
    return w


def zmin_zmax(x: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """``zmin_v = min(x_v, zmin_parent)`` top-down and ``zmax_v = max(x_v, zmax_children)`` bottom-up
    (``plan.level_child_ranks``: within a rank the parents are distinct, and the ranks in order keep
    "the earlier child wins a tie")."""
    zmin = x.copy()
    for lv, par in zip(plan.levels[1:], plan.level_parents[1:], strict=False):
        zmin[:, lv] = np.minimum(x[:, lv], zmin[:, par])
    zmax = x.copy()
    for ranks in reversed(plan.level_child_ranks):
        for kids, par in ranks:
            zmax[:, par] = np.maximum(zmax[:, par], zmax[:, kids])
    return zmin, zmax


def targets_and_mask(ch: np.ndarray, h: Hierarchy) -> tuple[np.ndarray, np.ndarray]:
    """Positive and loss-mask maps `[B, N, *spatial]` from label channels `[B, *spatial]` (-1 ignored)."""
    valid = ch >= 0
    safe = np.where(valid, ch, 0)[:, None]
    expand = (1, -1) + (1,) * (ch.ndim - 1)
    v = np.arange(h.num_nodes).reshape(expand)
    positive = h.ancestor_table[safe, (h.depth - 1).reshape(expand)] == v
    # A partial label at c leaves c's strict descendants unknown (is_ancestor[c, v]: v in D(c)).
    unknown = h.is_ancestor[safe, v] & (v != safe)
    mask = valid[:, None] & ~unknown
    return positive & mask, mask


# ---------------------------------------------------------------------------- the op
def _tree_min_op(
    x: np.ndarray, ch: np.ndarray, h: Hierarchy, gamma: float, reduction: str, node_weight: np.ndarray | None
) -> np.ndarray:
    cdt = compute_dtype(x.dtype)
    x = x.astype(cdt)  # a copy: the caller's array is never touched
    zmin, zmax = zmin_zmax(x, plan_for(h))
    positive, mask = targets_and_mask(ch, h)
    z = np.where(positive, -zmin, zmax)
    del zmin, zmax
    loss = np.logaddexp(cdt.type(0), z)  # softplus(-zmin) on positives, softplus(zmax) on negatives
    if gamma != 0:
        # (1 - sigmoid(zmin))^g = sigmoid(-zmin)^g and sigmoid(zmax)^g, both exp(-g * softplus(-z)).
        loss *= np.exp(cdt.type(-gamma) * np.logaddexp(cdt.type(0), -z))
    if node_weight is not None:
        loss *= node_weight.astype(cdt).reshape((1, -1) + (1,) * (x.ndim - 2))
    loss = np.where(mask, loss, cdt.type(0))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return cdt.type(loss.sum(dtype=cdt))
    if reduction == "mean":
        count = np.count_nonzero(mask)
        return cdt.type(loss.sum(dtype=cdt) / count) if count else cdt.type(0)
    total = cdt.type(0)
    for lv in plan_for(h).levels:
        count = np.count_nonzero(mask[:, lv])
        if count:
            total += loss[:, lv].sum(dtype=cdt) / cdt.type(count)
    return cdt.type(HSSN_SCALE * total)


def _validated(logits, labels, hierarchy, ignore_index, reduction, node_weight, check_finite):
    """The checks in the order every backend makes them: logits, reduction, labels (dtype, shape),
    ``ignore_index``, ``node_weight``, finiteness, then the label values."""
    x = check_logits(logits, hierarchy)
    check_reduction(reduction)
    lab = check_label_dtype(labels)
    _checks.check_label_shape(lab.shape, (x.shape[0], *x.shape[2:]))
    ignore_index = _checks.check_ignore_index(hierarchy, ignore_index)
    w = check_node_weight(node_weight, hierarchy)
    if check_finite:
        check_finite_values(x)
    return x, hierarchy.label_channels(lab, ignore_index), w


def tree_min_loss(
    logits: Any,
    labels: Any,
    hierarchy: Hierarchy,
    *,
    ignore_index: int = 255,
    reduction: str = "mean",
    node_weight: Any = None,
    check_finite: bool = False,
) -> np.ndarray:
    """Tree-min loss (SPEC section 4) of ``logits [B, N, *spatial]`` for node-id ``labels [B, *spatial]``.

    ``l_v = y_v softplus(-min_{A(v)} x) + (1 - y_v) softplus(max_{D(v)} x)``, times ``node_weight[v]``.
    ``reduction``: ``"mean"`` (over unmasked (pixel, node) entries), ``"sum"``, ``"none"`` (the
    ``[B, N, *spatial]`` map, 0 where masked) or ``"hssn"`` (per-depth means summed, times 5).
    Computed in float64 for float64 logits, else float32; returned in that dtype.
    """
    x, ch, w = _validated(logits, labels, hierarchy, ignore_index, reduction, node_weight, check_finite)
    return _tree_min_op(x, ch, hierarchy, 0.0, reduction, w)


def focal_tree_min_loss(
    logits: Any,
    labels: Any,
    hierarchy: Hierarchy,
    *,
    gamma: float = 2.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    node_weight: Any = None,
    check_finite: bool = False,
) -> np.ndarray:
    """Focal tree-min loss (SPEC section 5): the tree-min terms times ``(1 - sigmoid(zmin))^gamma``
    on positives and ``sigmoid(zmax)^gamma`` on negatives; ``gamma=0`` is :func:`tree_min_loss`."""
    gamma = _checks.check_gamma(gamma)
    x, ch, w = _validated(logits, labels, hierarchy, ignore_index, reduction, node_weight, check_finite)
    return _tree_min_op(x, ch, hierarchy, gamma, reduction, w)


def expand_targets(
    labels: Any, hierarchy: Hierarchy, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """``(targets uint8, mask bool)``, both ``[B, N, *spatial]``: :meth:`Hierarchy.expand_targets`."""
    check_hierarchy(hierarchy)
    lab = check_label_dtype(labels)
    _checks.check_label_batch(lab.ndim)
    return hierarchy.expand_targets(lab, _checks.check_ignore_index(hierarchy, ignore_index))
