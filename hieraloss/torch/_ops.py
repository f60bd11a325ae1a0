"""Vectorized torch ops (no validation: the functional API checks inputs first).

Everything works in channel space on logits viewed as ``[B, N, P]`` (P = all spatial positions)
and label channels ``[B, P]`` (-1 = ignored). Sweeps go one node or depth at a time, so
the work is O(N * depth) per pixel and no ``[B, N, N, P]`` or ``[B, N, Dmax, P]`` tensor is built.

Tree-min loss, split into the two kinds of entries of a valid pixel with label channel c:

* negatives: every entry first gets the negative term at ``zmax`` (leaves are their own zmax;
  only the internal rows are swept bottom-up, one node at a time over its children, or for trees
  with many children to gather one depth at a time with a max-reduce, see ``BY_LEVEL_MIN_GATHERED``);
* positives: the <= L nodes of ``A(c)``; ``zmin`` along that path is a running minimum, so the
  positive part lives in ``[L, P]`` tensors gathered along the path, and replaces the negative
  term at those entries. Unknown descendants of partial labels and ignored pixels are zeroed
  (on CPU as a correction on the few pixels concerned).

Pixels are walked in tiles (``_tile_pixels``): temporaries stay tile-sized, so the peak extra
memory of forward+backward is about the gradient itself.

The autograd function saves only the logits and the label channels and recomputes ``zmax`` in
backward; each node's gradient at its zmax is routed top-down to the node attaining it, the
positive gradient to the path node attaining ``zmin``, following the tie rule of DEVELOPING.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core import triplets as core_triplets
from ..core.blocks import depth_blocks
from ..core.plan import plan_for as core_plan_for
from ..core.rules import HSSN_SCALE
from ..hierarchy import Hierarchy
from ._tables import DeviceTables, cached_on


# ---------------------------------------------------------------------------- per-device plan
class Plan:
    """The hierarchy's :class:`hieraloss.core.plan.Plan` as index tensors on one device (channel space).

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
        # The same sweeps one depth at a time (see _by_level): for the nodes at depth d + 1
        # (levels[d]), their parents' positions in levels[d - 1] and their own positions in levels[d]
        # (channel order, so siblings come in channel order: the tie order).
        gathered = sum(len(kids) for _, kids, _, block in self.bottom_up if block is None)
        self.by_level = gathered >= BY_LEVEL_MIN_GATHERED * max(1, core.max_depth - 1)
        self.parent_position = [None] + [torch.tensor(pos, **long) for pos in blocks.parent_pos[1:]]
        self.level_rank = [torch.arange(len(lv), dtype=torch.int32, device=dev).unsqueeze(1) for lv in core.levels]
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


def plan_for(hierarchy: Hierarchy, device: torch.device) -> Plan:
    return cached_on(hierarchy, device, "_plan", Plan)


# ---------------------------------------------------------------------------- elementwise pieces
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(z))``, exact to rounding: above the threshold ``log1p(exp(-z))`` is below half an
    ulp of ``z`` in the dtype, so returning ``z`` there changes nothing."""
    return torch.nn.functional.softplus(z, threshold=40.0 if z.dtype == torch.float64 else 20.0)


def _neg_term(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """``sigmoid(z)^gamma * softplus(z)``: a negative node's loss at ``z = zmax``."""
    out = _softplus(z)
    if gamma != 0:
        out.mul_(torch.sigmoid(z).pow_(gamma))
    return out


def _neg_grad(z: torch.Tensor, gamma: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """d/dz of :func:`_neg_term`: ``s^gamma * (gamma * (1 - s) * softplus(z) + s)``, s = sigmoid(z)."""
    if gamma == 0:
        return torch.sigmoid(z) if out is None else torch.sigmoid(z, out=out)
    if out is not None:
        return out.copy_(_neg_grad(z, gamma))
    s = torch.sigmoid(z)
    # sigmoid(-z), not 1 - s: the subtraction cancels for large z.
    out = _softplus(z).mul_(torch.sigmoid(-z)).mul_(gamma).add_(s)
    return out.mul_(s.pow_(gamma))


def _pos_term(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """``sigmoid(-z)^gamma * softplus(-z)``: a positive node's loss at ``z = zmin``."""
    return _neg_term(-z, gamma)


def _pos_grad(z: torch.Tensor, gamma: float) -> torch.Tensor:
    return _neg_grad(-z, gamma).neg_()


# ---------------------------------------------------------------------------- label helpers
class _Labels:
    """What the loss needs to know about the label channels ``[B, P]``."""

    def __init__(self, lc: torch.Tensor, plan: Plan):
        B, P = lc.shape
        self.valid = lc >= 0
        safe = lc.clamp(min=0).reshape(-1)
        L = plan.max_depth  # explicit sizes: view cannot infer -1 when B * P = 0
        self.path = plan.ancestor_table.index_select(0, safe).view(B, P, L).permute(0, 2, 1).contiguous()  # [B, L, P]
        depth_c = plan.depth.index_select(0, safe).view(B, P)
        steps = torch.arange(plan.max_depth, device=lc.device).view(1, -1, 1)
        self.on_path = (steps < depth_c.unsqueeze(1)) & self.valid.unsqueeze(1)  # [B, L, P]


def _unknown_mask(lc: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``[B, N, P]`` bool: strict descendants of the label channel (only partial labels have any)."""
    B, P = lc.shape
    unknown = torch.zeros(B, plan.num_nodes, P, dtype=torch.bool, device=lc.device)
    lab = lc.unsqueeze(1)
    for lv, par in zip(plan.levels[1:], plan.level_parents[1:], strict=True):
        below = (par.view(1, -1, 1) == lab) | unknown.index_select(1, par)
        unknown.index_copy_(1, lv, below)
    return unknown


def _reduction_scales(lc: torch.Tensor, plan: Plan, reduction: str, dtype) -> torch.Tensor:
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


# ---------------------------------------------------------------------------- tree-min op
# Pixels are processed in tiles (see _tile_pixels) so that the temporaries stay small (peak extra
# memory ~ the gradient) while each op still has enough work to amortise its dispatch. The loops
# over nodes use dense float ops only (min/max/eq/mul/addcmul): on CPU, masked_fill/where on bool
# masks and gather/scatter cost several times more per element.
TILE_ELEMENTS = 1 << 23  # CPU: a cap on the (pixel, node) entries of a tile (32 MB of float32) ...
TILE_PIXELS = 1 << 16  # ... and on its pixels: the fastest measured on 2 cores (26 and 149 nodes)
TILE_ELEMENTS_GPU = 1 << 26  # GPU: no cache to fit, only a cap on temporaries (and few launches)
TILE_ELEMENTS_COMPILED = 1 << 26  # compiled: one tile for the whole batch up to this many entries (_one_tile)


def _tile_pixels(N: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(1, TILE_ELEMENTS_GPU // N)
    return max(1, min(TILE_ELEMENTS // N, TILE_PIXELS))


def _tiles(B: int, P: int, step: int):
    for b in range(B):
        for p0 in range(0, P, step):
            yield b, slice(p0, min(P, p0 + step))


def _sparse_fixups(t: torch.Tensor) -> bool:
    """Whether rare cases (ignored pixels, partial labels, ties) may be handled as corrections on the
    few pixels concerned, found with a host sync: on CPU yes (a sync is free); elsewhere one dense
    pass over the tile is cheaper than stalling the device. Never inside ``torch.compile``: a
    data-dependent size would break the graph."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


class _Scratch:
    """Tile-sized buffers reused by every tile of one call (rows indexed by channel)."""

    def __init__(self, N: int, kids: int, step: int, ct: torch.dtype, device: torch.device):
        new = dict(dtype=ct, device=device)
        self.z = torch.empty(N, step, **new)  # zmax of the internal rows
        self.work = torch.empty(N, step, **new)  # loss terms / gradient
        self.hit = torch.empty(kids, step, **new)  # 1.0 where a child attains its parent's zmax
        self.rows = torch.empty(kids, step, **new)  # children gathered when not a channel slice
        self.carry = torch.empty(step, **new)

    def cut(self, T: int) -> _Scratch:
        view = object.__new__(_Scratch)
        for name, t in vars(self).items():
            setattr(view, name, t[..., :T])
        return view


def _kid_rows(x: torch.Tensor, kids, kid_is_leaf, block, s: _Scratch) -> torch.Tensor:
    """``[m, T]`` zmax rows of one node's children: a view of ``x`` for a slice of leaves, else gathered."""
    if block is not None:
        return x[block]
    rows = s.rows[: len(kids)]
    for i, (k, leaf) in enumerate(zip(kids, kid_is_leaf, strict=True)):
        rows[i].copy_(x[k] if leaf else s.z[k])
    return rows


# The node-at-a-time sweeps cost a few ops per internal node plus one per child not in a slice of
# consecutive leaves (those are gathered row by row); the depth-at-a-time ones a dozen ops per depth
# over all rows. Trees with at least this many gathered children per depth below the top take the
# latter. Measured on the CPU (2-core EPYC, reduction "hssn", fwd+bwd of 2 x 32 x 32 pixels, node
# against depth at a time): Mapillary (13 gathered per depth) 6.1 against 8.0 ms; a 3660-node
# two-level taxonomy (0: its leaves are slices) 26.0 against 70.6; random trees of 240 nodes, depth
# 8 (34) 7.8 against 5.1, and of 4000 nodes, depth 46 (88) 125.5 against 54.5. Tests set
# BY_LEVEL_OVERRIDE to force either way.
BY_LEVEL_MIN_GATHERED = 24
BY_LEVEL_OVERRIDE: bool | None = None


def _by_level(plan: Plan) -> bool:
    return plan.by_level if BY_LEVEL_OVERRIDE is None else BY_LEVEL_OVERRIDE


def _internal_zmax(x: torch.Tensor, plan: Plan, s: _Scratch) -> None:
    """``s.z[v] = zmax_v = max(x_v, zmax of v's children)`` for the internal rows of a tile ``x``
    ``[N, T]``, bottom-up (leaves are their own zmax and stay in ``x``)."""
    if _by_level(plan):
        _internal_zmax_by_level(x, plan, s)
        return
    for v, kids, kid_is_leaf, block in plan.bottom_up:
        zv = s.z[v]
        if block is not None:
            torch.amax(x[block], dim=0, out=zv)
        else:
            zv.copy_(x[kids[0]] if kid_is_leaf[0] else s.z[kids[0]])
            for k, leaf in zip(kids[1:], kid_is_leaf[1:], strict=True):
                torch.maximum(zv, x[k] if leaf else s.z[k], out=zv)
        torch.maximum(zv, x[v], out=zv)


def _internal_zmax_by_level(x: torch.Tensor, plan: Plan, s: _Scratch) -> None:
    """:func:`_internal_zmax` one depth at a time: ``s.z`` takes every row (a leaf's is its logit),
    and each depth's zmax is max-reduced into its parents' rows (NaN propagates, as in
    ``torch.maximum``)."""
    s.z.copy_(x)
    T = x.shape[1]
    for d in range(plan.max_depth - 1, 0, -1):  # nodes at depth d + 1 into their parents at depth d
        below = s.z.index_select(0, plan.levels[d])
        s.z.scatter_reduce_(0, plan.level_parents[d].unsqueeze(1).expand(-1, T), below, "amax")


def _route_zmax_gradient_by_level(x: torch.Tensor, g: torch.Tensor, plan: Plan, s: _Scratch) -> None:
    """:func:`_route_zmax_gradient` one depth at a time, after :func:`_internal_zmax_by_level`: the
    first child in channel order attaining its parent's zmax is found with one min-reduce of the
    children's positions per depth."""
    T = x.shape[1]
    for d in range(1, plan.max_depth):  # parents at depth d, children at depth d + 1
        parents, kids = plan.levels[d - 1], plan.levels[d]
        zp = s.z.index_select(0, parents)
        routed = torch.ne(x.index_select(0, parents), zp).to(g.dtype).mul_(g.index_select(0, parents))
        g.index_add_(0, parents, routed, alpha=-1)  # exact: g - g = 0 where routed, g - 0 = g where kept
        pos, rank = plan.parent_position[d], plan.level_rank[d]
        m = kids.numel()
        hit = torch.eq(s.z.index_select(0, kids), zp.index_select(0, pos))
        first = torch.full((parents.numel(), T), m, dtype=torch.int32, device=x.device)
        first.scatter_reduce_(0, pos.unsqueeze(1).expand(-1, T), torch.where(hit, rank, m), "amin")
        take = first.index_select(0, pos).eq_(rank)
        g.index_add_(0, kids, take.to(g.dtype).mul_(routed.index_select(0, pos)))


def _route_zmax_gradient(x: torch.Tensor, g: torch.Tensor, plan: Plan, s: _Scratch) -> None:
    """Turn d loss / d zmax (``g`` ``[N, T]``) into d loss / d x in place, top-down: a node keeps
    its gradient where it attains its own zmax (it wins ties), else passes it to the first child in
    channel order that attains it (the tie rule of DEVELOPING.md)."""
    if _by_level(plan):
        _route_zmax_gradient_by_level(x, g, plan, s)
        return
    sparse = _sparse_fixups(x)
    for v, kids, kid_is_leaf, block in plan.top_down:
        zv = s.z[v]
        # Counting ties needs exact float sums of 0/1 entries: below 2^24 of them even in float32.
        count_ties = sparse and len(kids) > 1 and len(kids) * x.shape[1] < (1 << 24)
        routed = torch.ne(x[v], zv, out=s.carry)
        n_routed = float(routed.sum()) if count_ties else 0.0
        routed.mul_(g[v])
        g[v].sub_(routed)  # exact: g - g = 0 where routed, g - 0 = g where kept
        rows = _kid_rows(x, kids, kid_is_leaf, block, s)
        hit = torch.eq(rows, zv, out=s.hit[: len(kids)])
        # Every routed pixel has at least one child attaining zv, so a hit count equal to the routed
        # count proves there is no tie that matters; else only the first tied child in channel
        # order may take the gradient (a cumsum pass, rare on CPU).
        if len(kids) > 1 and (not count_ties or float(hit.sum()) > n_routed):
            hit.mul_(torch.cumsum(hit, dim=0).eq_(1))
        if block is not None:
            g[block].addcmul_(hit, routed)
        else:
            for i, k in enumerate(kids):
                g[k].addcmul_(hit[i], routed)


def _zmax_rows(x: torch.Tensor, plan: Plan, s: _Scratch):
    """(zmax rows, target rows) pairs covering every channel: leaf runs from ``x``, internal runs
    from ``s.z`` (runs of consecutive channels, one pair per run)."""
    for (a, b), leaf in plan.runs:
        yield (x[a:b] if leaf else s.z[a:b]), s.work[a:b]


def _softplus_into(z: torch.Tensor, out: torch.Tensor) -> None:
    torch.ops.aten.softplus.out(z, 1.0, 40.0 if z.dtype == torch.float64 else 20.0, out=out)


class _TilePath:
    """The positive entries of a tile with label channels ``lc`` ``[T]`` (-1 = ignored): ``path``
    ``[L, T]`` (``A(c)`` root first, padded with c) and ``real`` (1.0 on real path entries, 0.0 on
    the padding; ignored pixels are dropped with :meth:`zero_dropped`)."""

    def __init__(self, lc: torch.Tensor, plan: Plan, ct: torch.dtype):
        self.lc = lc
        self.valid = lc >= 0
        self.drop = torch.nonzero(~self.valid).squeeze(1) if _sparse_fixups(lc) else None
        safe = lc.clamp(min=0)
        L = plan.max_depth
        self.path = torch.empty(L, lc.shape[0], dtype=torch.int64, device=lc.device)
        for d in range(L):  # row by row: a 1-d index_select is much faster than a [T, L] one + transpose
            torch.index_select(plan.ancestor_columns[d], 0, safe, out=self.path[d])
        self.real = plan.path_real.index_select(0, safe).t().to(ct)  # [L, T]

    def zmin(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The path logits ``[L, T]`` and their running min from the root."""
        xp = torch.gather(x, 0, self.path)
        zmin = xp.clone()
        for d in range(1, zmin.shape[0]):
            torch.minimum(zmin[d], zmin[d - 1], out=zmin[d])
        return xp, zmin

    def zero_dropped(self, t: torch.Tensor) -> None:
        """``t[:, ignored pixels] = 0``. On CPU only the (usually few) ignored columns are touched."""
        if self.drop is None:
            t.masked_fill_(~self.valid.unsqueeze(0), 0.0)
        elif self.drop.numel():
            t.index_fill_(1, self.drop, 0.0)


def _zero_unknown(t: torch.Tensor, tp: _TilePath, plan: Plan) -> None:
    """Zero the strict descendants of partial labels in ``t`` ``[N, T]``. On CPU a correction on the
    columns with a partial label only (they are rare); elsewhere one mask over the tile (no sync)."""
    if not _sparse_fixups(t):
        t.masked_fill_(_unknown_mask(tp.lc.unsqueeze(0), plan)[0], 0.0)
        return
    cols = torch.nonzero(tp.valid & plan.is_internal.index_select(0, tp.lc.clamp(min=0))).squeeze(1)
    if cols.numel():
        unknown = _unknown_mask(tp.lc.index_select(0, cols).unsqueeze(0), plan)[0]
        t.index_copy_(1, cols, t.index_select(1, cols).masked_fill_(unknown, 0.0))


def _forward_tile(x, lc, plan, gamma, has_partial, s, out_map, weight):
    """Negative term at zmax for every entry, then the path entries swapped for the positive term at
    zmin. Writes the loss map into ``out_map`` (``[N, T]``, reduction none) or returns per-channel sums."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    _internal_zmax(xf, plan, s)
    if out_map is not None:
        s.work = out_map
    for z, dst in _zmax_rows(xf, plan, s):
        if gamma == 0:
            _softplus_into(z, dst)
        else:
            dst.copy_(_neg_term(z, gamma))
    neg = s.work
    tp = _TilePath(lc, plan, ct)
    if has_partial:
        _zero_unknown(neg, tp, plan)
    tp.zero_dropped(neg)
    pos = _pos_term(tp.zmin(xf)[1], gamma)
    if out_map is not None:
        neg.scatter_(0, tp.path, 0.0)
        pos.mul_(tp.real)
        tp.zero_dropped(pos)
        neg.scatter_add_(0, tp.path, pos)
        if weight is not None:
            neg.mul_(weight.to(ct).unsqueeze(1))
        return None
    swap = pos.sub_(torch.gather(neg, 0, tp.path)).mul_(tp.real)
    tp.zero_dropped(swap)
    return neg.sum(dim=1).index_add_(0, tp.path.reshape(-1), swap.reshape(-1))


def _one_tile(x: torch.Tensor) -> bool:
    """Whether a compiled graph walks the whole batch as one tile ``[N, B*P]``: Python loops over
    images and pixel tiles would pin B and H*W in the graph's guards (a new graph per size), while
    one tile guards only on the size bound, so ``torch.compile(dynamic=True)`` compiles once for
    every input up to ``TILE_ELEMENTS_COMPILED`` entries. Eager mode keeps its cache-sized tiles."""
    B, N, P = x.shape
    return torch.compiler.is_compiling() and B * N * P <= TILE_ELEMENTS_COMPILED


def _batch_as_tile(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, P]`` as ``[N, B*P]`` (a copy)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _forward(x, lc, plan, gamma, reduction, weight, has_partial):
    B, N, P = x.shape
    ct = compute_dtype(x.dtype)
    if _one_tile(x):
        tiles = [(_batch_as_tile(x), lc.reshape(-1))]
        step = B * P
    else:
        step = _tile_pixels(N, x.device)
        tiles = None
    scratch = _Scratch(N, plan.max_kids, min(step, B * P if tiles else P), ct, x.device)
    if reduction == "none":
        if tiles:
            out = torch.empty(N, B * P, dtype=ct, device=x.device)
            _forward_tile(*tiles[0], plan, gamma, has_partial, scratch, out, weight)
            return out.view(N, B, P).transpose(0, 1)
        out = torch.empty(B, N, P, dtype=ct, device=x.device)
        for b, p in _tiles(B, P, step):
            _forward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial, scratch.cut(p.stop - p.start),
                          out[b, :, p], weight)
        return out
    if tiles:
        per_channel = _forward_tile(*tiles[0], plan, gamma, has_partial, scratch, None, None)
    else:
        per_channel = torch.zeros(N, dtype=ct, device=x.device)
        for b, p in _tiles(B, P, step):
            per_channel += _forward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial,
                                         scratch.cut(p.stop - p.start), None, None)
    scale = _reduction_scales(lc, plan, reduction, ct)
    if weight is not None:
        scale = scale * weight.to(ct)
    return (per_channel * scale).sum()


def _backward_tile(x, lc, plan, gamma, has_partial, up_map, per_channel, s, out):
    """d loss / d x of one tile into ``out`` ``[N, T]``; ``up_map`` (reduction none, weighted) or
    ``per_channel`` factors. Every node's negative gradient at its zmax is routed top-down to the
    node attaining it; the positive gradient at zmin goes to the path node attaining it."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    if out.dtype == ct:
        s.work = out
    g = s.work
    _internal_zmax(xf, plan, s)
    for z, dst in _zmax_rows(xf, plan, s):
        _neg_grad(z, gamma, out=dst)
    tp = _TilePath(lc, plan, ct)
    if up_map is not None:
        g.mul_(up_map)
        up_pos = torch.gather(up_map, 0, tp.path)
    else:
        g.mul_(per_channel.unsqueeze(1))
        up_pos = per_channel[tp.path]
    g.scatter_(0, tp.path, 0.0)  # path entries are positives: no negative term
    if has_partial:
        _zero_unknown(g, tp, plan)
    _route_zmax_gradient(xf, g, plan, s)
    # Positives: d loss / d zmin_d, passed from the deepest path entry up while the running min
    # comes from above (the shallowest entry wins ties), then added at the path channels.
    xp, zmin = tp.zmin(xf)
    gz = _pos_grad(zmin, gamma).mul_(up_pos).mul_(tp.real)
    for d in range(zmin.shape[0] - 1, 0, -1):
        from_above = torch.ge(xp[d], zmin[d - 1], out=s.carry).mul_(gz[d])
        gz[d].sub_(from_above)
        gz[d - 1].add_(from_above)
    tp.zero_dropped(gz)
    g.scatter_add_(0, tp.path, gz)
    tp.zero_dropped(g)
    if g.data_ptr() != out.data_ptr():
        out.copy_(g)


def _backward(x, lc, plan, gamma, reduction, weight, has_partial, grad_out):
    B, N, P = x.shape
    ct = compute_dtype(x.dtype)
    per_channel = None
    if reduction != "none":
        per_channel = _reduction_scales(lc, plan, reduction, ct) * grad_out.to(ct)
        if weight is not None:
            per_channel = per_channel * weight.to(ct)
    if _one_tile(x):
        up = None
        if reduction == "none":
            up = _batch_as_tile(grad_out).to(ct)
            if weight is not None:
                up = up * weight.to(ct).view(N, 1)
        grad = torch.empty(N, B * P, dtype=x.dtype, device=x.device)
        _backward_tile(_batch_as_tile(x), lc.reshape(-1), plan, gamma, has_partial, up, per_channel,
                       _Scratch(N, plan.max_kids, B * P, ct, x.device), grad)
        return grad.view(N, B, P).transpose(0, 1).contiguous()
    grad = torch.empty(B, N, P, dtype=x.dtype, device=x.device)
    step = _tile_pixels(N, x.device)
    scratch = _Scratch(N, plan.max_kids, min(step, P), ct, x.device)
    for b, p in _tiles(B, P, step):
        up = None
        if reduction == "none":
            up = grad_out[b, :, p].to(ct)
            if weight is not None:
                up = up * weight.to(ct).view(N, 1)
        _backward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial, up, per_channel,
                       scratch.cut(p.stop - p.start), grad[b, :, p])
    return grad


class _TreeMinFunction(torch.autograd.Function):
    """Saves the logits and label channels only; backward recomputes zmax and the routing."""

    @staticmethod
    def forward(ctx, x, lc, weight, plan, gamma, reduction, has_partial):
        ctx.save_for_backward(x, lc, weight)
        ctx.config = (plan, gamma, reduction, has_partial)
        return _forward(x, lc, plan, gamma, reduction, weight, has_partial)

    @staticmethod
    def backward(ctx, grad_out):
        x, lc, weight = ctx.saved_tensors
        plan, gamma, reduction, has_partial = ctx.config
        grad = _backward(x, lc, plan, gamma, reduction, weight, has_partial, grad_out)
        return grad, None, None, None, None, None, None


def tree_min_op(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy, *,
                gamma: float, reduction: str, node_weight: torch.Tensor | None,
                has_partial: bool = True) -> torch.Tensor:
    """Tree-min (``gamma == 0``) or focal tree-min loss. ``label_channels`` int64 ``[B, *spatial]``.

    The value is float64 for float64 logits, else float32; the gradient has the logits' dtype.
    ``has_partial=False`` skips the unknown-descendant mask (only valid if no label is internal).
    """
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    P = math.prod(spatial)  # explicit: reshape cannot infer -1 when B = 0
    x = logits.reshape(B, N, P)
    lc = label_channels.reshape(B, P)
    plan = plan_for(hierarchy, logits.device)
    out = _TreeMinFunction.apply(x, lc, node_weight, plan, float(gamma), reduction, bool(has_partial))
    return out.reshape(B, N, *spatial) if reduction == "none" else out


# ---------------------------------------------------------------------------- targets
def expand_targets_op(label_channels: torch.Tensor, hierarchy: Hierarchy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets uint8, mask bool)`` ``[B, N, *spatial]`` from label channels (-1 = ignored)."""
    plan = plan_for(hierarchy, label_channels.device)
    B = label_channels.shape[0]
    spatial = label_channels.shape[1:]
    lc = label_channels.reshape(B, math.prod(spatial))
    lab = _Labels(lc, plan)
    N = plan.num_nodes
    positive = torch.zeros(B, N, lc.shape[1], dtype=torch.bool, device=lc.device)
    positive.scatter_(1, lab.path, True)  # the padding repeats c itself, which is positive too
    positive &= lab.valid.unsqueeze(1)
    mask = ~_unknown_mask(lc, plan) & lab.valid.unsqueeze(1)
    return positive.to(torch.uint8).reshape(B, N, *spatial), mask.reshape(B, N, *spatial)


# ---------------------------------------------------------------------------- decoding
def _path_sums(scores: torch.Tensor, plan: Plan) -> torch.Tensor:
    out = scores.clone()
    for lv, par in zip(plan.levels[1:], plan.level_parents[1:], strict=True):
        out.index_copy_(1, lv, out.index_select(1, par).add_(scores.index_select(1, lv)))
    return out


def _best_leaf(path_scores: torch.Tensor, plan: Plan) -> torch.Tensor:
    leaves = plan.leaf_sorted
    return leaves[path_scores.index_select(1, leaves).argmax(dim=1)]  # argmax: first max = lowest channel


def _top_down(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    top = torch.sort(plan.levels[0]).values
    chosen = top[x.index_select(1, top).argmax(dim=1)]  # [B, P]
    for _ in range(plan.max_depth - 1):
        cand = plan.children_table[chosen].permute(0, 2, 1)  # [B, Cmax, P], padded with the node itself
        vals = torch.gather(x, 1, cand).masked_fill_(cand == chosen.unsqueeze(1), -math.inf)
        step = torch.gather(cand, 1, vals.argmax(dim=1, keepdim=True)).squeeze(1)
        chosen = torch.where(plan.is_leaf[chosen], chosen, step)
    return chosen


def decode_op(logits: torch.Tensor, hierarchy: Hierarchy, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf node ids [B, *spatial], depth node ids [B, L, *spatial])`` (int64)."""
    plan = plan_for(hierarchy, logits.device)
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    with torch.no_grad():
        x = logits.detach().reshape(B, N, math.prod(spatial)).to(compute_dtype(logits.dtype))
        if method == "independent":
            per_depth = [dc[x.index_select(1, dc).argmax(dim=1)] for dc in plan.depth_channels]
            depth_ch = torch.stack(per_depth, dim=1)
            leaf = per_depth[-1]
        else:
            if method == "path":
                leaf = _best_leaf(_path_sums(x, plan), plan)
            elif method == "hssn":
                leaf = _best_leaf(_path_sums(torch.softmax(x, dim=1), plan), plan)
            else:
                leaf = _top_down(x, plan)
            depth_ch = plan.ancestor_table[leaf].permute(0, 2, 1)
        L = plan.max_depth
        return (plan.node_ids[leaf].reshape(B, *spatial),
                plan.node_ids[depth_ch].reshape(B, L, *spatial))


def path_scores_op(logits: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """Leaf scores ``[B, K, *spatial]`` in leaf-id order: the sum of ``logits`` along each leaf's path
    (root first, in the compute dtype; differentiable). Their argmax over dim 1 is the leaf that
    ``decode_op(logits, hierarchy, "path")`` picks (as a position in leaf-id order)."""
    plan = plan_for(hierarchy, logits.device)
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    x = logits.reshape(B, N, math.prod(spatial)).to(compute_dtype(logits.dtype))
    leaves = plan.leaf_channels  # [K]: channel of leaf id k
    return _path_sums(x, plan).index_select(1, leaves).reshape(B, leaves.numel(), *spatial)


# ---------------------------------------------------------------------------- cross-entropy per depth
def depth_cross_entropy_op(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy,
                           depth: int) -> torch.Tensor:
    """Mean cross-entropy over the classes at ``depth`` (``hierarchy.depth_channels[depth-1]``).

    The target is the labelled node's ancestor at that depth; ignored pixels and partial labels
    coarser than ``depth`` do not count. No valid pixel gives an exact 0 connected to the logits.
    """
    plan = plan_for(hierarchy, logits.device)
    B, N = logits.shape[:2]
    ct = compute_dtype(logits.dtype)
    classes = plan.depth_channels[depth - 1]
    P = math.prod(logits.shape[2:])  # explicit: reshape cannot infer -1 when B = 0
    x = logits.reshape(B, N, P).index_select(1, classes).to(ct)
    lc = label_channels.reshape(B, P)
    safe = lc.clamp(min=0)
    target_ch = plan.ancestor_table[safe, depth - 1]
    known = (lc >= 0) & (plan.is_leaf[safe] | (plan.depth[safe] >= depth))
    position = torch.full((N,), -1, dtype=torch.int64, device=lc.device)
    position[classes] = torch.arange(classes.numel(), device=lc.device)
    target = torch.where(known, position[target_ch], torch.full_like(lc, -100))
    total = torch.nn.functional.cross_entropy(x, target, ignore_index=-100, reduction="sum")
    return total / known.sum().clamp(min=1).to(ct)


# ---------------------------------------------------------------------------- triplet loss
# The local op runs without reading anything back to the host (except "random" with an int seed,
# which reads one count for the core's permutation): what depends only on the hierarchy is a cached
# table, and the data-dependent sizes are replaced by fixed-size buffers with a validity mask. The
# taking-part pixels come first in a length-P "sequence" (P = all pixels; the others follow as a
# sentinel class K in a sentinel group G), counts are read off sorted keys with searchsorted, and the
# triplets live in S = min(K * max_per_class, P) slots: class after class, the i-th triplet of a class
# in its i-th slot, the unused slots last (class K, invalid, contributing an exact 0).
def resize_labels_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resampling of ``[B, H, W]`` to ``size`` with ``F.interpolate(mode="nearest")``'s rule,
    computed in float32: row i takes ``min(floor(i * float32(H / h)), H - 1)`` (same as hieraloss.numpy)."""
    H, W = labels.shape[-2:]
    h, w = size

    def source(n_in: int, n_out: int) -> torch.Tensor:
        import numpy as np

        # float32(n_in / n_out) as a Python number (exact in float32): no host-to-device copy.
        scale = float(np.float32(n_in / n_out))
        idx = torch.arange(n_out, dtype=torch.float32, device=labels.device) * scale
        return idx.floor_().long().clamp_(max=n_in - 1)

    return labels.index_select(-2, source(H, h)).index_select(-1, source(W, w))


class TripletTables:
    """What the triplet selection needs of a hierarchy, built once per device on the host.

    ``group [K + 1]``: sibling group of each leaf (leaves sharing a parent, the implicit root counting
    as one; :func:`hieraloss.core.triplets.sibling_groups`) and ``G`` for the sentinel class K;
    ``num_groups``: G; ``leaf_distance [K + 1, K + 1]``: psi between leaves, 0 in the sentinel row
    and column; ``class_ids [K + 2]`` and ``group_ids [G + 2]``: ``arange`` for the searchsorted counts.
    """

    def __init__(self, tab: DeviceTables):
        import numpy as np

        h: Hierarchy = tab.hierarchy
        dev = tab.device
        K = h.num_leaves
        group = core_triplets.sibling_groups(h)
        self.num_leaves = K
        self.num_groups = G = int(group.max()) + 1 if K else 0
        self.group = torch.tensor(np.append(group, G), dtype=torch.int64, device=dev)
        psi = np.zeros((K + 1, K + 1), dtype=np.int64)
        psi[:K, :K] = np.asarray(h.leaf_distance)
        self.leaf_distance = torch.tensor(psi, device=dev)
        self.class_ids = torch.arange(K + 2, dtype=torch.int64, device=dev)
        self.group_ids = torch.arange(G + 2, dtype=torch.int64, device=dev)


def triplet_tables(hierarchy: Hierarchy, device: torch.device) -> TripletTables:
    return cached_on(hierarchy, device, "_triplet", TripletTables)


def triplet_op(embeddings: torch.Tensor, leaf: torch.Tensor, hierarchy: Hierarchy, *,
               max_per_class: int, base_margin: float, sampling: str,
               generator: Any) -> torch.Tensor:
    """Hierarchy-margin triplet loss; ``leaf`` ``[B, h, w]`` holds leaf ids, -1 where not taking part.

    No host sync, except for ``sampling="random"`` with a numpy Generator (an int seed): the number
    of taking-part pixels is read back for the core's permutation (:func:`key_order`).
    """
    ct = compute_dtype(embeddings.dtype)
    flat = leaf.reshape(-1)
    if flat.numel() == 0:
        return embeddings.reshape(-1)[:0].sum().to(ct)  # an exact 0 still connected to the embeddings
    pixels = key_order(flat, sampling, generator)
    chosen = triplet_select(flat, pixels, hierarchy, max_per_class=max_per_class)
    e_a, e_p, e_n = unit_rows(embeddings, (chosen.anchor, chosen.positive, chosen.negative), ct)
    return triplet_score(e_a, e_p, e_n, chosen, hierarchy, base_margin)


def unit_rows(embeddings: torch.Tensor, at: tuple[torch.Tensor, ...], ct: torch.dtype) -> list[torch.Tensor]:
    """``[S, C]`` rows of the embeddings ``[B, C, h, w]`` L2-normalised along C, at the flat pixel
    positions of each index tensor of ``at``; no sync.

    Only the pixels used are normalised, each once: ``min(#indices, P)`` distinct pixels are gathered
    (the used ones in ascending order, then unused ones as padding). Values and gradients are bitwise
    those of normalising the whole map and indexing its rows, on the CPU: the reduction over C runs
    in the same memory order as on the map (strided when C is not the innermost dimension of
    ``embeddings``), and the rows of a pixel used several times add up their gradients before the
    normalisation's backward, as indexing the whole map does.
    """
    B, C, h, w = embeddings.shape
    P = B * h * w
    idx = torch.cat(at)
    U = min(idx.numel(), P)
    if U == 0:
        return [embeddings.reshape(-1)[:0].to(ct).view(0, C) for _ in at]
    used = torch.zeros(P, dtype=torch.bool, device=embeddings.device).index_fill_(0, idx, True)
    order, ahead = _partition(used)
    pix = order[:U]
    maps = embeddings.reshape(B, C, h * w)  # a view unless the embeddings are a non-dense view
    columns = maps.stride(1) != 1  # C strided: reduce down columns [C, U], else along rows [U, C]
    x = _PixelVectors.apply(maps, pix // (h * w), pix % (h * w), columns).to(ct)
    unit = torch.nn.functional.normalize(x, dim=0 if columns else 1, eps=1e-12)
    if columns:
        unit = unit.t()
    row = ahead - 1  # row of each used pixel in ``unit``
    return [embedding_rows(unit, row[a]) for a in at]


class _PixelVectors(torch.autograd.Function):
    """The vectors of distinct pixels ``(b, q)`` of ``[B, C, h*w]`` maps: ``[C, U]`` (``columns``) or
    ``[U, C]``. The pixels being distinct, backward writes the gradient into zeros with a plain
    ``index_put_`` (no accumulation: no atomics on the CPU, no sort on CUDA)."""

    @staticmethod
    def forward(ctx, maps, b, q, columns):
        ctx.save_for_backward(b, q)
        dense = maps.is_contiguous() or maps.transpose(1, 2).is_contiguous()
        ctx.layout = (maps.shape, maps.stride() if dense else None, columns)
        return maps.transpose(0, 1)[:, b, q] if columns else maps[b, :, q]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        b, q = ctx.saved_tensors
        shape, stride, columns = ctx.layout
        if stride is None:  # the gradient of a non-dense view: contiguous, as autograd would make it
            out = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
        else:  # the embeddings' layout, so that AccumulateGrad takes it without a copy
            out = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).zero_()
        if columns:
            out.transpose(0, 1)[:, b, q] = grad
        else:
            out[b, :, q] = grad
        return out, None, None, None


def embedding_rows(emb: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``emb[at]`` with a deterministic backward: on the CPU through ``index_select`` (its backward,
    ``index_add_``, adds the rows in index order, where indexing's backward adds float32 rows from
    several threads with atomics), elsewhere by indexing (CUDA sorts the indices to accumulate)."""
    return emb.index_select(0, at) if emb.device.type == "cpu" else emb[at]


def taking_part_first(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [P], n)``: the flat positions of the taking-part pixels (``flat >= 0``) in flat order,
    then those of the others in flat order; ``n`` (a 1-element tensor) counts the former. No sync."""
    order, ahead = _partition(flat >= 0)
    return order, ahead[-1:]


def _partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, ahead)`` for a 1-d bool ``mask``: the positions where it holds in ascending order,
    then the others in ascending order; ``ahead = cumsum(mask)``. A scatter, no sort, no sync."""
    ahead = torch.cumsum(mask, 0)
    idx = torch.arange(mask.numel(), device=mask.device)
    slot = torch.where(mask, ahead - 1, idx - ahead + ahead[-1:])
    return torch.empty_like(idx).scatter_(0, slot, idx), ahead


def shuffle_taking_part(pixels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``pixels`` (from :func:`taking_part_first`) with its first ``n = order.numel()`` entries, the
    taking-part pixels, taken in ``order`` (a permutation of ``range(n)``)."""
    n = order.numel()
    return torch.cat([pixels[:n][order], pixels[n:]])


# Random sort keys are drawn in [0, KEY_RANGE); pixels that do not take part get KEY_RANGE.
KEY_RANGE = 1 << 62


def key_order(flat: torch.Tensor, sampling: str, generator: Any) -> torch.Tensor:
    """The key order ``[P]`` of the triplet selection for the flat leaf map ``flat`` (-1 = not taking
    part): the taking-part pixels in key order, then the others in flat order.

    ``"first"``: flat order. ``"random"`` with a ``torch.Generator`` or None (torch's default
    generator of ``flat``'s device): the pixels sorted by random int64 keys drawn from it, one per
    pixel (``torch.randint(0, 2**62, (P,))`` on the generator's device; ties, about P**2 / 2**63 likely,
    keep flat order) - a uniform random order with no host sync. With a numpy Generator (what the
    door makes of an int seed): the core's permutation of the n taking-part pixels
    (:func:`hieraloss.core.triplets.random_order`, the draw of every backend); n is read back.
    """
    if sampling == "first" or flat.numel() == 0:
        return taking_part_first(flat)[0]
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else flat.device
        keys = torch.randint(0, KEY_RANGE, (flat.numel(),), generator=generator, device=device).to(flat.device)
        keys = torch.where(flat >= 0, keys, KEY_RANGE)
        return torch.sort(keys, stable=True).indices
    pixels, n = taking_part_first(flat)
    order = torch.from_numpy(core_triplets.random_order(int(n), generator)).to(flat.device)
    return shuffle_taking_part(pixels, order)


def _ith_outside(members_pos: torch.Tensor, rank: torch.Tensor, seg_of_member: torch.Tensor,
                 seg_start: torch.Tensor, seg_of_query: torch.Tensor, i: torch.Tensor, stride: int) -> torch.Tensor:
    """Position of the i-th element (0-based) *outside* a segment of a sequence.

    ``members_pos`` holds, segment after segment (``seg_of_member`` ascending, segments starting at
    ``seg_start``), the ascending sequence positions q_k of each segment's members, ``rank`` their
    k (0-based within the segment); the i-th non-member sits at ``i + #{k : q_k - k <= i}``.
    Segments are made globally sortable by adding ``segment * stride`` (``stride`` > every position
    and every ``i``).
    """
    key = members_pos - rank + seg_of_member * stride
    found = torch.searchsorted(key, i + seg_of_query * stride, right=True) - seg_start[seg_of_query]
    return i + found


class Triplets:
    """Fixed-size triplet slots (``S = min(K * max_per_class, P)``; see :func:`triplet_select`).

    ``slot_cls [S]``: anchor class of each slot, K on the unused ones; ``anchor``, ``positive``,
    ``negative [S]``: flat positions of the three pixels (in range but arbitrary on unused slots);
    ``positive_cls``, ``negative_cls [S]``: their leaf ids (K on unused slots); ``valid [S]``: the
    slot holds a triplet (exactly the first ``T.sum()`` slots); ``T [K + 1]``: triplets per anchor
    class (0 for the sentinel class K).
    """

    __slots__ = ("slot_cls", "anchor", "positive", "negative", "positive_cls", "negative_cls", "valid", "T")

    def __init__(self, slot_cls, anchor, positive, negative, positive_cls, negative_cls, valid, T):
        self.slot_cls, self.anchor, self.positive, self.negative = slot_cls, anchor, positive, negative
        self.positive_cls, self.negative_cls, self.valid, self.T = positive_cls, negative_cls, valid, T

    def take(self, n: int) -> Triplets:
        """The first ``n`` slots (``n = T.sum()`` keeps exactly the triplets)."""
        return Triplets(*(getattr(self, f)[:n] for f in self.__slots__[:-1]), self.T)


def triplet_select(flat: torch.Tensor, pixels: torch.Tensor, hierarchy: Hierarchy, *,
                   max_per_class: int) -> Triplets:
    """Choose the triplets without a host sync: ``flat`` ``[P]`` holds a leaf id per pixel (-1 = not
    taking part); ``pixels`` ``[P]`` is the key order: the positions of the taking-part pixels (flat
    order for ``sampling="first"``, a random permutation otherwise), then all the others.

    Class c gets ``T[c] = min(max_per_class, #anchors, #positives, #negatives)`` triplets, the i-th
    pairing the i-th anchor, positive and negative in key order; they fill slots
    ``cumsum(T)[c - 1] + i`` of ``S = min(K * max_per_class, P)`` slots (a bound on ``sum(T)``
    known from shapes). All classes are handled at once: the i-th anchor / positive / negative of
    every class is located by sorting and searching, with no loop over classes.
    """
    tt = triplet_tables(hierarchy, flat.device)
    dev = flat.device
    K = tt.num_leaves
    P = flat.numel()
    S = min(K * max_per_class, P)
    stride = P + 1
    last = P - 1

    seq_cls = flat[pixels]  # key order; -1 (not taking part) only after the taking-part pixels
    seq_cls = torch.where(seq_cls >= 0, seq_cls, K)
    seq_grp = tt.group[seq_cls]
    cls_sorted, by_cls = torch.sort(seq_cls, stable=True)  # key order inside each class
    grp_sorted, by_grp = torch.sort(seq_grp, stable=True)  # key order inside each group
    cls_bound = torch.searchsorted(cls_sorted, tt.class_ids)  # [K + 2]
    grp_bound = torch.searchsorted(grp_sorted, tt.group_ids)  # [G + 2]
    cls_start, grp_start = cls_bound[:-1], grp_bound[:-1]
    n_cls = cls_bound[1:] - cls_start  # [K + 1], the sentinel class counts the others
    n_grp = grp_bound[1:] - grp_start  # [G + 1]
    n_pix = cls_bound[K]  # taking-part pixels
    grp_of_cls = n_grp[tt.group]
    n_pos = grp_of_cls - n_cls  # 0 for the sentinel class (its T is 0)
    n_neg = n_pix - grp_of_cls
    T = torch.minimum(torch.minimum(n_cls, n_pos), n_neg).clamp_(0, max_per_class)  # sentinel: n_neg may be < 0

    ends = torch.cumsum(T, 0)
    slot = torch.arange(S, device=dev)
    slot_cls = torch.searchsorted(ends, slot, right=True).clamp_(max=K)
    slot_i = slot - (ends - T)[slot_cls]
    valid = slot_cls < K
    slot_grp = tt.group[slot_cls]

    a_at = by_cls[(cls_start[slot_cls] + slot_i).clamp_(max=last)]

    # Negatives: the i-th pixel outside the anchor's group, in key order.
    idx = torch.arange(P, device=dev)
    grp_rank = idx - grp_start[grp_sorted]  # rank of by_grp[k] inside its group
    n_at = _ith_outside(by_grp, grp_rank, grp_sorted, grp_start, slot_grp, slot_i, stride).clamp_(max=last)

    # Positives: the i-th pixel of the anchor's group that is not of the anchor's class.
    in_grp = torch.empty_like(idx).scatter_(0, by_grp, grp_rank)  # per sequence position: rank in its group
    cls_rank = idx - cls_start[cls_sorted]
    pos_local = _ith_outside(in_grp[by_cls], cls_rank, cls_sorted, cls_start, slot_cls, slot_i, stride)
    p_at = by_grp[(grp_start[slot_grp] + pos_local).clamp_(max=last)]
    return Triplets(slot_cls, pixels[a_at], pixels[p_at], pixels[n_at], seq_cls[p_at], seq_cls[n_at], valid, T)


def triplet_score(e_a: torch.Tensor, e_p: torch.Tensor, e_n: torch.Tensor, chosen: Triplets,
                  hierarchy: Hierarchy, base_margin: float) -> torch.Tensor:
    """Mean over classes of the mean ``relu(d(a,p) - d(a,n) + m)`` of unit embedding rows (one row
    per slot of ``chosen``); unused slots contribute an exact 0, no triplet at all gives 0. No sync."""
    tt = triplet_tables(hierarchy, e_a.device)
    ct = e_a.dtype
    psi = tt.leaf_distance
    cls = chosen.slot_cls
    margin = base_margin + (psi[cls, chosen.negative_cls] - psi[cls, chosen.positive_cls]).to(ct) / (
        2.0 * hierarchy.max_depth)
    d_ap = 1.0 - (e_a * e_p).sum(dim=1)
    d_an = 1.0 - (e_a * e_n).sum(dim=1)
    per_triplet = torch.where(chosen.valid, torch.relu(d_ap - d_an + margin), 0.0)
    T = chosen.T
    # Class by class in slot order (index_add_ on the CPU adds in index order: unused slots, all in
    # the sentinel class K, add nothing to the real classes).
    per_class = torch.zeros(T.numel(), dtype=ct, device=e_a.device).index_add_(0, cls, per_triplet)
    has = T > 0
    # The mean over classes sums all K + 1 class means, 0 where a class has no triplet: the same
    # numbers as summing only the classes with triplets, but torch's vectorised sum may associate
    # them differently, so the value can differ from that in the last bit (the gradient cannot).
    class_mean = torch.where(has, per_class / T.clamp(min=1).to(ct), 0.0)
    return class_mean.sum() / has.sum().clamp(min=1).to(ct)
