"""Functional API of the PaddlePaddle backend: validate at the door, then call one op.

Same names, arguments and semantics as ``hieraloss.torch`` (DEVELOPING.md): logits
``[B, N, *spatial]`` in the hierarchy's channel order, labels ``[B, *spatial]`` of node ids.
Loss values are float64 for float64 logits and float32 otherwise (float16/bfloat16 accumulate in
float32); gradients come back in the logits' dtype. Inputs are never modified.

Backends of the tree-min losses: ``"auto"`` picks the fused Triton kernels for GPU tensors (through
DLPack, :mod:`._bridge`) and the compiled CPU kernel for CPU tensors (:mod:`._native_layer`) when
they are available, else the vectorized paddle ops below (``"paddle"``); ``"native"`` and
``"triton"`` force one and raise a ``RuntimeError`` saying why when it cannot run.

The ops work on logits viewed as ``[B, N, P]`` split into one block per depth (the channels at
depth d, ascending). ``zmin`` is swept top-down and ``zmax`` bottom-up one depth at a time (and
one child rank at a time inside a depth), so the work is O(N) per pixel and nothing of shape
``[B, N, N, P]`` or ``[B, N, Dmax, P]`` is built; pixels are processed in chunks of about 2^20
logits so that the temporaries stay bounded. The tree-min loss is a ``paddle.autograd.PyLayer``
that saves only the logits and the label channels; its backward recomputes the sweeps and routes
each entry's gradient to the node attaining its min/max with the tie rule, without scatters:
``zmin`` gradients flow up the tree (a node that took its parent's value passes it on), ``zmax``
gradients flow down (a node not tied with its own ``zmax`` passes it to its first child attaining it).
The routing masks are 0/1 floats applied by multiplication (paddle's ``where`` and broadcasting
kernels are slow on CPU); ties between siblings are rare, so a count check per chunk walks the child
ranks only when one occurs.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from .. import _checks, _native
from .. import numpy as _hnp
from .._checks import REDUCTIONS, check_max_per_class
from .._checks import check_choice as _check_choice
from .._checks import check_gamma as _check_gamma
from .._checks import check_hierarchy as _check_hierarchy
from ..hierarchy import Hierarchy
from ..numpy.decode import DECODE_METHODS
from ..numpy.losses import HSSN_SCALE, counted_entries_per_depth
from ..numpy.triplet import SAMPLING, hssn_weights
from ..numpy.triplet import triplet_weight as _numpy_triplet_weight

__all__ = [
    "tree_min_loss",
    "focal_tree_min_loss",
    "hierarchy_triplet_loss",
    "triplet_weight",
    "hssn_loss",
    "decode",
    "expand_targets",
    "depth_cross_entropy",
    "REDUCTIONS",
    "DECODE_METHODS",
    "BACKENDS",
]

BACKENDS = ("auto", "paddle", "native", "triton")
LABEL_TABLE_MAX = 1 << 16  # label tables up to this many values; a larger ignore_index takes the compare path
NORM_EPS = 1e-12
_FLOATS = (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)
_INTS = (paddle.uint8, paddle.int8, paddle.int16, paddle.int32, paddle.int64)


# ---------------------------------------------------------------------------- per-place tables
class _Plan:
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
        leaf_depth = h.depth[self.leaf_sorted]
        self.leaf_cols = [h.ancestor_table[self.leaf_sorted, d] for d in range(L)]
        self.leaf_on = [leaf_depth > d for d in range(L)]
        self.depth_channels = list(h.depth_channels)
        self.children_table = h.children_table.astype(np.int64)
        self.num_children = np.array([len(c) for c in h.children], dtype=np.int64)
        self.counted_per_depth = counted_entries_per_depth(h)  # [N, L] float64, exact in a matmul


class _PlaceTables:
    """Lazily converted paddle copies of a plan's arrays on one place."""

    def __init__(self, plan: _Plan, place: Any):
        self.plan = plan
        self.place = place
        self._cache: dict[Any, paddle.Tensor] = {}

    def get(self, key: Any, make) -> paddle.Tensor:
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = paddle.to_tensor(np.asarray(make()), place=self.place)
        return t


_PLANS: dict[str, _Plan] = {}
_TABLES: dict[tuple[str, str], _PlaceTables] = {}
_LOCK = threading.Lock()


def _tables(hierarchy: Hierarchy, place: Any) -> _PlaceTables:
    """The cached tables of ``hierarchy`` on ``place`` (keyed by fingerprint and place)."""
    fp = hierarchy.fingerprint
    key = (fp, str(place))
    with _LOCK:
        tab = _TABLES.get(key)
        if tab is None:
            plan = _PLANS.get(fp)
            if plan is None:
                plan = _PLANS[fp] = _Plan(hierarchy)
            tab = _TABLES[key] = _PlaceTables(plan, place)
    return tab


def _col(
    tab: _PlaceTables, name: str, d: int, e: int | None = None, dtype: str | None = None
) -> paddle.Tensor:
    """A per-block table as a ``[1, n, 1]`` tensor (for broadcasting against ``[B, n, P]``)."""

    def make():
        arr = getattr(tab.plan, name)[d]
        arr = arr if e is None else arr[e]
        arr = np.asarray(arr).reshape(1, -1, 1)
        return arr.astype(dtype) if dtype else arr

    return tab.get((name, d, e, dtype, "col"), make)


def _vec(tab: _PlaceTables, name: str, d: int | None = None, e: int | None = None) -> paddle.Tensor:
    def make():
        arr = getattr(tab.plan, name)
        arr = arr if d is None else arr[d]
        return arr if e is None else arr[e]

    return tab.get((name, d, e), make)


# ---------------------------------------------------------------------------- elementwise pieces
def compute_dtype(dtype: Any) -> Any:
    return paddle.float64 if dtype == paddle.float64 else paddle.float32


def _log1p_exp_neg_abs(z: paddle.Tensor) -> paddle.Tensor:
    return paddle.abs(z).neg_().exp_().log1p_()


def _loss_of_z(z: paddle.Tensor, gamma: float) -> paddle.Tensor:
    """``sigmoid(z)^gamma * softplus(z)``: with ``z = -zmin`` on positives and ``zmax`` on negatives.

    ``softplus(z) = relu(z) + log1p(exp(-|z|))`` exactly (paddle's float32 softplus underflows to 0
    below z = -17); ``sigmoid(z)^gamma = exp(-gamma * softplus(-z))``.
    """
    tail = _log1p_exp_neg_abs(z)
    loss = F.relu(z).add_(tail)
    if gamma != 0:
        loss.multiply_(F.relu(-z).add_(tail).scale_(-gamma).exp_())
    return loss


def _grad_of_z(z: paddle.Tensor, gamma: float) -> paddle.Tensor:
    """d/dz of :func:`_loss_of_z`: ``s^gamma * (s + gamma * sigmoid(-z) * softplus(z))``, s = sigmoid(z)."""
    s = F.sigmoid(z)
    if gamma == 0:
        return s
    tail = _log1p_exp_neg_abs(z)
    s_pow = F.relu(-z).add_(tail).scale_(-gamma).exp_()
    softplus = F.relu(z).add_(tail)
    del tail
    return F.sigmoid(-z).multiply_(softplus).scale_(gamma).add_(s).multiply_(s_pow)


# ---------------------------------------------------------------------------- sweeps
def _rank_index(tab, d, r):
    """Positions in block d+1 of the r-th child of every block-d node (0 where there is none)."""
    return tab.get(("rank", d, r), lambda: tab.plan.child_ranks[d][r][0])


def _rank_valid(tab, d, r):
    return tab.get(("rank_valid", d, r), lambda: tab.plan.child_ranks[d][r][1].reshape(1, -1, 1))


def _rank_index_padded(tab, d, r):
    """As :func:`_rank_index`, but ``n_{d+1}`` (a padding row appended to block d+1) where there is
    no r-th child, so that a gather reads the padding value instead of needing a mask."""

    def make():
        index, valid = tab.plan.child_ranks[d][r]
        return index if valid is None else np.where(valid, index, tab.plan.levels[d + 1].size)

    return tab.get(("rank_padded", d, r), make)


def _padded(block, value):
    """``block [B, n, p]`` with one more row of ``value`` (the target of :func:`_rank_index_padded`)."""
    B, _, p = block.shape
    return paddle.concat([block, paddle.full([B, 1, p], value, dtype=block.dtype)], axis=1)


def _any_missing_rank(tab, d):
    return any(valid is not None for _, valid in tab.plan.child_ranks[d])


class _Labels:
    """Per-block targets and loss masks from label channels ``[B, P]`` (-1 = ignored)."""

    def __init__(self, lc: paddle.Tensor, tab: _PlaceTables, has_partial: bool):
        self.tab = tab
        self.lc = lc
        self.valid = (lc >= 0).unsqueeze(1)  # [B, 1, P]
        self.safe = paddle.clip(lc, min=0)
        self.flat = self.safe.reshape([-1])
        self.has_partial = has_partial
        self.label_depth = (
            paddle.index_select(_vec(tab, "depth"), self.flat).reshape(lc.shape) if has_partial else None
        )

    def positive(self, d: int) -> paddle.Tensor:
        """``[B, n_d, P]``: block-d node is on the labelled node's path."""
        anc = paddle.index_select(_vec(self.tab, "anc_col", d), self.flat).reshape(self.lc.shape)
        return anc.unsqueeze(1) == _col(self.tab, "levels", d)

    def mask(self, d: int) -> paddle.Tensor:
        """``[B, n_d or 1, P]``: valid pixel, and not a strict descendant of a partial label."""
        m = self.valid
        if self.has_partial:
            lab = self.lc.unsqueeze(1)
            for e in range(d):
                below = (self.label_depth == e + 1).unsqueeze(1) & (_col(self.tab, "anc_at", d, e) == lab)
                m = m & ~below
        return m

    def count(self, d: int, mask: paddle.Tensor) -> paddle.Tensor:
        n = int(self.tab.plan.levels[d].size)
        c = mask.astype("int64").sum()
        return c * n if mask.shape[1] == 1 else c


def _weight_blocks(weight, tab, L):
    if weight is None:
        return [None] * L
    return [paddle.index_select(weight, _vec(tab, "levels", d)).reshape([1, -1, 1]) for d in range(L)]


def _unblock(blocks: list[paddle.Tensor], tab: _PlaceTables) -> paddle.Tensor:
    """Concatenate per-depth blocks back into channel order ``[B, N, P]``; empties ``blocks``.

    When every depth is a contiguous channel range (balanced trees in the default or coarse-to-fine
    layout) the blocks are concatenated in channel order and no gather is needed.
    """
    order = tab.plan.block_order
    parts = [blocks[d] for d in (order if order is not None else range(len(blocks)))]
    blocks.clear()
    cat = parts[0] if len(parts) == 1 else paddle.concat(parts, axis=1)
    del parts
    if order is not None:
        return cat
    return paddle.index_select(cat, _vec(tab, "inverse"), axis=1)


def _children_max(m, zmax_below, tab, d):
    """``max(m, zmax of each node's children)`` (a new tensor): one max over each node's slice of
    children where they are consecutive in block d+1, else one pass per child rank."""
    slices = tab.plan.child_slices[d]
    if slices is not None:
        parts = [
            m[:, i : i + 1]
            if a == b
            else zmax_below[:, a:b]
            if b - a == 1
            else paddle.amax(zmax_below[:, a:b], axis=1, keepdim=True)
            for i, (a, b) in enumerate(slices)
        ]
        return paddle.maximum(m, paddle.concat(parts, axis=1) if len(parts) > 1 else parts[0])
    if _any_missing_rank(tab, d):
        zmax_below = _padded(zmax_below, -math.inf)
    for r in range(len(tab.plan.child_ranks[d])):
        m = paddle.maximum(m, paddle.index_select(zmax_below, _rank_index_padded(tab, d, r), axis=1))
    return m


def _first_attaining(below, zmax_d, itself_d, tab, d, ct):
    """``[B, n_{d+1}, p]`` 0/1: the node is its parent's first child (channel order) attaining the
    parent's zmax. Only parents not tied with their own zmax use it. Fast path: if, summed over the
    chunk, attaining children are exactly as many as such parents, no two siblings tie and
    "attaining" is the answer; otherwise ranks are walked last to first so that the first hit wins."""
    attains = paddle.index_select(zmax_d, _vec(tab, "parent_pos", d + 1), axis=1) == below
    surplus = attains.astype("int64").sum() - (itself_d == 0).astype("int64").sum()
    if int(surplus) == 0:  # one host sync per depth and chunk
        return attains.astype(ct)
    plan = tab.plan
    first = paddle.full(zmax_d.shape, -1, dtype="int32")
    for r in range(len(plan.child_ranks[d]) - 1, -1, -1):
        hit = paddle.index_select(below, _rank_index(tab, d, r), axis=1) == zmax_d
        if plan.child_ranks[d][r][1] is not None:
            hit = hit & _rank_valid(tab, d, r)
        first = paddle.where(hit, paddle.full([1], r, dtype="int32"), first)
    parent_first = paddle.index_select(first, _vec(tab, "parent_pos", d + 1), axis=1)
    return (parent_first == _col(tab, "slot", d + 1)).astype(ct)


def _block_z(labels, d, zmin_d, zmax_d):
    """``(positive mask, z)``: ``z = -zmin`` on positives, ``zmax`` elsewhere; negates ``zmin_d`` in
    place (the sweeps' own copy, dropped by the callers right after)."""
    pos = labels.positive(d)
    return pos, paddle.where(pos, zmin_d.neg_(), zmax_d)


def _forward_chunk(x, lc, tab, gamma, reduction, weight, has_partial):
    """Top-down ``zmin`` for all depths, then bottom-up ``zmax`` with each depth's loss computed as
    soon as its ``zmax`` exists; blocks are dropped as soon as they are no longer needed.

    Returns the loss map ``[B, N, p]`` for ``reduction="none"``, else per-depth (sums, counts)."""
    ct = compute_dtype(x.dtype)
    L = tab.plan.max_depth
    xc = x.astype(ct) if x.dtype != ct else x

    def block(d):
        return paddle.index_select(xc, _vec(tab, "levels", d), axis=1)

    zmin = [block(0)]
    for d in range(1, L):
        zp = paddle.index_select(zmin[d - 1], _vec(tab, "parent_pos", d), axis=1)
        zmin.append(paddle.minimum(zp, block(d)))
        del zp
    labels = _Labels(lc, tab, has_partial)
    ws = _weight_blocks(weight, tab, L)
    losses = [None] * L
    sums, counts = [None] * L, [None] * L
    below = None
    for d in range(L - 1, -1, -1):
        zmax_d = block(d) if below is None else _children_max(block(d), below, tab, d)
        _, z = _block_z(labels, d, zmin[d], zmax_d)
        zmin[d] = None
        loss = _loss_of_z(z, gamma)
        del z
        if ws[d] is not None:
            loss.multiply_(ws[d].expand(loss.shape))
        m = labels.mask(d)
        keep = m.astype(ct)  # 0/1: selects exactly (the loss is finite)
        loss.multiply_(keep.expand(loss.shape) if keep.shape != loss.shape else keep)
        del keep
        if reduction == "none":
            losses[d] = loss
        else:
            sums[d] = loss.sum()
            counts[d] = labels.count(d, m)
        del loss, m
        below = zmax_d
    del below, zmin
    return _unblock(losses, tab) if reduction == "none" else (sums, counts)


_CHUNK_ELEMENTS = 1 << 20  # logits entries per pixel chunk: bounds the temporaries of the sweeps


def _spans(x: paddle.Tensor) -> list[tuple[int, int]]:
    B, N, P = x.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, B * N))
    return [(a, min(P, a + step)) for a in range(0, P, step)]


def _tree_min_forward(x, lc, tab, gamma, reduction, weight, has_partial):
    """The loss over pixel chunks (every entry depends on its own pixel only)."""
    ct = compute_dtype(x.dtype)
    spans = _spans(x)
    if reduction == "none":
        if len(spans) == 1:
            return _forward_chunk(x, lc, tab, gamma, reduction, weight, has_partial)
        out = paddle.empty(x.shape, dtype=ct)
        for a, b in spans:
            out[:, :, a:b] = _forward_chunk(
                x[:, :, a:b], lc[:, a:b], tab, gamma, reduction, weight, has_partial
            )
        return out
    parts = [
        _forward_chunk(x[:, :, a:b], lc[:, a:b], tab, gamma, reduction, weight, has_partial)
        if len(spans) > 1
        else _forward_chunk(x, lc, tab, gamma, reduction, weight, has_partial)
        for a, b in spans
    ]
    sums = [paddle.add_n([p[0][d] for p in parts]) for d in range(tab.plan.max_depth)]
    counts = [paddle.add_n([p[1][d] for p in parts]) for d in range(tab.plan.max_depth)]
    if reduction == "sum":
        return paddle.add_n(sums)
    if reduction == "mean":
        return paddle.add_n(sums) / paddle.clip(paddle.add_n(counts), min=1).astype(ct)
    return paddle.add_n(
        [HSSN_SCALE * s / paddle.clip(c, min=1).astype(ct) for s, c in zip(sums, counts, strict=True)]
    )


def _depth_coefs(lc, tab, reduction, g_up, ct):
    """Per-depth factors (length ``max_depth``) turning the sum of a depth's entries into the scalar
    ``reduction``, times ``g_up``: ``g_up`` (sum), ``g_up / count`` (mean, all unmasked entries) or
    ``g_up * 5 / count_d`` (hssn, the depth's unmasked entries). Counts are over all pixels, from a
    histogram of the label channels ``[B, P]`` (-1 = ignored): ``count_d = sum_c hist[c] * counted_per_depth[c, d]``."""
    L = tab.plan.max_depth
    if reduction == "sum":
        return [g_up] * L
    # valid pixels per label channel (index 0 of the shifted bincount counts the ignored ones)
    hist = paddle.bincount(lc.reshape([-1]) + 1, minlength=tab.plan.num_nodes + 1)[1:]
    per_depth = paddle.matmul(hist.astype("float64").unsqueeze(0), _vec(tab, "counted_per_depth")).reshape([L])
    counts = [per_depth[d] for d in range(L)]
    if reduction == "mean":
        return [g_up / paddle.clip(paddle.add_n(counts), min=1).astype(ct)] * L
    return [g_up * HSSN_SCALE / paddle.clip(c, min=1).astype(ct) for c in counts]


def _tree_min_backward(x, lc, tab, gamma, reduction, weight, has_partial, grad_out):
    """Per pixel chunk: recompute the sweeps, then route each entry's gradient to the node attaining
    its min/max. The reduction's per-depth factors come from label counts over all pixels."""
    ct = compute_dtype(x.dtype)
    coefs = None
    if reduction != "none":
        coefs = _depth_coefs(lc, tab, reduction, grad_out.astype(ct).reshape([]), ct)
    spans = _spans(x)
    if len(spans) == 1:
        return _backward_chunk(x, lc, tab, gamma, weight, has_partial, coefs, grad_out)
    dx = paddle.empty(x.shape, dtype=x.dtype)
    for a, b in spans:
        up = grad_out[:, :, a:b] if coefs is None else None
        dx[:, :, a:b] = _backward_chunk(x[:, :, a:b], lc[:, a:b], tab, gamma, weight, has_partial, coefs, up)
    return dx


def _backward_chunk(x, lc, tab, gamma, weight, has_partial, coefs, grad_out):
    """Gradient for one chunk; ``coefs`` (per-depth scalars) or, for ``reduction="none"``, the
    upstream map chunk ``grad_out``."""
    ct = compute_dtype(x.dtype)
    plan = tab.plan
    L = plan.max_depth
    xc = x.astype(ct) if x.dtype != ct else x

    def block(d):
        return paddle.index_select(xc, _vec(tab, "levels", d), axis=1)

    zmin, took = [block(0)], [None] * L
    for d in range(1, L):
        zp = paddle.index_select(zmin[d - 1], _vec(tab, "parent_pos", d), axis=1)
        xd = block(d)
        took[d] = (zp <= xd).astype(ct)  # 1.0 where the parent wins (ties included)
        zmin.append(paddle.minimum(zp, xd))
        del zp, xd
    labels = _Labels(lc, tab, has_partial)
    ws = _weight_blocks(weight, tab, L)
    up = grad_out.astype(ct) if coefs is None else None
    coefs = [None] * L if coefs is None else coefs

    # Bottom-up: zmax, d loss / d z per entry (g), and what the zmax routing needs: whether a node
    # attains its own zmax (itself) and whether it is its parent's first child (channel order)
    # attaining the parent's zmax (chosen).
    g, pos, itself, chosen = [None] * L, [None] * L, [None] * L, [None] * L
    below = None
    for d in range(L - 1, -1, -1):
        xd = block(d)
        zmax_d = xd if below is None else _children_max(xd, below, tab, d)
        itself[d] = (xd == zmax_d).astype(ct)
        del xd
        if below is not None:
            chosen[d + 1] = _first_attaining(below, zmax_d, itself[d], tab, d, ct)
        pos_d, z = _block_z(labels, d, zmin[d], zmax_d)
        pos[d] = pos_d.astype(ct)
        zmin[d] = None
        del pos_d
        gz = _grad_of_z(z, gamma)
        del z
        keep = labels.mask(d).astype(ct)
        if coefs[d] is None:
            gz.multiply_(paddle.index_select(up, _vec(tab, "levels", d), axis=1))
        else:
            keep = keep * coefs[d]  # 0 or the coefficient, exactly
        if ws[d] is not None:
            gz.multiply_(ws[d].expand(gz.shape))
        g[d] = gz.multiply_(keep.expand(gz.shape) if keep.shape != gz.shape else keep)
        del keep
        del gz
        below = zmax_d
    del below, zmin

    # The masks are 0/1 floats: multiplying by them selects exactly (the values are finite), and
    # ``c - c * m`` is exactly ``c`` where m = 0 and 0 where m = 1.
    dx = [None] * L
    # zmax, top-down: a node not tied with its own zmax hands what it holds to its first child
    # (channel order) attaining it; dz/dzmax = +1 on negatives.
    down = None
    for d in range(L):
        c = g[d] - g[d] * pos[d]
        if down is not None:
            c.add_(paddle.index_select(down, _vec(tab, "parent_pos", d), axis=1).multiply_(chosen[d]))
            chosen[d] = None
        dx[d] = c * itself[d]
        down = c.subtract_(dx[d]) if d < L - 1 else None
        itself[d] = None
        del c
    # zmin, bottom-up: a node that took its parent's value hands what it holds (its own entry's
    # gradient plus what its children handed it) up; dz/dzmin = -1 on positives.
    carry = None
    for d in range(L - 1, -1, -1):
        c = (g[d] * pos[d]).neg_()
        g[d] = pos[d] = None
        if carry is not None:
            handed = carry.multiply_(took[d + 1])
            took[d + 1] = None
            if _any_missing_rank(tab, d):
                handed = _padded(handed, 0.0)
            for r in range(len(plan.child_ranks[d])):
                c.add_(paddle.index_select(handed, _rank_index_padded(tab, d, r), axis=1))
            del handed
        dx[d].add_(c if d == 0 else c - c * took[d])
        carry = c
    del carry
    out = _unblock(dx, tab)
    return out if out.dtype == x.dtype else out.astype(x.dtype)


class _TreeMinFunction(PyLayer):
    """Saves the logits and the label channels only; backward recomputes the sweeps."""

    @staticmethod
    def forward(ctx, x, lc, tab, gamma, reduction, weight, has_partial):
        ctx.save_for_backward(x, lc)
        ctx.config = (tab, gamma, reduction, weight, has_partial)
        return _tree_min_forward(x, lc, tab, gamma, reduction, weight, has_partial)

    @staticmethod
    def backward(ctx, grad_out):
        x, lc = ctx.saved_tensor()
        tab, gamma, reduction, weight, has_partial = ctx.config
        return _tree_min_backward(x, lc, tab, gamma, reduction, weight, has_partial, grad_out), None


def empty_loss(logits: paddle.Tensor, reduction: str) -> paddle.Tensor:
    """The loss of logits with no pixel (B = 0 or a zero-size spatial axis): an exact 0 for a scalar
    reduction, the empty ``[B, N, *spatial]`` map for ``"none"``, in the compute dtype and connected
    to the logits (their gradient is the empty zero tensor of their shape)."""
    xc = logits.astype(compute_dtype(logits.dtype))
    return xc * 0 if reduction == "none" else xc.sum()


def _no_pixel(shape) -> bool:
    """B = 0 or a zero-size spatial axis. The ops answer such inputs before reshaping: paddle's
    reshape reads a 0 in the target shape as "keep this axis"."""
    return _checks.is_empty([shape[0], *shape[2:]])


def tree_min_op(logits, label_channels, hierarchy, *, gamma, reduction, node_weight, has_partial=True):
    """Tree-min (``gamma == 0``) or focal tree-min loss; ``label_channels`` int64 ``[B, *spatial]``."""
    if _no_pixel(logits.shape):
        return empty_loss(logits, reduction)
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    P = math.prod(spatial)
    x = logits.reshape([B, N, P])
    lc = label_channels.reshape([B, P])
    tab = _tables(hierarchy, logits.place)
    weight = None
    if node_weight is not None:
        weight = node_weight.astype(compute_dtype(logits.dtype))
    out = _TreeMinFunction.apply(x, lc, tab, float(gamma), reduction, weight, bool(has_partial))
    return out.reshape([B, N, *spatial]) if reduction == "none" else out


# ---------------------------------------------------------------------------- validation
_dtype_name = _checks.dtype_name  # "float32" for paddle.float32, as numpy and torch name it


def _check_logits(logits: Any, hierarchy: Hierarchy, name: str = "logits") -> paddle.Tensor:
    """Type, dtype and layout ``[B, N, *spatial]``; any B and spatial size (0 included: an empty
    input gives an exact 0, or an empty map)."""
    _check_hierarchy(hierarchy)
    if not isinstance(logits, paddle.Tensor):
        raise TypeError(f"{name} must be a paddle.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise _checks.logits_dtype_error(_dtype_name(logits.dtype), name)
    _checks.check_logits(tuple(logits.shape), _dtype_name(logits.dtype), hierarchy, name)
    return logits


def _check_finite(x: paddle.Tensor, name: str = "logits") -> None:
    _checks.check_finite_count(int(paddle.logical_not(paddle.isfinite(x)).astype("int64").sum()), name)


def _label_tensor(labels: Any, place: Any) -> paddle.Tensor:
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):  # bool is not an integer dtype in numpy
            raise _checks.label_dtype_error(_dtype_name(labels.dtype))
        labels = paddle.to_tensor(labels, place=place)
    if not isinstance(labels, paddle.Tensor):
        raise TypeError(f"labels must be a paddle.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INTS:
        raise _checks.label_dtype_error(_dtype_name(labels.dtype))
    if str(labels.place) != str(place):
        raise ValueError(f"labels are on {labels.place} but the logits are on {place}")
    return labels


def _label_channels(
    labels: paddle.Tensor, hierarchy: Hierarchy, ignore_index: int
) -> tuple[paddle.Tensor, bool]:
    """Map node-id labels to channels (-1 = ignored), raising :class:`LabelError` for bad values.

    One device sync: whether bad values or partial labels occur is read back together.
    """
    ignore_index = _checks.check_ignore_index(hierarchy, ignore_index)
    tab = _tables(hierarchy, labels.place)
    lab = labels.astype("int64")
    if max(hierarchy.num_nodes, abs(ignore_index) + 1) <= LABEL_TABLE_MAX:
        # a lookup table indexed by the clamped label value: a few passes over the labels
        table, shift, bad, partial = hierarchy.label_table(ignore_index)
        slot = paddle.clip(lab + shift, 0, table.size - 1).reshape([-1])
        seen = paddle.bincount(slot, minlength=table.size) > 0
        bad_t = tab.get(("label_bad", ignore_index), lambda: bad)
        partial_t = tab.get(("label_partial", ignore_index), lambda: partial)
        any_bad, any_partial = paddle.stack([(seen & bad_t).any(), (seen & partial_t).any()]).numpy().tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.numpy(), ignore_index)  # cold path: on the host
        table_t = tab.get(("label_table", ignore_index), lambda: table)
        return paddle.gather(table_t, slot).reshape(lab.shape), bool(any_partial)  # gather: 6x index_select here
    ignored = lab == ignore_index
    bad = paddle.logical_not(ignored) & ((lab < 0) | (lab >= hierarchy.num_nodes))
    partial = paddle.logical_not(ignored) & (lab >= hierarchy.num_leaves)
    any_bad, any_partial = paddle.stack([bad.any(), partial.any()]).numpy().tolist()
    if any_bad:
        raise hierarchy.invalid_label_error(lab.numpy(), ignore_index)  # cold path: on the host
    safe = paddle.where(ignored, paddle.zeros_like(lab), lab)
    channels = paddle.index_select(_vec(tab, "channel_of"), safe.reshape([-1])).reshape(lab.shape)
    return paddle.where(ignored, paddle.full_like(lab, -1), channels), bool(any_partial)


def _labels_at_door(
    labels: Any, logits: paddle.Tensor, hierarchy: Hierarchy, ignore_index: Any
) -> tuple[paddle.Tensor, int]:
    """The label tensor (type, dtype, place and shape checked) and ``ignore_index`` checked; values not yet."""
    labels = _label_tensor(labels, logits.place)
    _checks.check_label_shape(tuple(labels.shape), (logits.shape[0], *logits.shape[2:]))
    return labels, _checks.check_ignore_index(hierarchy, ignore_index)


def _checked_labels(
    labels: Any, logits: paddle.Tensor, hierarchy: Hierarchy, ignore_index: int
) -> tuple[paddle.Tensor, bool]:
    labels, ignore_index = _labels_at_door(labels, logits, hierarchy, ignore_index)
    return _label_channels(labels, hierarchy, ignore_index)


def _check_node_weight(node_weight: Any, hierarchy: Hierarchy, place: Any) -> paddle.Tensor | None:
    if node_weight is None:
        return None
    if isinstance(node_weight, paddle.Tensor):
        w = node_weight.detach()
        if w.dtype == paddle.bool or w.dtype not in _FLOATS + _INTS:
            raise _checks.node_weight_dtype_error(_dtype_name(w.dtype))
        _checks.check_node_weight_shape(tuple(w.shape), hierarchy)
        return w if str(w.place) == str(place) else w.to(place)
    arr = np.asarray(node_weight)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise _checks.node_weight_dtype_error(_dtype_name(arr.dtype))
    _checks.check_node_weight_shape(arr.shape, hierarchy)
    return paddle.to_tensor(arr.astype(np.float64), place=place)


def _native_layer():
    from . import _native_layer as layer

    return layer


def _use_native(backend: str, x: paddle.Tensor) -> bool:
    return _native.use_for(backend, on_cpu=bool(x.place.is_cpu_place()), device=str(x.place))


def _is_gpu(x: paddle.Tensor) -> bool:
    return bool(x.place.is_gpu_place())


def _bridge():
    from . import _bridge as bridge

    return bridge


def _use_triton(backend: str, x: paddle.Tensor) -> bool:
    _check_choice(backend, BACKENDS, "backend")
    if backend == "triton":
        reason = _bridge().unavailable_reason(x)
        if reason:
            raise RuntimeError(f"backend='triton' was asked for, but {reason}")
        return True
    if backend == "auto" and _is_gpu(x):
        return _bridge().unavailable_reason(x) is None
    return False


# ---------------------------------------------------------------------------- losses
def _tree_min(logits, labels, hierarchy, gamma, ignore_index, reduction, node_weight, check_finite, backend):
    x = _check_logits(logits, hierarchy)
    _check_choice(reduction, REDUCTIONS, "reduction")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    w = _check_node_weight(node_weight, hierarchy, x.place)
    if check_finite:
        _check_finite(x)
    lc, has_partial = _label_channels(labels, hierarchy, ignore_index)
    if _use_triton(backend, x):
        return _bridge().fused_tree_min_loss(
            x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=w
        )
    if _use_native(backend, x):
        return _native_layer().tree_min_native(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=w)
    return tree_min_op(
        x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=w, has_partial=has_partial
    )


def tree_min_loss(
    logits: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    ignore_index: int = 255,
    reduction: str = "mean",
    node_weight: Any = None,
    check_finite: bool = False,
    backend: str = "auto",
) -> paddle.Tensor:
    """Tree-min loss (SPEC section 4).

    ``l_v = y_v * softplus(-min_{u in A(v)} x_u) + (1 - y_v) * softplus(max_{u in D(v)} x_u)``,
    times ``node_weight[v]`` (channel order). ``reduction``: ``"mean"`` over unmasked (pixel, node)
    entries, ``"sum"``, ``"none"`` (``[B, N, *spatial]``, 0 where masked) or ``"hssn"`` (per-depth
    means summed, times 5: the published normalisation). Non-finite logits propagate unless
    ``check_finite=True``, which raises a ``ValueError`` (one device sync).
    ``backend``: ``"auto"`` (GPU: the fused Triton kernels through DLPack when torch and Triton are
    available; CPU: the compiled kernel of ``hieraloss._native`` when it was built; else the
    vectorized paddle op), ``"paddle"`` (always the vectorized paddle op), ``"native"`` (the compiled
    CPU kernel) or ``"triton"``. All give the same values and gradients within rounding.
    """
    return _tree_min(
        logits, labels, hierarchy, 0.0, ignore_index, reduction, node_weight, check_finite, backend
    )


def focal_tree_min_loss(
    logits: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    gamma: float = 2.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    node_weight: Any = None,
    check_finite: bool = False,
    backend: str = "auto",
) -> paddle.Tensor:
    """Focal tree-min loss (SPEC section 5): positives times ``(1 - sigmoid(zmin))^gamma``, negatives
    times ``sigmoid(zmax)^gamma``; ``gamma=0`` equals :func:`tree_min_loss`. Arguments as there."""
    g = _check_gamma(gamma)
    return _tree_min(
        logits, labels, hierarchy, g, ignore_index, reduction, node_weight, check_finite, backend
    )


def expand_targets_op(
    label_channels: paddle.Tensor, hierarchy: Hierarchy
) -> tuple[paddle.Tensor, paddle.Tensor]:
    B = label_channels.shape[0]
    spatial = list(label_channels.shape[1:])
    N = hierarchy.num_nodes
    if _checks.is_empty(label_channels.shape):
        return paddle.zeros([B, N, *spatial], dtype="uint8"), paddle.zeros([B, N, *spatial], dtype="bool")
    lc = label_channels.reshape([B, math.prod(spatial)])
    tab = _tables(hierarchy, lc.place)
    labels = _Labels(lc, tab, True)
    pos, masks = [], []
    for d in range(hierarchy.max_depth):
        m = labels.mask(d)
        p = labels.positive(d) & m
        pos.append(p)
        masks.append(paddle.expand(m, p.shape))
    targets = _unblock(pos, tab).astype("uint8").reshape([B, N, *spatial])
    mask = _unblock(masks, tab).reshape([B, N, *spatial])
    return targets, mask


def expand_targets(
    labels: paddle.Tensor, hierarchy: Hierarchy, ignore_index: int = 255
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(targets uint8, mask bool)``, both ``[B, N, *spatial]`` in channel order (DEVELOPING.md)."""
    _check_hierarchy(hierarchy)
    place = labels.place if isinstance(labels, paddle.Tensor) else paddle.CPUPlace()
    labels = _label_tensor(labels, place)
    _checks.check_label_batch(labels.ndim)
    lc, _ = _label_channels(labels, hierarchy, ignore_index)
    with paddle.no_grad():
        return expand_targets_op(lc, hierarchy)


def depth_cross_entropy_op(logits, label_channels, hierarchy, depth):
    """Mean cross-entropy over the classes at ``depth``; see :func:`depth_cross_entropy`."""
    if _no_pixel(logits.shape):
        return empty_loss(logits, "mean")
    tab = _tables(hierarchy, logits.place)
    plan = tab.plan
    B, N = logits.shape[:2]
    P = math.prod(logits.shape[2:])
    ct = compute_dtype(logits.dtype)
    classes = tab.get(("depth_channels", depth), lambda: plan.depth_channels[depth - 1])
    x = paddle.index_select(logits.reshape([B, N, P]), classes, axis=1).astype(ct)  # [B, C, P]
    lc = label_channels.reshape([B, P])
    safe = paddle.clip(lc, min=0).reshape([-1])
    target_ch = paddle.index_select(_vec(tab, "anc_col", depth - 1), safe)
    label_depth = paddle.index_select(_vec(tab, "depth"), safe)
    leaf = paddle.index_select(tab.get("is_leaf", lambda: plan.is_leaf), safe)
    known = (lc.reshape([-1]) >= 0) & (leaf | (label_depth >= depth))
    position = np.full(N, 0, dtype=np.int64)
    position[plan.depth_channels[depth - 1]] = np.arange(plan.depth_channels[depth - 1].size)
    target = paddle.index_select(tab.get(("position", depth), lambda: position), target_ch)
    logp = F.log_softmax(x, axis=1)  # [B, C, P]
    picked = paddle.take_along_axis(logp, target.reshape([B, 1, -1]), axis=1).reshape([-1])
    total = -paddle.where(known, picked, paddle.zeros([1], dtype=ct)).sum()
    return total / paddle.clip(known.astype("int64").sum(), min=1).astype(ct)


def depth_cross_entropy(
    logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, depth: int, *, ignore_index: int = 255
) -> paddle.Tensor:
    """Cross-entropy over the classes at ``depth`` (``hierarchy.depth_channels[depth-1]``), targets the
    labelled node's class at that depth; ignored pixels and partial labels coarser than ``depth`` do
    not count. Mean over the counted pixels (an exact 0 if there are none)."""
    x = _check_logits(logits, hierarchy)
    depth = _checks.check_depth(depth, hierarchy)
    lc, _ = _checked_labels(labels, x, hierarchy, ignore_index)
    return depth_cross_entropy_op(x, lc, hierarchy, depth)


# ---------------------------------------------------------------------------- triplet loss
def _numpy_generator(generator: Any) -> np.random.Generator | None:
    if generator is None or isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(f"generator must be a numpy Generator or an int seed, got {type(generator).__name__}")


def _resize_nearest(labels: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """Nearest resampling of ``[B, H, W]`` with the reference rule (``hieraloss.numpy``)."""
    out = labels
    for axis, (n_in, n_out) in enumerate(zip(labels.shape[1:], size, strict=True), start=1):
        if n_in == n_out:
            continue
        src = np.floor(np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out)))
        index = paddle.to_tensor(np.minimum(src.astype(np.int64), n_in - 1), place=labels.place)
        out = paddle.index_select(out, index, axis=axis)
    return out


def triplet_op(embeddings, leaf, hierarchy, *, max_per_class, base_margin, sampling, generator):
    """Hierarchy-margin triplet loss; ``leaf`` is a host ``[B, h, w]`` array of leaf ids (-1 elsewhere).

    Triplets are drawn on the host by :func:`hieraloss.numpy.sample_triplets` (identical draws for
    the same seed); the distances are paddle ops, so autograd reaches ``embeddings``.
    """
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[:2]
    ai, pi, ni, ac, pc, nc = _hnp.sample_triplets(
        leaf, hierarchy, max_per_class=max_per_class, sampling=sampling, generator=generator, ignore_index=-1
    )
    if ai.size == 0:
        flat = embeddings.reshape([-1])[:1]
        return (
            paddle.where(paddle.zeros_like(flat, dtype="bool"), flat, paddle.zeros_like(flat))
            .sum()
            .astype(ct)
        )
    emb = embeddings.astype(ct).reshape([B, C, -1]).transpose([0, 2, 1]).reshape([-1, C])
    place = embeddings.place
    index = paddle.to_tensor(np.concatenate([ai, pi, ni]), place=place)
    rows = paddle.index_select(emb, index)
    rows = rows / paddle.clip(paddle.sqrt((rows * rows).sum(axis=1, keepdim=True)), min=NORM_EPS)
    t = ai.size
    e_a, e_p, e_n = rows[:t], rows[t : 2 * t], rows[2 * t :]
    margin = paddle.to_tensor(_hnp.triplet_margin(hierarchy, ac, pc, nc, base_margin), place=place).astype(ct)
    per = F.relu((1.0 - (e_a * e_p).sum(axis=1)) - (1.0 - (e_a * e_n).sum(axis=1)) + margin)
    classes, inverse, per_class = np.unique(ac, return_inverse=True, return_counts=True)
    weight = 1.0 / (per_class[inverse] * classes.size)  # mean per class, then over classes
    return (per * paddle.to_tensor(weight, place=place).astype(ct)).sum()


def hierarchy_triplet_loss(
    embeddings: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    max_per_class: int = 200,
    base_margin: float = 0.1,
    sampling: str = "random",
    generator: Any = None,
    ignore_index: int = 255,
    process_group: Any = None,
    gather_across_ranks: bool = False,
) -> paddle.Tensor:
    """Hierarchy-margin triplet loss (SPEC section 6) of ``embeddings [B, C, h, w]``.

    ``labels [B, H, W]`` are resampled to ``h x w`` (nearest, as ``F.interpolate``); only leaf labels
    take part. Embeddings are L2-normalised along C; ``d(a, b) = 1 - <a, b>``; margin
    ``base_margin + (psi(c_a, c_n) - psi(c_a, c_p)) / (2 * max_depth)``. Per anchor class at most
    ``max_per_class`` triplets (``sampling="random"`` drawn from ``generator``, a numpy Generator or
    an int seed, as ``hieraloss.numpy`` draws them; or ``"first"`` in flat order for parity with the
    published code); mean per class, then mean over classes. No triplet gives an exact 0 that is
    still connected to ``embeddings``.

    ``gather_across_ranks=True`` (a collective over ``process_group``) draws the triplets from the
    global batch of all ranks: see :mod:`hieraloss.paddle.distributed`.
    """
    _check_hierarchy(hierarchy)
    if not isinstance(gather_across_ranks, bool):
        raise TypeError(f"gather_across_ranks must be a bool, got {gather_across_ranks!r}")
    if not isinstance(embeddings, paddle.Tensor):
        raise TypeError(f"embeddings must be a paddle.Tensor, got {type(embeddings).__name__}")
    if embeddings.dtype not in _FLOATS:
        raise _checks.logits_dtype_error(_dtype_name(embeddings.dtype), "embeddings")
    if embeddings.ndim != 4:
        raise ValueError(f"embeddings must be [B, C, h, w], got shape {tuple(embeddings.shape)}")
    labels = _label_tensor(labels, embeddings.place)
    if labels.ndim != 3 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be [B, H, W] with B={embeddings.shape[0]}, got shape {tuple(labels.shape)}"
        )
    _check_choice(sampling, SAMPLING, "sampling")
    check_max_per_class(max_per_class)
    rng = _numpy_generator(generator)
    lc, _ = _label_channels(labels, hierarchy, ignore_index)
    small = _resize_nearest(lc, embeddings.shape[2:]).numpy()  # host copy at the embedding resolution
    is_leaf = (small >= 0) & hierarchy.is_leaf[np.maximum(small, 0)]
    leaf = np.where(is_leaf, hierarchy.node_ids[np.maximum(small, 0)], -1)
    if gather_across_ranks:
        from . import distributed

        if distributed.is_distributed(process_group):
            return distributed.gathered_triplet_op(
                embeddings, leaf, hierarchy, max_per_class=int(max_per_class), base_margin=float(base_margin),
                sampling=sampling, generator=rng, process_group=process_group,
            )
    return triplet_op(
        embeddings,
        leaf,
        hierarchy,
        max_per_class=int(max_per_class),
        base_margin=float(base_margin),
        sampling=sampling,
        generator=rng,
    )


# The published half-cosine ramp is framework-free: one implementation, in the numpy backend.
triplet_weight = _numpy_triplet_weight


# ---------------------------------------------------------------------------- published combination
def hssn_loss(
    logits: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    embeddings: paddle.Tensor | None = None,
    step: float | None = None,
    total_steps: float | None = None,
    tree_min_weight: float = 5.0,
    focal_gamma: float | None = None,
    ce_weights: float | Sequence[float] | None = None,
    triplet_weight: float | None = None,
    ignore_index: int = 255,
    node_weight: Any = None,
    max_per_class: int = 200,
    base_margin: float = 0.1,
    sampling: str = "random",
    generator: Any = None,
    return_parts: bool = False,
    backend: str = "auto",
    process_group: Any = None,
    gather_across_ranks: bool = False,
) -> paddle.Tensor | tuple[paddle.Tensor, dict[str, paddle.Tensor]]:
    """The published HSSN training loss::

        tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d + w * TT

    ``TM`` is the tree-min loss (focal with ``focal_gamma`` if given) with the per-depth
    normalisation of ``reduction="hssn"`` but without its factor 5, so the default
    ``tree_min_weight=5.0`` reproduces the published ``5 * L_TM``. ``CE_d``: :func:`depth_cross_entropy`
    at depth d; ``ce_weights`` is one weight per depth or one number for all (default 1.0 each; a
    weight 0 skips that depth). ``TT``: :func:`hierarchy_triplet_loss` of ``embeddings``, only if
    they are given; its weight ``w`` is ``triplet_weight`` or, if None, the published schedule
    ``triplet_weight(step, total_steps)``. ``return_parts=True`` also returns a dict of the
    unweighted parts (``tree_min``, ``ce_depth{d}``, ``triplet``) and ``triplet_weight``.
    ``backend``: as for :func:`tree_min_loss`; with the compiled CPU kernel (``"auto"`` on the CPU,
    or ``"native"``) tree-min and every depth's cross-entropy take one pass over the logits, and the
    ``tree_min`` / ``ce_depth{d}`` parts are detached values (the total carries the gradient).
    """
    x = _check_logits(logits, hierarchy)
    ce_w, tw = hssn_weights(hierarchy.max_depth, ce_weights, embeddings is not None, triplet_weight, step,
                            total_steps)
    gamma = 0.0 if focal_gamma is None else _check_gamma(focal_gamma)
    _check_choice(backend, BACKENDS, "backend")

    if _use_native(backend, x):
        # The compiled kernel: tree-min and the cross-entropy of every depth in one pass over the
        # logits (the gradient written in the same pass); the parts are detached values.
        lc, _ = _checked_labels(labels, x, hierarchy, ignore_index)
        w = _check_node_weight(node_weight, hierarchy, x.place)
        total, tm, ce_all = _native_layer().hssn_objective_native(
            x, lc, hierarchy, gamma=gamma, node_weight=w, tree_min_weight=float(tree_min_weight), ce_weights=ce_w
        )
        parts: dict[str, Any] = {"tree_min": tm}
        for d, weight in enumerate(ce_w, start=1):
            if weight != 0:
                parts[f"ce_depth{d}"] = ce_all[d - 1]
    else:
        tm = (
            _tree_min(x, labels, hierarchy, gamma, ignore_index, "hssn", node_weight, False, backend)
            / HSSN_SCALE
        )
        parts = {"tree_min": tm}
        total = float(tree_min_weight) * tm
        lc, _ = _checked_labels(labels, x, hierarchy, ignore_index)
        for d, weight in enumerate(ce_w, start=1):
            if weight != 0:
                ce = depth_cross_entropy_op(x, lc, hierarchy, d)
                parts[f"ce_depth{d}"] = ce
                total = total + weight * ce
    if embeddings is not None:
        tt = hierarchy_triplet_loss(
            embeddings,
            labels,
            hierarchy,
            max_per_class=max_per_class,
            base_margin=base_margin,
            sampling=sampling,
            generator=generator,
            ignore_index=ignore_index,
            process_group=process_group,
            gather_across_ranks=gather_across_ranks,
        )
        parts["triplet"] = tt
        parts["triplet_weight"] = paddle.to_tensor(tw, dtype=total.dtype, place=total.place)
        total = total + tw * tt.astype(total.dtype)
    return (total, parts) if return_parts else total


# ---------------------------------------------------------------------------- decoding
def _path_scores(scores, tab):
    """``[B, K, P]``: sum of ``scores`` along each leaf's path, root first (leaves by channel)."""
    plan = tab.plan
    out = paddle.index_select(scores, _vec(tab, "leaf_cols", 0), axis=1)
    zero = paddle.zeros([1], dtype=scores.dtype)
    for d in range(1, plan.max_depth):
        part = paddle.index_select(scores, _vec(tab, "leaf_cols", d), axis=1)
        if plan.leaf_on[d].all():
            out = out + part
        else:
            out = out + paddle.where(_col(tab, "leaf_on", d), part, zero)
    return out


def _top_down(x, tab):
    plan = tab.plan
    top = _vec(tab, "levels", 0)
    chosen = paddle.index_select(
        top, paddle.argmax(paddle.index_select(x, top, axis=1), axis=1).reshape([-1])
    )
    B, P = x.shape[0], x.shape[2]
    chosen = chosen.reshape([B, P])
    ctab = tab.get("children_table", lambda: plan.children_table)
    nkids = tab.get("num_children", lambda: plan.num_children)
    cmax = plan.children_table.shape[1]
    slots = tab.get("slot_range", lambda: np.arange(cmax).reshape(1, -1, 1))
    leaf = tab.get("is_leaf", lambda: plan.is_leaf)
    neg_inf = paddle.full([1], -math.inf, dtype=x.dtype)
    for _ in range(plan.max_depth - 1):
        flat = chosen.reshape([-1])
        cand = paddle.index_select(ctab, flat).reshape([B, P, cmax]).transpose([0, 2, 1])  # [B, Cmax, P]
        vals = paddle.take_along_axis(x, cand, axis=1)
        real = slots < paddle.index_select(nkids, flat).reshape([B, 1, P])
        vals = paddle.where(real, vals, neg_inf)
        step = paddle.take_along_axis(cand, paddle.argmax(vals, axis=1, keepdim=True), axis=1).squeeze(1)
        chosen = paddle.where(paddle.index_select(leaf, flat).reshape([B, P]), chosen, step)
    return chosen


def decode_op(logits, hierarchy, method):
    """``(leaf node ids [B, *spatial], depth node ids [B, L, *spatial])`` (int64)."""
    tab = _tables(hierarchy, logits.place)
    plan = tab.plan
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    L = plan.max_depth
    if _no_pixel(logits.shape):  # no pixel: empty maps of the right shapes
        return paddle.zeros([B, *spatial], dtype="int64"), paddle.zeros([B, L, *spatial], dtype="int64")
    node_ids = _vec(tab, "node_ids")
    with paddle.no_grad():
        x = logits.detach().reshape([B, N, math.prod(spatial)]).astype(compute_dtype(logits.dtype))
        P = x.shape[2]
        if method == "independent":
            per_depth = []
            for d in range(L):
                dc = _vec(tab, "depth_channels", d)
                best = paddle.argmax(paddle.index_select(x, dc, axis=1), axis=1)
                per_depth.append(paddle.index_select(dc, best.reshape([-1])).reshape([B, P]))
            depth_ch = paddle.stack(per_depth, axis=1)
            leaf = per_depth[-1]
        else:
            if method == "top_down":
                leaf = _top_down(x, tab)
            else:
                scores = x if method == "path" else F.softmax(x, axis=1)
                best = paddle.argmax(_path_scores(scores, tab), axis=1)  # first max = lowest leaf channel
                leaf = paddle.index_select(_vec(tab, "leaf_sorted"), best.reshape([-1])).reshape([B, P])
            depth_ch = (
                paddle.index_select(_vec(tab, "ancestor_table"), leaf.reshape([-1]))
                .reshape([B, P, L])
                .transpose([0, 2, 1])
            )
        leaf_ids = paddle.index_select(node_ids, leaf.reshape([-1])).reshape([B, *spatial])
        depth_ids = paddle.index_select(node_ids, depth_ch.reshape([-1])).reshape([B, L, *spatial])
    return leaf_ids, depth_ids


def decode(
    logits: paddle.Tensor, hierarchy: Hierarchy, method: str = "path", backend: str = "auto"
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Hierarchy-consistent decoding (SPEC section 7) to node ids.

    Returns ``(leaf_labels [B, *spatial], depth_labels [B, L, *spatial])`` (int64); ``depth_labels[:, d-1]``
    is the node id at depth d of the chosen leaf's path. ``method``: ``"path"`` (exact MAP: argmax
    over leaves of the sum of logits along the path), ``"hssn"``, ``"top_down"`` or
    ``"independent"`` (per-depth argmax, may be inconsistent). Ties go to the lowest channel.
    """
    x = _check_logits(logits, hierarchy)
    _check_choice(method, DECODE_METHODS, "method")
    if method in ("path", "top_down") and _use_triton(backend, x):
        return _bridge().fused_decode(x.detach(), hierarchy, method)
    return decode_op(x, hierarchy, method)
