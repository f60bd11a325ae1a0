"""The torch ops' copies of a hierarchy's tables on one device (channel space).

:class:`DevicePlan` holds index tensors copied from the one plan (:mod:`hieraloss.core.plan`) and
its depth-block layout (:mod:`hieraloss.core.blocks`); it computes no table itself. Cached per
(hierarchy, device) by :func:`hieraloss.torch._tables.cached_on`.
"""

from __future__ import annotations

import torch

from ...core.blocks import depth_blocks
from ...core.checks import env_choice
from ...core.plan import plan_for as core_plan_for
from ...core.rules import HSSN_SCALE
from ...hierarchy import Hierarchy
from .._tables import DeviceTables, cached_on

__all__ = ["DevicePlan", "device_plan", "compute_dtype", "SWEEP_ENV", "SWEEPS", "sweep_by_depth"]

class DevicePlan:
    """Copies on one device of the index tables of the hierarchy's :class:`hieraloss.core.plan.Plan`
    and :class:`hieraloss.core.blocks.DepthBlocks` (channel space), or of the hierarchy's own.

    ``levels[d-1]``: channels at depth d; ``level_parents[d-1]``: their parents. ``bottom_up``:
    ``(v, children, child_is_leaf, leaf_slice_or_None)`` per internal node, deepest first.
    """

    def __init__(self, tab: DeviceTables):
        h: Hierarchy = tab.hierarchy
        core = core_plan_for(h)
        blocks = depth_blocks(h)
        dev = tab.device
        long = dict(dtype=torch.int64, device=dev)
        self.num_nodes = core.num_nodes
        self.max_depth = core.max_depth
        self.levels = [torch.tensor(lv, **long) for lv in core.levels]
        self.level_parents = [torch.tensor(par, **long) for par in core.level_parents]
        # Tree-min schedule (core.blocks): internal nodes deepest first, each with its children in
        # channel order (the zmax tie order) and, when they are consecutive leaves, that slice.
        self.bottom_up = [(v, kids, leaf, None if run is None else slice(*run))
                          for v, kids, leaf, run in blocks.bottom_up]
        self.top_down = self.bottom_up[::-1]
        # The same sweeps one depth at a time (sweep_by_depth): for the nodes at depth d + 1
        # (levels[d]), their parents' positions in levels[d - 1] and their own positions in levels[d]
        # (channel order, so siblings come in channel order: the tie order).
        self.by_level = blocks.sweep_by_depth
        self.parent_position = [None] + [torch.tensor(pos, **long) for pos in blocks.parent_pos[1:]]
        self.level_rank = [torch.tensor(rank, device=dev) for rank in blocks.level_rank]
        self.max_kids = core.max_children
        # Runs of consecutive channels that are all leaves or all internal (one run each by default).
        self.runs = [((a, b), leaf) for a, b, leaf in core.channel_runs]
        # path_real[c, d]: 1 where ancestor_table[c, d] is a real path entry (d < depth(c)), 0 on the padding.
        self.path_real = torch.tensor(core.path_real, dtype=torch.float64, device=dev)
        self.ancestor_table = tab.ancestor_table  # [N, L]
        self.ancestor_columns = tab.ancestor_table.t().contiguous()  # [L, N]
        self.depth = tab.depth  # [N]
        self.node_ids = tab.node_ids
        self.channel_of = tab.channel_of  # [N] by node id
        self.leaf_channels = tab.leaf_channels  # [K]: channel of leaf id k
        self.is_leaf = tab.is_leaf
        self.is_internal = ~tab.is_leaf
        self.children_table = tab.children_table
        self.leaf_sorted = torch.tensor(core.leaf_channels_sorted, **long)
        self.depth_channels = [torch.tensor(dc, **long) for dc in core.depth_channels]
        self.counted_per_depth = torch.tensor(core.tree_min_counted, device=dev)  # [N, L] float64


def device_plan(hierarchy: Hierarchy, device: torch.device) -> DevicePlan:
    """The cached :class:`DevicePlan` of ``hierarchy`` on ``device``."""
    return cached_on(hierarchy, device, "_plan", DevicePlan)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_scales(lc: torch.Tensor, plan: DevicePlan, reduction: str, dtype) -> torch.Tensor:
    """Per-channel factor turning a sum of entries into the reduction (``[N]``)."""
    N = plan.num_nodes
    if reduction == "sum":
        return torch.ones(N, dtype=dtype, device=lc.device)
    # Valid pixels per label channel; slot 0 of the shifted count holds the ignored ones. A scatter-add
    # into N + 1 slots, not a bincount: its size does not depend on the values (torch.compile).
    index = lc.reshape(-1) + 1
    hist = torch.zeros(N + 1, dtype=torch.int64, device=lc.device).scatter_add_(0, index, torch.ones_like(index))
    hist = hist[1:].to(torch.float64)
    counts = hist @ plan.counted_per_depth  # [L] unmasked entries per depth
    if reduction == "mean":
        scale = 1.0 / counts.sum().clamp(min=1)
        return scale.to(dtype).expand(N)
    scale = HSSN_SCALE / counts.clamp(min=1)  # hssn
    return scale[plan.depth - 1].to(dtype)


# HIERALOSS_TORCH_SWEEP chooses how the torch ops sweep the tree in tree-min: "auto" (the default, by
# the tree's shape: DevicePlan.by_level), "node" (one internal node at a time) or "depth" (one depth at
# a time). Both give the same bits; the switch exists for tests and measurements. It is read per call
# (under torch.compile, when the graph is traced).
SWEEP_ENV = "HIERALOSS_TORCH_SWEEP"
SWEEPS = ("auto", "node", "depth")


def sweep_by_depth(plan: DevicePlan) -> bool:
    """Whether the tree-min sweeps of this call go one depth at a time (``HIERALOSS_TORCH_SWEEP``)."""
    sweep = env_choice(SWEEP_ENV, SWEEPS)
    return plan.by_level if sweep == "auto" else sweep == "depth"

