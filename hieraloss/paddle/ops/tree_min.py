"""The tree-min loss in paddle ops (the twin of :mod:`hieraloss.torch.ops.tree_min`): the eager sweeps
and their ``PyLayer``, the expanded targets, and the routing to the fused Triton kernel or the
compiled CPU kernel. No validation: :mod:`hieraloss.paddle.functional` checks first.

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

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ...core import checks as _checks
from ...core.rules import HSSN_SCALE
from ...hierarchy import Hierarchy
from .. import _bridge
from .._tables import PlaceTables, building_program, col, place_of, tables_for, vec
from . import native, route
from .device import compute_dtype, depth_coefs, empty_loss, no_pixel
from .labels import label_channels


# ---------------------------------------------------------------------------- elementwise pieces
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


def tree_min(x: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *, gamma: float, ignore_index: int,
             reduction: str, node_weight: paddle.Tensor | None, backend: str, check_labels: bool) -> paddle.Tensor:
    """The tree-min loss of node-id ``labels`` (checked at the door but for their values), on the
    implementation :mod:`.route` picks: the fused Triton kernel, the compiled CPU kernel or
    :func:`tree_min_op`."""
    lc, has_partial = label_channels(labels, hierarchy, ignore_index, check_labels)
    if route.use_triton(backend, x, hierarchy):
        return _bridge.fused_tree_min_loss(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=node_weight)
    if route.use_native(backend, x):
        return native.tree_min_native(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=node_weight)
    return tree_min_op(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=node_weight,
                       has_partial=has_partial)
