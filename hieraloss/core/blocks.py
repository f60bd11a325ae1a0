"""The depth-block layout of a hierarchy: its :class:`~hieraloss.core.plan.Plan` reshaped for sweeps
that take one depth at a time as a block of rows (the paddle backend's ops), numpy only.

:func:`depth_blocks` builds it once per hierarchy. Backends copy its arrays to their devices and
compute no table themselves.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..hierarchy import Hierarchy
from .plan import plan_for

__all__ = ["DepthBlocks", "depth_blocks", "SWEEP_BY_DEPTH_MIN_GATHERED"]

# The torch ops' tree-min sweeps go one node at a time (a few ops per internal node, plus one per
# child that is not in a slice of consecutive leaves and so is gathered row by row) or one depth at
# a time (a dozen ops per depth over all rows). Trees with at least this many gathered children per
# depth below the top take the depth at a time sweep (the measurements: docs/performance.md).
SWEEP_BY_DEPTH_MIN_GATHERED = 24


class DepthBlocks:
    """Numpy index arrays for depth-block sweeps over one hierarchy (built once per hierarchy).

    Block d (0-based) holds ``levels[d]``, the channels at depth d+1 in ascending order.
    ``parent_pos[d]``: position of each block-d node's parent in block d-1. ``slot[d]``: rank of
    each block-d node among its parent's children (channel order). ``child_ranks[d]``: list over
    rank r of ``(positions in block d+1 of the r-th child of each block-d node, valid mask)``,
    the mask False (and the position 0) where a node has fewer than r+1 children. ``level_rank[d]``:
    ``[n_d, 1]`` int32 positions 0..n_d-1 of block d.

    The node-at-a-time sweep of the torch ops: ``bottom_up`` (every internal node deepest first,
    see below), and ``sweep_by_depth``, whether the tree is better swept one depth at a time
    (:data:`SWEEP_BY_DEPTH_MIN_GATHERED`).
    """

    def __init__(self, h: Hierarchy):
        # Every table that needs a walk comes from the plan; this class reshapes them into blocks.
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
        # The node-at-a-time sweep (the torch ops): every internal node, deepest first, with its
        # children in channel order (the zmax tie order), whether each is a leaf, and the (start,
        # stop) channel range of the children when they are consecutive leaves (read as a slice).
        self.bottom_up: list[tuple[int, list[int], list[bool], tuple[int, int] | None]] = []
        for v in core.bottom_up.tolist():
            kids = core.children[v].tolist()
            kid_is_leaf = core.is_leaf[kids].tolist()
            consecutive = all(kid_is_leaf) and kids == list(range(kids[0], kids[-1] + 1))
            self.bottom_up.append((v, kids, kid_is_leaf, (kids[0], kids[-1] + 1) if consecutive else None))
        gathered = sum(len(kids) for _, kids, _, run in self.bottom_up if run is None)
        self.sweep_by_depth = gathered >= SWEEP_BY_DEPTH_MIN_GATHERED * max(1, L - 1)
        self.level_rank = [np.arange(len(lv), dtype=np.int32)[:, None] for lv in self.levels]


@lru_cache(maxsize=64)
def depth_blocks(h: Hierarchy) -> DepthBlocks:
    """The :class:`DepthBlocks` of ``h``, built once (the most recently used hierarchies are kept)."""
    return DepthBlocks(h)
