"""The framework-free tables of the leaf losses (HXE, soft labels; numpy only, imports no backend).

Leaf logits ``[B, K, *spatial]`` define a probability for every node, ``p(v)`` = the sum of the
leaf probabilities under v; ``log p(v) = LSE(v) - LSE(root)`` with ``LSE(v)`` built bottom-up one
depth at a time (:class:`LeafPlan`, from the hierarchy's :func:`~hieraloss.core.plan.plan_for`).
:func:`hxe_coefficients` and :func:`soft_targets` turn ``alpha`` and ``beta`` into per-label tables.
Every backend (the numpy reference, torch, paddle) reads these; the numpy backend re-exports them
from :mod:`hieraloss.numpy.leaf_losses` under the same names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from ..hierarchy import Hierarchy
from .plan import plan_for

__all__ = ["LeafPlan", "leaf_plan", "hxe_edge_weights", "hxe_coefficients", "soft_targets", "HXE_WEIGHTINGS",
           "check_hxe_weighting"]

# How the hierarchical cross-entropy weighs the edges of a path (see hxe_edge_weights).
HXE_WEIGHTINGS = ("depth", "height")


def check_hxe_weighting(weighting: Any, normalize: Any = False) -> None:
    """``weighting`` one of :data:`HXE_WEIGHTINGS`, ``normalize`` a bool (one message everywhere)."""
    if weighting not in HXE_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {HXE_WEIGHTINGS} ('depth': the published exp(-alpha * depth), "
                         f"'height': exp(-alpha * height)), got {weighting!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")


class LeafPlan:
    """How to build ``LSE(v)`` for every node from the leaf logits, one depth at a time.

    Values live in a channel-indexed array ``lse [B, N, P]``: the leaf channels (``leaf_channels``,
    in leaf-id order) take the leaf logits, then each step fills the internal nodes of one depth,
    deepest first. ``steps``: one ``(nodes, ranks)`` per depth with internal nodes, ``nodes`` their
    channels sorted by decreasing number of children (ties by channel) and ``ranks`` a list over
    r of ``(count, children)``: the first ``count`` nodes have an r-th child (channel order), the
    channels ``children``. So ``acc = lse[children_0]`` and ``acc[:count] = logaddexp(acc[:count],
    lse[children_r])`` for r >= 1, then ``lse[nodes] = acc``. ``leaf_path_ids``: ``[K, L]`` node id
    at every depth of leaf k's path (a shallow leaf repeats). ``common_depth``: ``[N, K]`` (rows by
    channel, columns by leaf id) the number of nodes the paths of node c and leaf k share, i.e.
    the depth of their lowest common ancestor (0 = only the root): leaf k is under the first
    ``common_depth[c, k]`` nodes of c's path (the torch and paddle losses bucket leaves by it).
    """

    def __init__(self, h: Hierarchy):
        plan = plan_for(h)  # the tree's tables (channels per depth, children in channel order)
        self.leaf_channels = h.leaf_channels.astype(np.int64)
        self.steps: list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]] = []
        for d in range(h.max_depth - 1, 0, -1):
            at = plan.levels[d - 1][~plan.is_leaf[plan.levels[d - 1]]]
            if at.size == 0:
                continue
            nkids = plan.num_children[at]
            nodes = at[np.lexsort((at, -nkids))]
            ranks = []
            for r in range(int(nkids.max())):
                kids = [int(plan.children[v][r]) for v in nodes if plan.num_children[v] > r]
                ranks.append((len(kids), np.array(kids, dtype=np.int64)))
            self.steps.append((nodes.astype(np.int64), ranks))
        self.leaf_path_ids = h.node_ids[h.leaf_paths].astype(np.int64)
        leaf_depth = h.depth[h.leaf_channels]
        self.common_depth = (h.depth[:, None] + leaf_depth[None, :] - h.node_leaf_distance) // 2


@lru_cache(maxsize=64)
def leaf_plan(h: Hierarchy) -> LeafPlan:
    return LeafPlan(h)


def hxe_edge_weights(h: Hierarchy, alpha: float, weighting: str = "depth", normalize: bool = False) -> np.ndarray:
    """``[N]`` float64, by channel: the weight ``w(C)`` of the edge from ``parent(C)`` into node C
    in the hierarchical cross-entropy.

    * ``weighting="depth"`` (Bertinetto et al.'s released code, ``trees.get_exponential_weighting``,
      which every published HXE result used): ``w(C) = exp(-alpha * depth(C))``, depth counted from
      the root (a top-level node has depth 1), so ``alpha > 0`` weighs the edges near the root most;
    * ``weighting="height"``: ``w(C) = exp(-alpha * height(C))``, height above the deepest leaf
      below C (0 for a leaf), so ``alpha > 0`` weighs the edges near the leaves most.

    ``normalize=True`` divides every weight by the sum of the weights of all nodes of the tree,
    the root included (its weight, ``exp(0) = 1`` under ``"depth"``, is never used by the loss), as
    the released code does: the loss, and so the effective learning rate, shrinks by that sum.
    """
    check_hxe_weighting(weighting)
    level = h.depth if weighting == "depth" else h.height
    w = np.exp(-float(alpha) * level.astype(np.float64))
    if normalize:
        root_level = 0 if weighting == "depth" else int(h.height.max()) + 1
        w = w / (w.sum() + math.exp(-float(alpha) * root_level))
    return w


def coefficients_from_path_weights(path_weights: Any, concatenate: Callable) -> Any:
    """``[N, L+1]`` HXE coefficients from ``path_weights [N, L]``, the weight ``w_{d+1}`` of the
    d-th node of each path and 0 past its end: ``coef[:, d] = W[:, d] - W[:, d-1]`` (``W[:, -1] =
    W[:, L] = 0``), which is ``w_1``, ``w_{d+1} - w_d``, ``-w_D`` and then 0, as
    :func:`hxe_coefficients` states. Written over ``concatenate`` (``np.concatenate``,
    ``torch.cat``) so the torch backend can build the table inside a graph for a symbolic ``alpha``."""
    zero = path_weights[:, :1] * 0
    return concatenate([path_weights, zero], 1) - concatenate([zero, path_weights], 1)


@lru_cache(maxsize=64)
def hxe_coefficients(h: Hierarchy, alpha: float, weighting: str = "depth", normalize: bool = False) -> np.ndarray:
    """``[N, L+1]`` float64: the hierarchical cross-entropy of a pixel labelled with channel c is
    ``coef[c, 0] * LSE(root) + sum_{d=1..L} coef[c, d] * LSE(ancestor_table[c, d-1])``.

    With ``C_1..C_D`` the path of c (D = depth(c)) and ``w_d`` the weight of the edge into ``C_d``
    (:func:`hxe_edge_weights`), the loss ``sum_d w_d (LSE(C_{d-1}) - LSE(C_d))`` (``C_0`` = root)
    regrouped per node: ``coef[c, 0] = w_1``, ``coef[c, d] = w_{d+1} - w_d`` for d < D,
    ``coef[c, D] = -w_D`` and 0 beyond. With ``alpha = 0`` and no normalisation the middle
    coefficients are exact zeros, so the value is exactly ``LSE(root) - LSE(c)``."""
    w = hxe_edge_weights(h, alpha, weighting, normalize)[h.ancestor_table]  # [N, L]: w of the path nodes
    coef = coefficients_from_path_weights(np.where(plan_for(h).path_real, w, 0.0), np.concatenate)
    coef.setflags(write=False)
    return coef


@lru_cache(maxsize=64)
def soft_targets(h: Hierarchy, beta: float) -> np.ndarray:
    """``[N, K]`` float64: row c is the target distribution over leaves (leaf-id order) of a pixel
    labelled with channel c, ``softmax_l(-beta * node_leaf_distance[c, l])``."""
    z = -beta * h.node_leaf_distance.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    q = np.exp(z)
    q /= q.sum(axis=1, keepdims=True)
    q.setflags(write=False)
    return q
