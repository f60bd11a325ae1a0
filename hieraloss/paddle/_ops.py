"""Vectorized paddle ops of the PaddlePaddle backend (no validation: :mod:`.functional` checks first).

The paddle twin of :mod:`hieraloss.torch._ops`: the eager tree-min sweeps and their ``PyLayer``,
expand-targets, the per-depth cross-entropy, the decoders, path scores and the triplet op, on the
tables of :mod:`._tables`. Imports no door module of the backend.

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
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ..core import checks as _checks
from ..core import triplets as _triplets
from ..core.rules import HSSN_SCALE
from ..hierarchy import Hierarchy
from ._tables import PlaceTables, building_program, col, place_of, tables_for, vec

NORM_EPS = 1e-12


# ---------------------------------------------------------------------------- elementwise pieces
def argmax_nan_first(x: paddle.Tensor, axis: int, keepdim: bool = False) -> paddle.Tensor:
    """``argmax`` with numpy's and torch's NaN rule: the first NaN wins where there is one
    (``paddle.argmax`` skips NaN), else the first maximum."""
    nan = paddle.isnan(x)
    first_nan = paddle.argmax(nan.astype("int32"), axis=axis, keepdim=keepdim)
    return paddle.where(nan.any(axis=axis, keepdim=keepdim), first_nan, paddle.argmax(x, axis=axis, keepdim=keepdim))


def compute_dtype(dtype: Any) -> Any:
    """float64 for float64, else float32 (float16/bfloat16 accumulate in float32)."""
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
        loss = loss.multiply_(F.relu(-z).add_(tail).scale_(-gamma).exp_())
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

    def __init__(self, lc: paddle.Tensor, tab: PlaceTables, has_partial: bool):
        self.tab = tab
        self.lc = lc
        self.valid = (lc >= 0).unsqueeze(1)  # [B, 1, P]
        self.safe = paddle.clip(lc, min=0)
        self.flat = self.safe.reshape([-1])
        self.has_partial = has_partial
        self.label_depth = (
            paddle.index_select(vec(tab, "depth"), self.flat).reshape(lc.shape) if has_partial else None
        )

    def positive(self, d: int) -> paddle.Tensor:
        """``[B, n_d, P]``: block-d node is on the labelled node's path."""
        anc = paddle.index_select(vec(self.tab, "anc_col", d), self.flat).reshape(self.lc.shape)
        return anc.unsqueeze(1) == col(self.tab, "levels", d)

    def mask(self, d: int) -> paddle.Tensor:
        """``[B, n_d or 1, P]``: valid pixel, and not a strict descendant of a partial label."""
        m = self.valid
        if self.has_partial:
            lab = self.lc.unsqueeze(1)
            for e in range(d):
                below = (self.label_depth == e + 1).unsqueeze(1) & (col(self.tab, "anc_at", d, e) == lab)
                m = m & ~below
        return m

    def count(self, d: int, mask: paddle.Tensor) -> paddle.Tensor:
        n = int(self.tab.plan.levels[d].size)
        c = mask.astype("int64").sum()
        return c * n if mask.shape[1] == 1 else c


def _weight_blocks(weight, tab, L):
    if weight is None:
        return [None] * L
    return [paddle.index_select(weight, vec(tab, "levels", d)).reshape([1, -1, 1]) for d in range(L)]


def _unblock(blocks: list[paddle.Tensor], tab: PlaceTables) -> paddle.Tensor:
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
    return paddle.index_select(cat, vec(tab, "inverse"), axis=1)


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
    attains = paddle.index_select(zmax_d, vec(tab, "parent_pos", d + 1), axis=1) == below
    surplus = attains.astype("int64").sum() - (itself_d == 0).astype("int64").sum()
    if not building_program() and int(surplus) == 0:  # one host sync per depth and chunk (none in a program)
        return attains.astype(ct)
    plan = tab.plan
    first = paddle.full(zmax_d.shape, -1, dtype="int32")
    for r in range(len(plan.child_ranks[d]) - 1, -1, -1):
        hit = paddle.index_select(below, _rank_index(tab, d, r), axis=1) == zmax_d
        if plan.child_ranks[d][r][1] is not None:
            hit = hit & _rank_valid(tab, d, r)
        first = paddle.where(hit, paddle.full([1], r, dtype="int32"), first)
    parent_first = paddle.index_select(first, vec(tab, "parent_pos", d + 1), axis=1)
    return (parent_first == col(tab, "slot", d + 1)).astype(ct)


def _block_z(labels, d, zmin_d, zmax_d):
    """``(positive mask, z)``: ``z = -zmin`` on positives, ``zmax`` elsewhere; negates ``zmin_d`` in
    place (the sweeps' own copy, dropped by the callers right after; a static program has no
    in-place op on it)."""
    pos = labels.positive(d)
    return pos, paddle.where(pos, -zmin_d if building_program() else zmin_d.neg_(), zmax_d)


def _forward_chunk(x, lc, tab, gamma, reduction, weight, has_partial):
    """Top-down ``zmin`` for all depths, then bottom-up ``zmax`` with each depth's loss computed as
    soon as its ``zmax`` exists; blocks are dropped as soon as they are no longer needed.

    Returns the loss map ``[B, N, p]`` for ``reduction="none"``, else per-depth (sums, counts)."""
    ct = compute_dtype(x.dtype)
    L = tab.plan.max_depth
    xc = x.astype(ct) if x.dtype != ct else x

    def block(d):
        return paddle.index_select(xc, vec(tab, "levels", d), axis=1)

    zmin = [block(0)]
    for d in range(1, L):
        zp = paddle.index_select(zmin[d - 1], vec(tab, "parent_pos", d), axis=1)
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
            loss = loss.multiply_(ws[d].expand(loss.shape))
        m = labels.mask(d)
        keep = m.astype(ct)  # 0/1: selects exactly (the loss is finite)
        loss = loss.multiply_(keep.expand(loss.shape) if keep.shape != loss.shape else keep)
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


def depth_coefs(lc, tab, reduction, g_up, ct):
    """Per-depth factors (length ``max_depth``) turning the sum of a depth's entries into the scalar
    ``reduction``, times ``g_up``: ``g_up`` (sum), ``g_up / count`` (mean, all unmasked entries) or
    ``g_up * 5 / count_d`` (hssn, the depth's unmasked entries). Counts are over all pixels, from a
    histogram of the label channels ``[B, P]`` (-1 = ignored): ``count_d = sum_c hist[c] * counted_per_depth[c, d]``."""
    L = tab.plan.max_depth
    if reduction == "sum":
        return [g_up] * L
    # valid pixels per label channel (index 0 of the shifted bincount counts the ignored ones)
    hist = paddle.bincount(lc.reshape([-1]) + 1, minlength=tab.plan.num_nodes + 1)[1:]
    per_depth = paddle.matmul(hist.astype("float64").unsqueeze(0), vec(tab, "counted_per_depth")).reshape([L])
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
        coefs = depth_coefs(lc, tab, reduction, grad_out.astype(ct).reshape([]), ct)
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
        return paddle.index_select(xc, vec(tab, "levels", d), axis=1)

    zmin, took = [block(0)], [None] * L
    for d in range(1, L):
        zp = paddle.index_select(zmin[d - 1], vec(tab, "parent_pos", d), axis=1)
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
            gz = gz.multiply_(paddle.index_select(up, vec(tab, "levels", d), axis=1))
        else:
            keep = keep * coefs[d]  # 0 or the coefficient, exactly
        if ws[d] is not None:
            gz = gz.multiply_(ws[d].expand(gz.shape))
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
            c = c.add_(paddle.index_select(down, vec(tab, "parent_pos", d), axis=1).multiply_(chosen[d]))
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
                c = c.add_(paddle.index_select(handed, _rank_index_padded(tab, d, r), axis=1))
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


def no_pixel(shape: Sequence[int]) -> bool:
    """B = 0 or a zero-size spatial axis. The ops answer such inputs before reshaping: paddle's
    reshape reads a 0 in the target shape as "keep this axis"."""
    return _checks.is_empty([shape[0], *shape[2:]])


def tree_min_op(logits, label_channels, hierarchy, *, gamma, reduction, node_weight, has_partial=True):
    """Tree-min (``gamma == 0``) or focal tree-min loss; ``label_channels`` int64 ``[B, *spatial]``."""
    if no_pixel(logits.shape):
        return empty_loss(logits, reduction)
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    P = math.prod(spatial)
    x = logits.reshape([B, N, P])
    lc = label_channels.reshape([B, P])
    tab = tables_for(hierarchy, place_of(logits))
    weight = None
    if node_weight is not None:
        weight = node_weight.astype(compute_dtype(logits.dtype))
    if building_program():
        # A static program differentiates the forward's ops itself (a PyLayer that the library
        # does not transcribe cannot enter it): the same gradient, except at exact ties of zmin
        # or zmax, which paddle's max/min gradients may route to another node than the tie rule.
        # The in-place ops of the eager forward are plain ops in a program (their results are
        # always rebound): paddle's warning that says so is silenced here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="In static graph mode, .* does not perform inplace")
            out = _tree_min_forward(x, lc, tab, float(gamma), reduction, weight, bool(has_partial))
    else:
        out = _TreeMinFunction.apply(x, lc, tab, float(gamma), reduction, weight, bool(has_partial))
    return out.reshape([B, N, *spatial]) if reduction == "none" else out


# ---------------------------------------------------------------------------- targets
def expand_targets_op(
    label_channels: paddle.Tensor, hierarchy: Hierarchy
) -> tuple[paddle.Tensor, paddle.Tensor]:
    B = label_channels.shape[0]
    spatial = list(label_channels.shape[1:])
    N = hierarchy.num_nodes
    if _checks.is_empty(label_channels.shape):
        return paddle.zeros([B, N, *spatial], dtype="uint8"), paddle.zeros([B, N, *spatial], dtype="bool")
    lc = label_channels.reshape([B, math.prod(spatial)])
    tab = tables_for(hierarchy, place_of(lc))
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


# ---------------------------------------------------------------------------- cross-entropy per depth
def depth_cross_entropy_op(logits, label_channels, hierarchy, depth):
    """Mean cross-entropy over the classes at ``depth``; see :func:`depth_cross_entropy`."""
    if no_pixel(logits.shape):
        return empty_loss(logits, "mean")
    tab = tables_for(hierarchy, place_of(logits))
    plan = tab.plan
    B, N = logits.shape[:2]
    P = math.prod(logits.shape[2:])
    ct = compute_dtype(logits.dtype)
    classes = tab.get(("depth_channels", depth), lambda: plan.depth_channels[depth - 1])
    x = paddle.index_select(logits.reshape([B, N, P]), classes, axis=1).astype(ct)  # [B, C, P]
    lc = label_channels.reshape([B, P])
    safe = paddle.clip(lc, min=0).reshape([-1])
    target_ch = paddle.index_select(vec(tab, "anc_col", depth - 1), safe)
    label_depth = paddle.index_select(vec(tab, "depth"), safe)
    leaf = paddle.index_select(tab.get("is_leaf", lambda: plan.is_leaf), safe)
    known = (lc.reshape([-1]) >= 0) & (leaf | (label_depth >= depth))
    position = np.full(N, 0, dtype=np.int64)
    position[plan.depth_channels[depth - 1]] = np.arange(plan.depth_channels[depth - 1].size)
    target = paddle.index_select(tab.get(("position", depth), lambda: position), target_ch)
    logp = F.log_softmax(x, axis=1)  # [B, C, P]
    picked = paddle.take_along_axis(logp, target.reshape([B, 1, -1]), axis=1).reshape([-1])
    total = -paddle.where(known, picked, paddle.zeros([1], dtype=ct)).sum()
    return total / paddle.clip(known.astype("int64").sum(), min=1).astype(ct)


# ---------------------------------------------------------------------------- triplet loss
def resize_labels_nearest(labels: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """Nearest resampling of ``[B, H, W]`` with the reference rule (``hieraloss.numpy``)."""
    out = labels
    for axis, (n_in, n_out) in enumerate(zip(labels.shape[1:], size, strict=True), start=1):
        if n_in == n_out:
            continue
        src = np.floor(np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out)))
        index = paddle.to_tensor(np.minimum(src.astype(np.int64), n_in - 1), place=place_of(labels))
        out = paddle.index_select(out, index, axis=axis)
    return out


def triplet_op(embeddings, leaf, hierarchy, *, max_per_class, base_margin, sampling, generator):
    """Hierarchy-margin triplet loss; ``leaf`` is a host ``[B, h, w]`` array of leaf ids (-1 elsewhere).

    Triplets are chosen on the host by the core rule (:mod:`hieraloss.core.triplets`; ``generator``
    a numpy Generator, so an int seed gives the triplets of every backend); the distances are
    paddle ops, so autograd reaches ``embeddings``.
    """
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[:2]
    flat = np.asarray(leaf).reshape(-1)
    keys = _triplets.key_order(flat, sampling, generator)
    ai, pi, ni, ac, pc, nc = _triplets.select_triplets(flat, keys, hierarchy, max_per_class)
    if ai.size == 0:
        flat = embeddings.reshape([-1])[:1]
        return (
            paddle.where(paddle.zeros_like(flat, dtype="bool"), flat, paddle.zeros_like(flat))
            .sum()
            .astype(ct)
        )
    emb = embeddings.astype(ct).reshape([B, C, -1]).transpose([0, 2, 1]).reshape([-1, C])
    place = place_of(embeddings)
    index = paddle.to_tensor(np.concatenate([ai, pi, ni]), place=place)
    rows = paddle.index_select(emb, index)
    rows = rows / paddle.clip(paddle.sqrt((rows * rows).sum(axis=1, keepdim=True)), min=NORM_EPS)
    t = ai.size
    e_a, e_p, e_n = rows[:t], rows[t : 2 * t], rows[2 * t :]
    margin = paddle.to_tensor(_triplets.margins(hierarchy, ac, pc, nc, base_margin), place=place).astype(ct)
    per = F.relu((1.0 - (e_a * e_p).sum(axis=1)) - (1.0 - (e_a * e_n).sum(axis=1)) + margin)
    classes, inverse, per_class = np.unique(ac, return_inverse=True, return_counts=True)
    weight = 1.0 / (per_class[inverse] * classes.size)  # mean per class, then over classes
    return (per * paddle.to_tensor(weight, place=place).astype(ct)).sum()


def _triplet_tables(tab: PlaceTables, hierarchy: Hierarchy) -> dict[str, paddle.Tensor]:
    """The selection's tables (as ``torch._ops.TripletTables``): ``group [K + 1]`` (sibling group of
    each leaf, G for the sentinel class K), ``class_ids [K + 2]``, ``group_ids [G + 2]`` and the
    flattened ``leaf_distance [(K + 1)**2]`` (0 in the sentinel row and column)."""
    K = hierarchy.num_leaves
    group = _triplets.sibling_groups(hierarchy)
    G = int(group.max()) + 1 if K else 0
    psi = np.zeros((K + 1, K + 1))
    psi[:K, :K] = hierarchy.leaf_distance
    return {
        "group": tab.get("triplet_group", lambda: np.append(group, G).astype(np.int64)),
        "class_ids": tab.get("triplet_class_ids", lambda: np.arange(K + 2, dtype=np.int64)),
        "group_ids": tab.get("triplet_group_ids", lambda: np.arange(G + 2, dtype=np.int64)),
        "psi": tab.get("triplet_psi", lambda: psi.reshape(-1)),
    }


def _partition_order(mask: paddle.Tensor) -> paddle.Tensor:
    """The positions where ``mask`` holds in ascending order, then the others in ascending order."""
    ahead = paddle.cumsum(mask.astype("int64"), axis=0)
    idx = paddle.arange(mask.shape[0], dtype="int64")
    slot = paddle.where(mask, ahead - 1, idx - ahead + ahead[-1:])
    return paddle.put_along_axis(paddle.zeros_like(idx), slot, idx, axis=0)


def _ith_outside(members_pos, rank, seg_of_member, seg_start, seg_of_query, i, stride):
    """As ``torch._ops._ith_outside``: the position of the i-th element outside a segment."""
    key = members_pos - rank + seg_of_member * stride
    found = paddle.searchsorted(key, i + seg_of_query * stride, right=True) - paddle.gather(seg_start, seg_of_query)
    return i + found


def triplet_program_op(embeddings, label_channels, hierarchy, *, max_per_class, base_margin, sampling):
    """The triplet loss inside a static program (``to_static(full_graph=True)``), where nothing is
    read back: the selection of ``torch._ops.triplet_select`` in paddle ops, on fixed-size slots
    ``S = min(K * max_per_class, P)``, and the score of ``torch._ops.triplet_score``. The same
    triplets as the eager path for ``sampling="first"``; ``"random"`` orders the taking-part pixels by
    float64 keys drawn from paddle's generator in the program (not the numpy draw of an int seed;
    ties keep flat order)."""
    tab = tables_for(hierarchy, place_of(embeddings))
    tt = _triplet_tables(tab, hierarchy)
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[:2]
    small = resize_labels_nearest(label_channels, embeddings.shape[2:])
    safe = paddle.clip(small, min=0).reshape([-1])
    is_leaf = (small.reshape([-1]) >= 0) & paddle.gather(vec(tab, "is_leaf"), safe)
    flat = paddle.where(is_leaf, paddle.gather(vec(tab, "node_ids"), safe), paddle.full_like(safe, -1))
    K, P = hierarchy.num_leaves, flat.shape[0]
    S, stride, last = min(K * max_per_class, P), P + 1, P - 1
    if sampling == "first":
        pixels = _partition_order(flat >= 0)
    else:
        keys = paddle.rand([P], dtype="float64")  # in [0, 1); the others sort after them at 2
        pixels = paddle.argsort(paddle.where(flat >= 0, keys, paddle.full_like(keys, 2.0)), stable=True)
    seq_cls = paddle.gather(flat, pixels)
    seq_cls = paddle.where(seq_cls >= 0, seq_cls, paddle.full_like(seq_cls, K))
    seq_grp = paddle.gather(tt["group"], seq_cls)
    by_cls = paddle.argsort(seq_cls, stable=True)
    by_grp = paddle.argsort(seq_grp, stable=True)
    cls_sorted, grp_sorted = paddle.gather(seq_cls, by_cls), paddle.gather(seq_grp, by_grp)
    cls_bound = paddle.searchsorted(cls_sorted, tt["class_ids"])
    grp_bound = paddle.searchsorted(grp_sorted, tt["group_ids"])
    cls_start, grp_start = cls_bound[:-1], grp_bound[:-1]
    n_cls, n_grp = cls_bound[1:] - cls_start, grp_bound[1:] - grp_start
    grp_of_cls = paddle.gather(n_grp, tt["group"])
    n_neg = cls_bound[K] - grp_of_cls
    T = paddle.clip(paddle.minimum(paddle.minimum(n_cls, grp_of_cls - n_cls), n_neg), 0, max_per_class)
    ends = paddle.cumsum(T, axis=0)
    slot = paddle.arange(S, dtype="int64")
    slot_cls = paddle.clip(paddle.searchsorted(ends, slot, right=True), max=K)
    slot_i = slot - paddle.gather(ends - T, slot_cls)
    slot_grp = paddle.gather(tt["group"], slot_cls)
    a_at = paddle.gather(by_cls, paddle.clip(paddle.gather(cls_start, slot_cls) + slot_i, max=last))
    idx = paddle.arange(P, dtype="int64")
    grp_rank = idx - paddle.gather(grp_start, grp_sorted)
    n_at = paddle.clip(_ith_outside(by_grp, grp_rank, grp_sorted, grp_start, slot_grp, slot_i, stride), max=last)
    in_grp = paddle.put_along_axis(paddle.zeros_like(idx), by_grp, grp_rank, axis=0)
    cls_rank = idx - paddle.gather(cls_start, cls_sorted)
    pos_local = _ith_outside(paddle.gather(in_grp, by_cls), cls_rank, cls_sorted, cls_start, slot_cls, slot_i,
                             stride)
    p_at = paddle.gather(by_grp, paddle.clip(paddle.gather(grp_start, slot_grp) + pos_local, max=last))
    emb = embeddings.astype(ct).reshape([B, C, -1]).transpose([0, 2, 1]).reshape([-1, C])

    def unit_rows(at):
        rows = paddle.gather(emb, paddle.gather(pixels, at))
        return rows / paddle.clip(paddle.sqrt((rows * rows).sum(axis=1, keepdim=True)), min=NORM_EPS)

    e_a, e_p, e_n = unit_rows(a_at), unit_rows(p_at), unit_rows(n_at)
    p_cls, n_cls_of = paddle.gather(seq_cls, p_at), paddle.gather(seq_cls, n_at)
    psi = tt["psi"]
    margin = base_margin + (paddle.gather(psi, slot_cls * (K + 1) + n_cls_of)
                            - paddle.gather(psi, slot_cls * (K + 1) + p_cls)).astype(ct) / (2.0 * hierarchy.max_depth)
    per = F.relu((1.0 - (e_a * e_p).sum(axis=1)) - (1.0 - (e_a * e_n).sum(axis=1)) + margin)
    per = paddle.where(slot_cls < K, per, paddle.zeros_like(per))
    per_class = paddle.put_along_axis(paddle.zeros([K + 1], dtype=ct), slot_cls, per, axis=0, reduce="add")
    has = T > 0
    class_mean = paddle.where(has, per_class / paddle.clip(T, min=1).astype(ct), paddle.zeros_like(per_class))
    return class_mean.sum() / paddle.clip(has.astype("int64").sum(), min=1).astype(ct)


# ---------------------------------------------------------------------------- decoding
def _path_scores(scores, tab):
    """``[B, K, P]``: sum of ``scores`` along each leaf's path, root first (leaves by channel)."""
    plan = tab.plan
    out = paddle.index_select(scores, vec(tab, "leaf_cols", 0), axis=1)
    zero = paddle.zeros([1], dtype=scores.dtype)
    for d in range(1, plan.max_depth):
        part = paddle.index_select(scores, vec(tab, "leaf_cols", d), axis=1)
        if plan.leaf_on[d].all():
            out = out + part
        else:
            out = out + paddle.where(col(tab, "leaf_on", d), part, zero)
    return out


def _top_down(x, tab):
    plan = tab.plan
    top = vec(tab, "levels", 0)
    chosen = paddle.index_select(
        top, argmax_nan_first(paddle.index_select(x, top, axis=1), axis=1).reshape([-1])
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
        step = paddle.take_along_axis(cand, argmax_nan_first(vals, axis=1, keepdim=True), axis=1).squeeze(1)
        chosen = paddle.where(paddle.index_select(leaf, flat).reshape([B, P]), chosen, step)
    return chosen


def decode_op(logits, hierarchy, method):
    """``(leaf node ids [B, *spatial], depth node ids [B, L, *spatial])`` (int64)."""
    tab = tables_for(hierarchy, place_of(logits))
    plan = tab.plan
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    L = plan.max_depth
    if no_pixel(logits.shape):  # no pixel: empty maps of the right shapes
        return paddle.zeros([B, *spatial], dtype="int64"), paddle.zeros([B, L, *spatial], dtype="int64")
    node_ids = vec(tab, "node_ids")
    with paddle.no_grad():
        x = logits.detach().reshape([B, N, math.prod(spatial)]).astype(compute_dtype(logits.dtype))
        P = x.shape[2]
        if method == "independent":
            per_depth = []
            for d in range(L):
                dc = vec(tab, "depth_channels", d)
                best = argmax_nan_first(paddle.index_select(x, dc, axis=1), axis=1)
                per_depth.append(paddle.index_select(dc, best.reshape([-1])).reshape([B, P]))
            depth_ch = paddle.stack(per_depth, axis=1)
            leaf = per_depth[-1]
        else:
            if method == "top_down":
                leaf = _top_down(x, tab)
            else:
                scores = x if method == "path" else F.softmax(x, axis=1)
                best = argmax_nan_first(_path_scores(scores, tab), axis=1)  # first max = lowest leaf channel
                leaf = paddle.index_select(vec(tab, "leaf_sorted"), best.reshape([-1])).reshape([B, P])
            depth_ch = (
                paddle.index_select(vec(tab, "ancestor_table"), leaf.reshape([-1]))
                .reshape([B, P, L])
                .transpose([0, 2, 1])
            )
        leaf_ids = paddle.index_select(node_ids, leaf.reshape([-1])).reshape([B, *spatial])
        depth_ids = paddle.index_select(node_ids, depth_ch.reshape([-1])).reshape([B, L, *spatial])
    return leaf_ids, depth_ids



def path_scores_op(logits, hierarchy):
    """Leaf scores ``[B, K, *spatial]`` in leaf-id order: the sum of ``logits`` along each leaf's path
    (root first, in the compute dtype; differentiable). Their argmax over axis 1 is the leaf that
    ``decode_op(logits, hierarchy, "path")`` picks (as a position in leaf-id order)."""
    tab = tables_for(hierarchy, place_of(logits))
    B, N = logits.shape[:2]
    spatial = list(logits.shape[2:])
    x = logits.astype(compute_dtype(logits.dtype))
    if no_pixel(logits.shape):  # no pixel: the empty map, still connected to the logits
        return paddle.index_select(x, vec(tab, "leaf_sorted"), axis=1)
    scores = _path_scores(x.reshape([B, N, math.prod(spatial)]), tab)  # leaves by channel
    order = tab.plan.leaf_id_order
    if not np.array_equal(order, np.arange(order.size)):
        scores = paddle.index_select(scores, vec(tab, "leaf_id_order"), axis=1)
    return scores.reshape([B, hierarchy.num_leaves, *spatial])
