"""Hierarchical objectives on a flat model's leaf logits (Bertinetto et al., "Making Better
Mistakes", CVPR 2020), in numpy (forward only): the reference for the torch and paddle backends.

Leaf logits are ``[B, K, *spatial]`` in leaf-id order (K = ``hierarchy.num_leaves``); labels are
node ids as everywhere else (leaf ids, internal ids = partial labels, ``ignore_index``). The
softmax over leaves defines a probability for every node, ``p(v) = sum of the leaf
probabilities under v`` (``p(root) = 1``); in log space ``log p(v) = LSE(v) - LSE(root)`` with
``LSE(v)`` the log-sum-exp of the leaf logits under v, computed bottom-up one depth at a time
(``np.logaddexp`` of the children, one child rank at a time), so nothing underflows.

* :func:`hierarchical_cross_entropy` (HXE):
  ``-sum over the edges (parent(C), C) of the label's path of w(C) log p(C | parent(C))`` with
  ``w(C) = exp(-alpha * depth(C))`` as published (``weighting="height"``: ``exp(-alpha *
  height(C))``, ``Hierarchy.height`` 0 for a leaf). ``alpha = 0`` is the
  flat cross-entropy ``LSE(root) - x_label``. A partial label c takes the edges from the root
  down to c: ``alpha = 0`` then gives ``-log p(c)``.
* :func:`soft_label_cross_entropy`: cross-entropy against the target distribution over leaves
  ``q(l) = softmax_l(-beta * psi(c, l))`` (``Hierarchy.node_leaf_distance``; for a leaf label c
  this is ``Hierarchy.leaf_distance``), i.e. ``LSE(root) - sum_l q(l) x_l``. Large beta tends to
  the flat cross-entropy. A partial label c uses the same formula with distances measured from
  the node c, so the target favours the leaves under c, nearest first (uniform over them in a
  balanced subtree as beta grows).
* :func:`decode_leaf_logits`: ``"argmax"`` (leaf argmax, ties to the lowest leaf id, and its path)
  or ``"top_down"`` (at each depth the child of the chosen node with the largest summed leaf
  probability, compared through ``LSE``; a chosen leaf stops).

The framework-free rules live in the core and every backend imports them from there: the argument
checks and their messages in :mod:`hieraloss.core.checks`, the reductions and decoders in
:mod:`hieraloss.core.rules`, the bottom-up plan, the HXE coefficients and the soft targets in
:mod:`hieraloss.core.leaf`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core import checks as _checks
from ..core.checks import (
    check_hierarchy,
    check_leaf_decode_method,
    check_leaf_logits,
    check_leaf_reduction,
    check_nonnegative,
)
from ..core.leaf import check_hxe_weighting, hxe_coefficients, leaf_plan, soft_targets
from ..core.rules import LEAF_DECODE_METHODS as LEAF_DECODE_METHODS  # public: hieraloss.numpy.LEAF_*
from ..core.rules import LEAF_REDUCTIONS as LEAF_REDUCTIONS
from ..hierarchy import Hierarchy
from .decode import decode as _decode_nodes
from .losses import check_finite_values, check_label_dtype, compute_dtype

__all__ = [
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]


# ---------------------------------------------------------------------------- numpy ops
def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return np.squeeze(m, axis) + np.log(np.exp(x - m).sum(axis=axis))


def node_log_sum_exp(x: np.ndarray, h: Hierarchy) -> np.ndarray:
    """``[B, N, P]`` (channel order): ``LSE(v)`` of the leaf logits ``x [B, K, P]`` under each node."""
    plan = leaf_plan(h)
    lse = np.empty((x.shape[0], h.num_nodes, x.shape[2]), dtype=x.dtype)
    lse[:, plan.leaf_channels] = x
    for nodes, ranks in plan.steps:
        acc = lse[:, ranks[0][1]]
        for count, kids in ranks[1:]:
            acc[:, :count] = np.logaddexp(acc[:, :count], lse[:, kids])
        lse[:, nodes] = acc
    return lse


def _reduce(loss: np.ndarray, valid: np.ndarray, reduction: str, cdt: np.dtype) -> np.ndarray:
    loss = np.where(valid, loss, cdt.type(0))
    if reduction == "none":
        return loss
    total = loss.sum(dtype=cdt)
    if reduction == "sum":
        return cdt.type(total)
    count = np.count_nonzero(valid)
    return cdt.type(total / cdt.type(count)) if count else cdt.type(0)


def _checked_logits(leaf_logits: Any, hierarchy: Hierarchy) -> np.ndarray:
    check_hierarchy(hierarchy)
    x = np.asarray(leaf_logits)
    check_leaf_logits(x.shape, x.dtype.name, hierarchy)
    return x


def _checked_labels(labels: Any, x: np.ndarray, hierarchy: Hierarchy, ignore_index: Any, check_finite: bool
                    ) -> np.ndarray:
    """Label channels after the label checks, in the door order of the tree-min losses (dtype,
    shape, ``ignore_index``, then ``check_finite`` on the logits, then the label values)."""
    lab = check_label_dtype(labels)
    _checks.check_label_shape(lab.shape, (x.shape[0], *x.shape[2:]))
    ignore_index = _checks.check_ignore_index(hierarchy, ignore_index)
    if check_finite:
        check_finite_values(x, "leaf_logits")
    return hierarchy.label_channels(lab, ignore_index)


def _flat(x: np.ndarray, ch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    cdt = compute_dtype(x.dtype)
    B, K = x.shape[:2]
    P = math.prod(x.shape[2:])
    return x.astype(cdt).reshape(B, K, P), ch.reshape(B, P), cdt


def hierarchical_cross_entropy(
    leaf_logits: Any,
    labels: Any,
    hierarchy: Hierarchy,
    *,
    alpha: float = 0.1,
    ignore_index: int = 255,
    reduction: str = "mean",
    weighting: str = "depth",
    normalize: bool = False,
    check_finite: bool = False,
) -> np.ndarray:
    """Hierarchical cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    ``-sum over the edges of the label's path of w(C) * log p(C | parent(C))``, with the published
    ``w(C) = exp(-alpha * depth(C))`` (``weighting="depth"``, a top-level node has depth 1; ``"height"``:
    ``exp(-alpha * height(C))``; ``normalize=True`` divides by the sum over all nodes, as the released
    code: :func:`hieraloss.core.leaf.hxe_edge_weights`),
    p from the softmax over leaves (``p(C)`` = sum of the leaf probabilities under C). A partial
    label (internal node c) takes the edges from the root down to c. ``alpha = 0`` is the flat
    cross-entropy. ``reduction``: ``"mean"`` over counted (not ignored) pixels, ``"sum"`` or
    ``"none"`` (``[B, *spatial]``, 0 where ignored). float64 logits give float64, others float32.
    ``check_finite=True`` raises a ``ValueError`` saying how many logits are not finite.
    """
    x = _checked_logits(leaf_logits, hierarchy)
    a = check_nonnegative(alpha, "alpha")
    check_hxe_weighting(weighting, normalize)
    check_leaf_reduction(reduction)
    ch = _checked_labels(labels, x, hierarchy, ignore_index, check_finite)
    xf, lc, cdt = _flat(x, ch)
    h = hierarchy
    valid = lc >= 0
    safe = np.where(valid, lc, 0)
    lse = node_log_sum_exp(xf, h)  # [B, N, P]
    root = _logsumexp(xf, axis=1)  # [B, P]
    coef = hxe_coefficients(h, a, weighting, bool(normalize)).astype(cdt)[safe]  # [B, P, L+1]
    on_path = np.take_along_axis(lse, np.moveaxis(h.ancestor_table[safe], -1, 1), axis=1)  # [B, L, P]
    loss = coef[..., 0] * root + (np.moveaxis(coef[..., 1:], -1, 1) * on_path).sum(axis=1)
    out = _reduce(loss, valid, reduction, cdt)
    return out.reshape(ch.shape) if reduction == "none" else out


def soft_label_cross_entropy(
    leaf_logits: Any,
    labels: Any,
    hierarchy: Hierarchy,
    *,
    beta: float = 1.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    check_finite: bool = False,
) -> np.ndarray:
    """Soft-label cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    Target over leaves ``q(l) = softmax_l(-beta * psi(c, l))`` for a pixel labelled c (psi =
    ``Hierarchy.node_leaf_distance``, edges through the lowest common ancestor). The paper uses the
    height of the lowest common ancestor over the tree height instead of psi: on a balanced tree of
    depth L, psi is twice that height, so its ``beta_paper`` is ``beta = beta_paper / (2 * L)`` here.
    Loss ``-sum_l q(l) log p(l)``. A partial label c measures the distances from the node c. Large beta tends to the
    flat cross-entropy. Reductions, dtypes and ``check_finite`` as :func:`hierarchical_cross_entropy`.
    """
    x = _checked_logits(leaf_logits, hierarchy)
    b = check_nonnegative(beta, "beta")
    check_leaf_reduction(reduction)
    ch = _checked_labels(labels, x, hierarchy, ignore_index, check_finite)
    xf, lc, cdt = _flat(x, ch)
    valid = lc >= 0
    safe = np.where(valid, lc, 0)
    q = np.moveaxis(soft_targets(hierarchy, b).astype(cdt)[safe], -1, 1)  # [B, K, P]
    loss = _logsumexp(xf, axis=1) - (q * xf).sum(axis=1)
    out = _reduce(loss, valid, reduction, cdt)
    return out.reshape(ch.shape) if reduction == "none" else out


def decode_leaf_logits(leaf_logits: Any, hierarchy: Hierarchy, method: str = "argmax"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``leaf_logits [B, K, *spatial]`` to ``(leaf_ids [B, *spatial], depth_labels [B, L,
    *spatial])`` (int64 node ids; ``depth_labels[:, d-1]`` is the node at depth d of the chosen
    leaf's path, a shallow leaf repeating).

    ``"argmax"``: the leaf argmax (ties: lowest leaf id). ``"top_down"``: among the depth-1 nodes,
    then among the children of the chosen node, ..., the node with the largest summed leaf
    probability (compared as ``LSE``, the log of that sum up to a constant; ties: lowest channel);
    a chosen leaf stops the descent.
    """
    x = _checked_logits(leaf_logits, hierarchy)
    check_leaf_decode_method(method)
    h = hierarchy
    B, K = x.shape[:2]
    spatial = x.shape[2:]
    xf = x.astype(compute_dtype(x.dtype)).reshape(B, K, math.prod(spatial))
    if method == "top_down" and xf.size:
        lse = node_log_sum_exp(xf, h).reshape(B, h.num_nodes, *spatial)
        return _decode_nodes(lse, h, "top_down")
    leaf = np.argmax(xf, axis=1)  # first maximum: lowest leaf id
    depth = np.moveaxis(leaf_plan(h).leaf_path_ids[leaf], -1, 1)
    return leaf.reshape(B, *spatial).astype(np.int64), depth.reshape(B, h.max_depth, *spatial)
