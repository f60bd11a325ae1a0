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

from ..core import plan_for
from ..hierarchy import Hierarchy

__all__ = ["Plan", "PlaceTables", "tables_for", "col", "vec", "TENSOR_TYPES", "building_program",
           "no_kernel_in_program", "place_of"]

# What a tensor argument may be: an eager tensor, or a value of the program that
# ``paddle.jit.to_static(full_graph=True)`` builds.
TENSOR_TYPES = (paddle.Tensor, paddle.pir.Value)


def building_program() -> bool:
    """Whether paddle is building a static program (``paddle.jit.to_static(full_graph=True)``):
    tensors are then values of the program, with no place and nothing to read back."""
    return not paddle.in_dynamic_mode()


def place_of(t: Any) -> Any:
    """``t.place``, or None in a program (a program's values have no place; asking warns)."""
    return None if building_program() else t.place


def no_kernel_in_program(backend: str, kernel: str) -> bool:
    """False (the paddle ops build the program), or an error where ``backend`` asks for ``kernel``:
    the compiled CPU kernel and the Triton kernels have no static-graph operator in paddle."""
    if backend == kernel:
        raise RuntimeError(f"backend={kernel!r} was asked for inside paddle.jit.to_static(full_graph=True), "
                           "but that kernel has no paddle static-graph operator; use backend='auto' or "
                           "'paddle' there, or the default SOT mode (full_graph=False)")
    return False


class Plan:
    """Numpy index arrays for depth-block sweeps over one hierarchy (built once per hierarchy).

    Block d (0-based) holds ``levels[d]``, the channels at depth d+1 in ascending order.
    ``parent_pos[d]``: position of each block-d node's parent in block d-1. ``slot[d]``: rank of
    each block-d node among its parent's children (channel order). ``child_ranks[d]``: list over
    rank r of ``(positions in block d+1 of the r-th child of each block-d node, valid mask)``,
    the mask False (and the position 0) where a node has fewer than r+1 children.
    """

    def __init__(self, h: Hierarchy):
        # Every table that needs a walk comes from the core plan (DEVELOPING.md "Rules of the house");
        # this class only reshapes them into the depth-block form of the paddle sweeps.
        core = plan_for(h)
        L = core.max_depth
        self.num_nodes, self.num_leaves, self.max_depth = core.num_nodes, core.num_leaves, L
        self.levels = list(core.levels)
        pos = core.level_position  # index of each channel in its depth block
        self.order = np.concatenate(self.levels)
        self.inverse = np.argsort(self.order)
        # If every depth is a contiguous channel range, concatenating the blocks in this order is
        # already channel order (balanced trees in the default or coarse-to-fine layout).
        by_start = sorted(range(L), key=lambda d: int(self.levels[d][0]))
        contiguous = np.array_equal(
            np.concatenate([self.levels[d] for d in by_start]), np.arange(core.num_nodes)
        )
        self.block_order = by_start if contiguous else None
        self.parent_pos = [None] + [pos[parents] for parents in core.level_parents[1:]]
        self.slot = [None] + [core.child_rank[lv].astype(np.int32) for lv in self.levels[1:]]
        offsets, kids, nkids = core.child_offsets, core.child_channels, core.num_children
        self.child_ranks: list[list[tuple[np.ndarray, np.ndarray | None]]] = []
        for lv in self.levels:
            n, first = nkids[lv], offsets[lv]
            ranks = []
            for r in range(int(n.max(initial=0))):
                valid = n > r
                index = np.where(valid, pos[kids[np.where(valid, first + r, 0)]], 0).astype(np.int64)
                ranks.append((index, None if valid.all() else valid))
            self.child_ranks.append(ranks)
        # child_slices[d]: per block-d node, the (start, stop) positions of its children in block d+1
        # when each node's children are consecutive there (any channel-contiguous layout), else None.
        kid_pos = pos[kids]  # [E] block position of each CSR child
        owner = core.parent[kids]
        in_run = kid_pos == kid_pos[offsets[owner]] + (np.arange(kids.size) - offsets[owner])
        scattered = np.zeros(core.num_nodes, dtype=bool)
        scattered[owner[~in_run]] = True
        self.child_slices: list[list[tuple[int, int]] | None] = []
        for d, lv in enumerate(self.levels):
            if d == L - 1 or scattered[lv].any():
                self.child_slices.append(None)
                continue
            n = nkids[lv]
            start = np.where(n > 0, kid_pos[np.minimum(offsets[lv], kids.size - 1)], 0)
            self.child_slices.append(list(zip(start.tolist(), (start + n).tolist(), strict=True)))
        # anc_col[d][c]: channel of label channel c's ancestor at depth d+1 (c itself if shallower).
        self.anc_col = [np.ascontiguousarray(h.ancestor_table[:, d]) for d in range(L)]
        # anc_at[d][e]: ancestor at depth e+1 (e < d) of each block-d node (partial-label masks).
        self.anc_at = [[h.ancestor_table[lv, e] for e in range(d)] for d, lv in enumerate(self.levels)]
        self.depth = h.depth.astype(np.int64)
        self.channel_of = h.channel_of.astype(np.int64)
        self.node_ids = h.node_ids.astype(np.int64)
        self.is_leaf = h.is_leaf
        self.ancestor_table = h.ancestor_table.astype(np.int64)
        self.leaf_sorted = core.leaf_channels_sorted
        # leaf_id_order[k]: position in leaf_sorted of leaf id k (leaf-channel order -> leaf-id order).
        self.leaf_id_order = np.argsort(h.node_ids[self.leaf_sorted])
        leaf_depth = h.depth[self.leaf_sorted]
        self.leaf_cols = [h.ancestor_table[self.leaf_sorted, d] for d in range(L)]
        self.leaf_on = [leaf_depth > d for d in range(L)]
        self.depth_channels = list(core.depth_channels)
        self.children_table = h.children_table.astype(np.int64)
        self.num_children = core.num_children
        self.counted_per_depth = core.tree_min_counted  # [N, L] float64, exact in a matmul


class PlaceTables:
    """Lazily converted paddle copies of a plan's arrays on one place."""

    def __init__(self, plan: Plan, place: Any):
        self.plan = plan
        self.place = place
        self._cache: dict[Any, paddle.Tensor] = {}

    def get(self, key: Any, make) -> paddle.Tensor:
        if building_program():  # a constant of the program being built; the cache holds eager tensors only
            return paddle.to_tensor(np.asarray(make()))
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
