"""Vectorized torch ops (no validation: the functional API checks inputs first).

Everything works in channel space on logits viewed as ``[B, N, P]`` (P = all spatial positions)
and label channels ``[B, P]`` (-1 = ignored). Sweeps go one node or depth at a time, so
the work is O(N * depth) per pixel and no ``[B, N, N, P]`` or ``[B, N, Dmax, P]`` tensor is built.

Tree-min loss, split into the two kinds of entries of a valid pixel with label channel c:

* negatives: every entry first gets the negative term at ``zmax`` (leaves are their own zmax;
  only the internal rows are swept bottom-up, one node at a time over its children);
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

from ..hierarchy import Hierarchy
from ..numpy.losses import HSSN_SCALE, counted_entries_per_depth
from ._tables import DeviceTables, tables_for


# ---------------------------------------------------------------------------- per-device plan
class Plan:
    """Index tensors for level-by-level sweeps of one hierarchy on one device (channel space).

    ``levels[d-1]``: channels at depth d; ``level_parents[d-1]``: their parents. ``bottom_up``:
    ``(v, children, child_is_leaf, leaf_slice_or_None)`` per internal node, deepest first.
    """

    def __init__(self, tab: DeviceTables):
        h: Hierarchy = tab.hierarchy
        dev = tab.device
        long = dict(dtype=torch.int64, device=dev)
        self.num_nodes = h.num_nodes
        self.max_depth = h.max_depth
        self.levels = []
        self.level_parents = []
        for d in range(1, h.max_depth + 1):
            lv = [v for v in range(h.num_nodes) if h.depth[v] == d]
            self.levels.append(torch.tensor(lv, **long))
            self.level_parents.append(torch.tensor([int(h.parent[v]) for v in lv], **long))
        # Tree-min schedule: internal nodes deepest first, each with its children in channel order
        # (the zmax tie order) and, when they are leaves with consecutive channels, that slice.
        internal = sorted((v for v in range(h.num_nodes) if not h.is_leaf[v]), key=lambda v: (-int(h.depth[v]), v))
        self.bottom_up = []
        for v in internal:
            kids = [int(k) for k in h.children[v]]
            kid_is_leaf = [bool(h.is_leaf[k]) for k in kids]
            consecutive = all(kid_is_leaf) and kids == list(range(kids[0], kids[-1] + 1))
            self.bottom_up.append((v, kids, kid_is_leaf, slice(kids[0], kids[-1] + 1) if consecutive else None))
        self.top_down = self.bottom_up[::-1]
        self.max_kids = max((len(kids) for _, kids, _, _ in self.bottom_up), default=1)
        # Runs of consecutive channels that are all leaves or all internal (one run each by default).
        self.runs = []
        for c in range(h.num_nodes):
            leaf = bool(h.is_leaf[c])
            if self.runs and self.runs[-1][1] == leaf:
                self.runs[-1] = ((self.runs[-1][0][0], c + 1), leaf)
            else:
                self.runs.append(((c, c + 1), leaf))
        # path_real[c, d]: 1 where ancestor_table[c, d] is a real path entry (d < depth(c)), 0 on the padding.
        self.path_real = torch.tensor([[float(d < h.depth[c]) for d in range(h.max_depth)]
                                       for c in range(h.num_nodes)], dtype=torch.float64, device=dev)
        self.ancestor_table = tab.ancestor_table  # [N, L]
        self.ancestor_columns = tab.ancestor_table.t().contiguous()  # [L, N]
        self.depth = tab.depth  # [N]
        self.node_ids = tab.node_ids
        self.is_leaf = tab.is_leaf
        self.is_internal = ~tab.is_leaf
        self.children_table = tab.children_table
        self.leaf_sorted = torch.sort(tab.leaf_channels).values
        self.depth_channels = [torch.tensor(dc, **long) for dc in h.depth_channels]
        self.counted_per_depth = torch.tensor(counted_entries_per_depth(h), device=dev)  # [N, L] float64


def plan_for(hierarchy: Hierarchy, device: torch.device) -> Plan:
    return tables_for(hierarchy, device).get("_plan", Plan)


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
        self.path = plan.ancestor_table.index_select(0, safe).view(B, P, -1).permute(0, 2, 1).contiguous()  # [B, L, P]
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
    # Valid pixels per label channel; index 0 of the shifted bincount counts the ignored ones.
    hist = torch.bincount(lc.reshape(-1) + 1, minlength=N + 1)[1:].to(torch.float64)
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
    pass over the tile is cheaper than stalling the device."""
    return t.device.type == "cpu"


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


def _internal_zmax(x: torch.Tensor, plan: Plan, s: _Scratch) -> None:
    """``s.z[v] = zmax_v = max(x_v, zmax of v's children)`` for the internal rows of a tile ``x``
    ``[N, T]``, bottom-up (leaves are their own zmax and stay in ``x``)."""
    for v, kids, kid_is_leaf, block in plan.bottom_up:
        zv = s.z[v]
        if block is not None:
            torch.amax(x[block], dim=0, out=zv)
        else:
            zv.copy_(x[kids[0]] if kid_is_leaf[0] else s.z[kids[0]])
            for k, leaf in zip(kids[1:], kid_is_leaf[1:], strict=True):
                torch.maximum(zv, x[k] if leaf else s.z[k], out=zv)
        torch.maximum(zv, x[v], out=zv)


def _route_zmax_gradient(x: torch.Tensor, g: torch.Tensor, plan: Plan, s: _Scratch) -> None:
    """Turn d loss / d zmax (``g`` ``[N, T]``) into d loss / d x in place, top-down: a node keeps
    its gradient where it attains its own zmax (it wins ties), else passes it to the first child in
    channel order that attains it (the tie rule of DEVELOPING.md)."""
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


def _forward(x, lc, plan, gamma, reduction, weight, has_partial):
    B, N, P = x.shape
    ct = compute_dtype(x.dtype)
    step = _tile_pixels(N, x.device)
    scratch = _Scratch(N, plan.max_kids, min(step, P), ct, x.device)
    if reduction == "none":
        out = torch.empty(B, N, P, dtype=ct, device=x.device)
        for b, p in _tiles(B, P, step):
            _forward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial, scratch.cut(p.stop - p.start),
                          out[b, :, p], weight)
        return out
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
    grad = torch.empty(B, N, P, dtype=x.dtype, device=x.device)
    step = _tile_pixels(N, x.device)
    scratch = _Scratch(N, plan.max_kids, min(step, P), ct, x.device)
    per_channel = None
    if reduction != "none":
        per_channel = _reduction_scales(lc, plan, reduction, ct) * grad_out.to(ct)
        if weight is not None:
            per_channel = per_channel * weight.to(ct)
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
    x = logits.reshape(B, N, -1)
    lc = label_channels.reshape(B, -1)
    plan = plan_for(hierarchy, logits.device)
    out = _TreeMinFunction.apply(x, lc, node_weight, plan, float(gamma), reduction, bool(has_partial))
    return out.reshape(B, N, *spatial) if reduction == "none" else out


# ---------------------------------------------------------------------------- targets
def expand_targets_op(label_channels: torch.Tensor, hierarchy: Hierarchy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets uint8, mask bool)`` ``[B, N, *spatial]`` from label channels (-1 = ignored)."""
    plan = plan_for(hierarchy, label_channels.device)
    B = label_channels.shape[0]
    spatial = label_channels.shape[1:]
    lc = label_channels.reshape(B, -1)
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
        x = logits.detach().reshape(B, N, -1).to(compute_dtype(logits.dtype))
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
    x = logits.reshape(B, N, -1).index_select(1, classes).to(ct)
    lc = label_channels.reshape(B, -1)
    safe = lc.clamp(min=0)
    target_ch = plan.ancestor_table[safe, depth - 1]
    known = (lc >= 0) & (plan.is_leaf[safe] | (plan.depth[safe] >= depth))
    position = torch.full((N,), -1, dtype=torch.int64, device=lc.device)
    position[classes] = torch.arange(classes.numel(), device=lc.device)
    target = torch.where(known, position[target_ch], torch.full_like(lc, -100))
    total = torch.nn.functional.cross_entropy(x, target, ignore_index=-100, reduction="sum")
    return total / known.sum().clamp(min=1).to(ct)


# ---------------------------------------------------------------------------- triplet loss
def resize_labels_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resampling of ``[B, H, W]`` to ``size`` with ``F.interpolate(mode="nearest")``'s rule,
    computed in float32: row i takes ``min(floor(i * float32(H / h)), H - 1)`` (same as hieraloss.numpy)."""
    H, W = labels.shape[-2:]
    h, w = size

    def source(n_in: int, n_out: int) -> torch.Tensor:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        idx = torch.arange(n_out, dtype=torch.float32, device=labels.device) * scale.to(labels.device)
        return idx.floor_().long().clamp_(max=n_in - 1)

    return labels.index_select(-2, source(H, h)).index_select(-1, source(W, w))


def _ith_outside(members_pos: torch.Tensor, seg_start: torch.Tensor, seg_of_query: torch.Tensor,
                 i: torch.Tensor, stride: int) -> torch.Tensor:
    """Position of the i-th element (0-based) *outside* a segment of a sequence.

    ``members_pos`` holds, segment after segment, the ascending sequence positions q_k of each
    segment's members; the i-th non-member sits at ``i + #{k : q_k - k <= i}``. Segments are made
    globally sortable by adding ``segment * stride``.
    """
    k = torch.arange(members_pos.numel(), device=members_pos.device)
    seg = torch.searchsorted(seg_start, k, right=True) - 1
    key = members_pos - (k - seg_start[seg]) + seg * stride
    found = torch.searchsorted(key, i + seg_of_query * stride, right=True) - seg_start[seg_of_query]
    return i + found


def triplet_op(embeddings: torch.Tensor, leaf: torch.Tensor, hierarchy: Hierarchy, *,
               max_per_class: int, base_margin: float, sampling: str,
               generator: torch.Generator | None) -> torch.Tensor:
    """Hierarchy-margin triplet loss; ``leaf`` ``[B, h, w]`` holds leaf ids, -1 where not taking part."""
    C = embeddings.shape[1]
    ct = compute_dtype(embeddings.dtype)
    emb = torch.nn.functional.normalize(embeddings.to(ct), dim=1, eps=1e-12)
    emb = emb.permute(0, 2, 3, 1).reshape(-1, C)
    flat = leaf.reshape(-1)
    pixels = torch.nonzero(flat >= 0).squeeze(1)
    if sampling == "random":
        pixels = pixels[random_order(pixels.numel(), generator, embeddings.device)]
    chosen = triplet_select(flat, pixels, hierarchy, max_per_class=max_per_class)
    if chosen is None:
        return embeddings.reshape(-1)[:0].sum().to(ct)  # an exact 0 still connected to the embeddings
    slot_cls, anchor, positive, negative, T = chosen
    return triplet_score(emb[anchor], emb[positive], emb[negative], slot_cls, flat[positive],
                         flat[negative], T, hierarchy, base_margin)


def random_order(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``randperm(n)`` drawn on the generator's device (CPU without one), moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def triplet_select(flat: torch.Tensor, pixels: torch.Tensor, hierarchy: Hierarchy, *, max_per_class: int):
    """Choose the triplets: ``flat`` holds a leaf id per pixel (-1 = not taking part), ``pixels`` the
    positions of the taking-part pixels in key order (flat order for ``sampling="first"``, a random
    permutation otherwise).

    Returns ``(slot_cls, anchor, positive, negative, T)``: per triplet its anchor class and the flat
    positions of its three pixels, and ``T [K]`` triplets per class; ``None`` without any triplet.
    All classes are handled at once: the i-th anchor / positive / negative of every class is located
    by sorting and searching, with no loop over classes.
    """
    tab = tables_for(hierarchy, flat.device)
    dev = flat.device
    K = hierarchy.num_leaves
    seq_cls = flat[pixels]  # key order
    n_pix = pixels.numel()

    # Sibling groups: leaves sharing a parent (the implicit root is a parent too).
    parent_of_leaf = tab.parent[tab.leaf_channels]  # [K], -1 under the root
    group_of_leaf = torch.unique(parent_of_leaf, return_inverse=True)[1]
    G = int(group_of_leaf.max()) + 1
    seq_grp = group_of_leaf[seq_cls]

    n_cls = torch.bincount(seq_cls, minlength=K)
    n_grp = torch.zeros(G, dtype=torch.int64, device=dev).index_add_(0, group_of_leaf, n_cls)
    n_pos = n_grp[group_of_leaf] - n_cls
    n_neg = n_pix - n_grp[group_of_leaf]
    T = torch.minimum(torch.minimum(n_cls, n_pos), torch.minimum(n_neg, torch.full_like(n_cls, max_per_class)))
    total = int(T.sum())  # the one sync: sizes of the triplet tensors
    if total == 0:
        return None

    cls_start = torch.cumsum(n_cls, 0) - n_cls
    grp_start = torch.cumsum(n_grp, 0) - n_grp
    slot_cls = torch.repeat_interleave(torch.arange(K, device=dev), T, output_size=total)
    slot_i = torch.arange(total, device=dev) - (torch.cumsum(T, 0) - T)[slot_cls]
    slot_grp = group_of_leaf[slot_cls]

    by_cls = torch.sort(seq_cls, stable=True).indices  # key order inside each class
    by_grp = torch.sort(seq_grp, stable=True).indices  # key order inside each group
    anchor = pixels[by_cls[cls_start[slot_cls] + slot_i]]

    # Negatives: the i-th pixel outside the anchor's group, in key order.
    neg_at = _ith_outside(by_grp, grp_start, slot_grp, slot_i, n_pix + 1)
    negative = pixels[neg_at]

    # Positives: the i-th pixel of the anchor's group that is not of the anchor's class.
    local = torch.empty(n_pix, dtype=torch.int64, device=dev)
    local[by_grp] = torch.arange(n_pix, device=dev) - grp_start[seq_grp[by_grp]]  # position inside its group
    pos_local = _ith_outside(local[by_cls], cls_start, slot_cls, slot_i, n_pix + 1)
    positive = pixels[by_grp[grp_start[slot_grp] + pos_local]]
    return slot_cls, anchor, positive, negative, T


def triplet_score(e_a: torch.Tensor, e_p: torch.Tensor, e_n: torch.Tensor, slot_cls: torch.Tensor,
                  cls_p: torch.Tensor, cls_n: torch.Tensor, T: torch.Tensor, hierarchy: Hierarchy,
                  base_margin: float) -> torch.Tensor:
    """Mean over classes of the mean ``relu(d(a,p) - d(a,n) + m)`` of unit embedding rows."""
    tab = tables_for(hierarchy, e_a.device)
    ct = e_a.dtype
    psi = tab.leaf_distance
    margin = base_margin + (psi[slot_cls, cls_n] - psi[slot_cls, cls_p]).to(ct) / (2.0 * hierarchy.max_depth)
    d_ap = 1.0 - (e_a * e_p).sum(dim=1)
    d_an = 1.0 - (e_a * e_n).sum(dim=1)
    per_triplet = torch.relu(d_ap - d_an + margin)
    per_class = torch.zeros(T.numel(), dtype=ct, device=e_a.device).index_add_(0, slot_cls, per_triplet)
    has = T > 0
    return (per_class[has] / T[has].to(ct)).sum() / has.sum().to(ct)
