"""Vectorized torch ops (no validation: the functional API checks inputs first).

Everything works in channel space on logits viewed as ``[B, N, P]`` (P = all spatial positions)
and label channels ``[B, P]`` (-1 = ignored). Sweeps go one node or depth at a time, so
the work is O(N * depth) per pixel and no ``[B, N, N, P]`` or ``[B, N, Dmax, P]`` tensor is built.

Tree-min loss, split into the two kinds of entries of a valid pixel with label channel c:

* negatives: every entry first gets the negative term at ``zmax`` (leaves are their own zmax;
  only the internal rows are swept bottom-up, one node at a time over its children, or for trees
  with many children to gather one depth at a time with a max-reduce, see
  ``hieraloss.core.blocks.SWEEP_BY_DEPTH_MIN_GATHERED``);
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

import torch

from ...hierarchy import Hierarchy
from . import route
from .device import DevicePlan, compute_dtype, device_plan, reduction_scales, sweep_by_depth
from .labels import check_label_values, label_channels
from .native import tree_min_native


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

    def __init__(self, lc: torch.Tensor, plan: DevicePlan):
        B, P = lc.shape
        self.valid = lc >= 0
        safe = lc.clamp(min=0).reshape(-1)
        L = plan.max_depth  # explicit sizes: view cannot infer -1 when B * P = 0
        self.path = plan.ancestor_table.index_select(0, safe).view(B, P, L).permute(0, 2, 1).contiguous()  # [B, L, P]
        depth_c = plan.depth.index_select(0, safe).view(B, P)
        steps = torch.arange(plan.max_depth, device=lc.device).view(1, -1, 1)
        self.on_path = (steps < depth_c.unsqueeze(1)) & self.valid.unsqueeze(1)  # [B, L, P]


def _unknown_mask(lc: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    """``[B, N, P]`` bool: strict descendants of the label channel (only partial labels have any)."""
    B, P = lc.shape
    unknown = torch.zeros(B, plan.num_nodes, P, dtype=torch.bool, device=lc.device)
    lab = lc.unsqueeze(1)
    for lv, par in zip(plan.levels[1:], plan.level_parents[1:], strict=True):
        below = (par.view(1, -1, 1) == lab) | unknown.index_select(1, par)
        unknown.index_copy_(1, lv, below)
    return unknown


# ---------------------------------------------------------------------------- tree-min op
# Pixels are processed in tiles (see _tile_pixels) so that the temporaries stay small (peak extra
# memory ~ the gradient) while each op still has enough work to amortise its dispatch. The loops
# over nodes use dense float ops only (min/max/eq/mul/addcmul): on CPU, masked_fill/where on bool
# masks and gather/scatter cost several times more per element.
TILE_ELEMENTS = 1 << 23  # CPU: a cap on the (pixel, node) entries of a tile (32 MB of float32) ...
TILE_PIXELS = 1 << 16  # ... and on its pixels: the fastest on 2 cores for 26 and 149 nodes
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


def _internal_zmax(x: torch.Tensor, plan: DevicePlan, s: _Scratch) -> None:
    """``s.z[v] = zmax_v = max(x_v, zmax of v's children)`` for the internal rows of a tile ``x``
    ``[N, T]``, bottom-up (leaves are their own zmax and stay in ``x``)."""
    if sweep_by_depth(plan):
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


def _internal_zmax_by_level(x: torch.Tensor, plan: DevicePlan, s: _Scratch) -> None:
    """:func:`_internal_zmax` one depth at a time: ``s.z`` takes every row (a leaf's is its logit),
    and each depth's zmax is max-reduced into its parents' rows (NaN propagates, as in
    ``torch.maximum``)."""
    s.z.copy_(x)
    T = x.shape[1]
    for d in range(plan.max_depth - 1, 0, -1):  # nodes at depth d + 1 into their parents at depth d
        below = s.z.index_select(0, plan.levels[d])
        s.z.scatter_reduce_(0, plan.level_parents[d].unsqueeze(1).expand(-1, T), below, "amax")


def _route_zmax_gradient_by_level(x: torch.Tensor, g: torch.Tensor, plan: DevicePlan, s: _Scratch) -> None:
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


def _route_zmax_gradient(x: torch.Tensor, g: torch.Tensor, plan: DevicePlan, s: _Scratch) -> None:
    """Turn d loss / d zmax (``g`` ``[N, T]``) into d loss / d x in place, top-down: a node keeps
    its gradient where it attains its own zmax (it wins ties), else passes it to the first child in
    channel order that attains it (the tie rule of DEVELOPING.md)."""
    if sweep_by_depth(plan):
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


def _zmax_rows(x: torch.Tensor, plan: DevicePlan, s: _Scratch):
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

    def __init__(self, lc: torch.Tensor, plan: DevicePlan, ct: torch.dtype):
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


def _zero_unknown(t: torch.Tensor, tp: _TilePath, plan: DevicePlan) -> None:
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
    scale = reduction_scales(lc, plan, reduction, ct)
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
        per_channel = reduction_scales(lc, plan, reduction, ct) * grad_out.to(ct)
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
    plan = device_plan(hierarchy, logits.device)
    out = _TreeMinFunction.apply(x, lc, node_weight, plan, float(gamma), reduction, bool(has_partial))
    return out.reshape(B, N, *spatial) if reduction == "none" else out


# ---------------------------------------------------------------------------- targets
def expand_targets_op(label_channels: torch.Tensor, hierarchy: Hierarchy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets uint8, mask bool)`` ``[B, N, *spatial]`` from label channels (-1 = ignored)."""
    plan = device_plan(hierarchy, label_channels.device)
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


def tree_min(x: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, gamma: float, ignore_index: int,
             reduction: str, node_weight: torch.Tensor | None, backend: str, check_labels: bool) -> torch.Tensor:
    """The tree-min loss of node-id ``labels`` (checked at the door but for their values), on the
    implementation :mod:`.route` picks: the fused Triton kernel (which maps the labels itself), the
    compiled CPU kernel or :func:`tree_min_op`."""
    if route.use_triton(backend, x, hierarchy):
        if check_labels:
            check_label_values(labels, hierarchy, ignore_index)
        total, _ = route.kernels().fused_objective(x, labels, hierarchy, ignore_index=ignore_index, gamma=gamma,
                                                   reduction=reduction, node_weight=node_weight)
        return total
    lc, has_partial = label_channels(labels, hierarchy, ignore_index, check_labels)
    if route.use_native(backend, x) and x.numel() > 0:  # no pixel: the op's exact 0 (or empty map)
        return tree_min_native(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=node_weight)
    return tree_min_op(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=node_weight,
                       has_partial=has_partial)
