"""Per-place paddle copies of a hierarchy's index tables (the paddle twin of :mod:`hieraloss.torch._tables`).

:class:`Plan` holds the numpy index arrays of the depth-block sweeps (built once per hierarchy,
cached by fingerprint); :class:`PlaceTables` converts them lazily to paddle tensors on one place
(cached by fingerprint and place, :func:`tables_for`). :func:`col` and :func:`vec` read one table
as a broadcastable column or as a flat index vector. Imports no other module of the backend.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import paddle

from ..hierarchy import Hierarchy
from ..numpy.losses import counted_entries_per_depth

__all__ = ["Plan", "PlaceTables", "tables_for", "col", "vec"]


class Plan:
    """Numpy index arrays for depth-block sweeps over one hierarchy (built once per hierarchy).

    Block d (0-based) holds ``levels[d]``, the channels at depth d+1 in ascending order.
    ``parent_pos[d]``: position of each block-d node's parent in block d-1. ``slot[d]``: rank of
    each block-d node among its parent's children (channel order). ``child_ranks[d]``: list over
    rank r of ``(positions in block d+1 of the r-th child of each block-d node, valid mask)``,
    the mask False (and the position 0) where a node has fewer than r+1 children.
    """

    def __init__(self, h: Hierarchy):
        L = h.max_depth
        self.num_nodes, self.num_leaves, self.max_depth = h.num_nodes, h.num_leaves, L
        self.levels = [np.flatnonzero(h.depth == d) for d in range(1, L + 1)]
        pos = np.empty(h.num_nodes, dtype=np.int64)
        for lv in self.levels:
            pos[lv] = np.arange(lv.size)
        self.order = np.concatenate(self.levels)
        self.inverse = np.argsort(self.order)
        # If every depth is a contiguous channel range, concatenating the blocks in this order is
        # already channel order (balanced trees in the default or coarse-to-fine layout).
        by_start = sorted(range(L), key=lambda d: int(self.levels[d][0]))
        contiguous = np.array_equal(
            np.concatenate([self.levels[d] for d in by_start]), np.arange(h.num_nodes)
        )
        self.block_order = by_start if contiguous else None
        self.parent_pos = [None] + [pos[h.parent[lv]] for lv in self.levels[1:]]
        self.slot = [None] + [
            np.array([int(np.searchsorted(h.children[h.parent[v]], v)) for v in lv], dtype=np.int32)
            for lv in self.levels[1:]
        ]
        self.child_ranks: list[list[tuple[np.ndarray, np.ndarray | None]]] = []
        for lv in self.levels:
            kids = [h.children[v] for v in lv]
            ranks = []
            for r in range(max((len(k) for k in kids), default=0)):
                valid = np.array([len(k) > r for k in kids])
                index = np.array([pos[k[r]] if len(k) > r else 0 for k in kids], dtype=np.int64)
                ranks.append((index, None if valid.all() else valid))
            self.child_ranks.append(ranks)
        # child_slices[d]: per block-d node, the (start, stop) positions of its children in block d+1
        # when each node's children are consecutive there (any channel-contiguous layout), else None.
        self.child_slices: list[list[tuple[int, int]] | None] = []
        for d, lv in enumerate(self.levels):
            spans = []
            for v in lv:
                at = pos[h.children[v]] if len(h.children[v]) else np.empty(0, dtype=np.int64)
                start = int(at[0]) if at.size else 0
                spans.append((start, start + at.size) if np.array_equal(at, start + np.arange(at.size)) else None)
            self.child_slices.append(None if d == L - 1 or None in spans else spans)
        # anc_col[d][c]: channel of label channel c's ancestor at depth d+1 (c itself if shallower).
        self.anc_col = [np.ascontiguousarray(h.ancestor_table[:, d]) for d in range(L)]
        # anc_at[d][e]: ancestor at depth e+1 (e < d) of each block-d node (partial-label masks).
        self.anc_at = [[h.ancestor_table[lv, e] for e in range(d)] for d, lv in enumerate(self.levels)]
        self.depth = h.depth.astype(np.int64)
        self.channel_of = h.channel_of.astype(np.int64)
        self.node_ids = h.node_ids.astype(np.int64)
        self.is_leaf = h.is_leaf
        self.ancestor_table = h.ancestor_table.astype(np.int64)
        self.leaf_sorted = np.sort(h.leaf_channels)
        # leaf_id_order[k]: position in leaf_sorted of leaf id k (leaf-channel order -> leaf-id order).
        self.leaf_id_order = np.argsort(h.node_ids[self.leaf_sorted])
        leaf_depth = h.depth[self.leaf_sorted]
        self.leaf_cols = [h.ancestor_table[self.leaf_sorted, d] for d in range(L)]
        self.leaf_on = [leaf_depth > d for d in range(L)]
        self.depth_channels = list(h.depth_channels)
        self.children_table = h.children_table.astype(np.int64)
        self.num_children = np.array([len(c) for c in h.children], dtype=np.int64)
        self.counted_per_depth = counted_entries_per_depth(h)  # [N, L] float64, exact in a matmul


class PlaceTables:
    """Lazily converted paddle copies of a plan's arrays on one place."""

    def __init__(self, plan: Plan, place: Any):
        self.plan = plan
        self.place = place
        self._cache: dict[Any, paddle.Tensor] = {}

    def get(self, key: Any, make) -> paddle.Tensor:
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = paddle.to_tensor(np.asarray(make()), place=self.place)
        return t


_PLANS: dict[str, Plan] = {}
_TABLES: dict[tuple[str, str], PlaceTables] = {}
_LOCK = threading.Lock()


def tables_for(hierarchy: Hierarchy, place: Any) -> PlaceTables:
    """The cached tables of ``hierarchy`` on ``place`` (keyed by fingerprint and place)."""
    fp = hierarchy.fingerprint
    key = (fp, str(place))
    with _LOCK:
        tab = _TABLES.get(key)
        if tab is None:
            plan = _PLANS.get(fp)
            if plan is None:
                plan = _PLANS[fp] = Plan(hierarchy)
            tab = _TABLES[key] = PlaceTables(plan, place)
    return tab


def col(tab: PlaceTables, name: str, d: int, e: int | None = None, dtype: str | None = None) -> paddle.Tensor:
    """A per-block table as a ``[1, n, 1]`` tensor (for broadcasting against ``[B, n, P]``)."""

    def make():
        arr = getattr(tab.plan, name)[d]
        arr = arr if e is None else arr[e]
        arr = np.asarray(arr).reshape(1, -1, 1)
        return arr.astype(dtype) if dtype else arr

    return tab.get((name, d, e, dtype, "col"), make)


def vec(tab: PlaceTables, name: str, d: int | None = None, e: int | None = None) -> paddle.Tensor:
    """A plan table (``name``, entry ``d``, sub-entry ``e``) as it is, e.g. an index vector."""

    def make():
        arr = getattr(tab.plan, name)
        arr = arr if d is None else arr[d]
        return arr if e is None else arr[e]

    return tab.get((name, d, e), make)
