"""Vectorized torch ops (no validation: the functional API checks inputs first).

Everything works in channel space on logits viewed as ``[B, N, P]`` (P = all spatial positions)
and label channels ``[B, P]`` (-1 = ignored). Sweeps go one depth at a time, so
the work is O(N * depth) per pixel and no ``[B, N, N, P]`` or ``[B, N, Dmax, P]`` tensor is built.

Tree-min loss, split into the two kinds of entries of a valid pixel with label channel c:

* positives: the <= L nodes of ``A(c)``; ``zmin`` along that path is a running minimum, so the
  positive part lives in ``[B, L, P]`` tensors gathered along the path;
* negatives: every other node that is not an unknown descendant of a partial label;
  ``zmax`` is swept bottom-up over the whole ``[B, N, P]`` map.

Pixels are walked in tiles of ``TILE_ELEMENTS`` (pixel, node) entries (not one by one): the
passes of the sweeps then run in cache and temporaries stay tile-sized, so the peak extra memory
of forward+backward is about the gradient itself.

The autograd function saves only the logits and the label channels and recomputes ``zmax`` and
the arg-min / arg-max routing in backward, following the tie rule of DEVELOPING.md.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..hierarchy import Hierarchy
from ._tables import DeviceTables, tables_for

HSSN_SCALE = 5.0  # the published code multiplies its per-depth normalised sum by 5


# ---------------------------------------------------------------------------- per-device plan
class Plan:
    """Index tensors for level-by-level sweeps of one hierarchy on one device (channel space).

    ``levels[d-1]``: channels at depth d; ``level_parents[d-1]``: their parents. For the nodes of
    ``levels[d]`` (d >= 1): ``kid_rank[d]`` is each one's position among its siblings (channel
    order, which decides zmax ties) and ``kid_parent_local[d]`` its parent's index in ``levels[d-1]``.
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
        # For the kids at depth d+1 (= levels[d]): rank among siblings and the parent's position in levels[d-1].
        self.kid_rank = [None]
        self.kid_parent_local = [None]
        for d in range(1, h.max_depth):
            prev = {int(v): i for i, v in enumerate(self.levels[d - 1].tolist())}
            kids = self.levels[d].tolist()
            rank = [int(np.flatnonzero(h.children[int(h.parent[k])] == k)[0]) for k in kids]
            self.kid_rank.append(torch.tensor(rank, dtype=torch.int16, device=dev))
            self.kid_parent_local.append(torch.tensor([prev[int(h.parent[k])] for k in kids], **long))
        self.ancestor_table = tab.ancestor_table  # [N, L]
        self.depth = tab.depth  # [N]
        self.node_ids = tab.node_ids
        self.is_leaf = tab.is_leaf
        self.children_table = tab.children_table
        self.leaf_sorted = torch.sort(tab.leaf_channels).values
        self.depth_channels = [torch.tensor(dc, **long) for dc in h.depth_channels]
        # unknown_count[c, d-1]: strict descendants of c at depth d (those are masked for a partial label c).
        unknown = torch.zeros(h.num_nodes, h.max_depth, dtype=torch.float64)
        desc = h.descendant_table
        for c in range(h.num_nodes):
            for v in set(desc[c].tolist()) - {c}:
                unknown[c, int(h.depth[v]) - 1] += 1
        self.unknown_count = unknown.to(dev)
        per_depth = torch.bincount(torch.tensor(h.depth.tolist()) - 1, minlength=h.max_depth)
        self.nodes_at_depth = per_depth.to(dtype=torch.float64, device=dev)  # [L]


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


# ---------------------------------------------------------------------------- sweeps
def _index_reduce(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, how: str) -> None:
    """``out[:, index[i]] = how(out[:, index[i]], src[:, i])`` along dim 1 (index_reduce_ is faster
    than scatter_reduce_ here; it is marked beta, so its one-time notice is silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
        out.index_reduce_(1, index, src, how)


def zmax_sweep(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``zmax_v = max(x_v, zmax of v's children)`` bottom-up, for x ``[B, N, P]`` (a new tensor)."""
    zmax = x.clone(memory_format=torch.contiguous_format)
    B, _, P = x.shape
    for d in range(len(plan.levels) - 1, 0, -1):
        kids, par = plan.levels[d], plan.level_parents[d]
        _index_reduce(zmax, par, zmax.index_select(1, kids), "amax")
    return zmax


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


def _path_zmin(xp: torch.Tensor, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running min along the path ``[B, L, P]`` and the channel attaining it (the shallowest on ties)."""
    zmin = xp.clone()
    arg = path.clone()
    for d in range(1, xp.shape[1]):
        deeper = xp[:, d] < zmin[:, d - 1]
        zmin[:, d] = torch.where(deeper, xp[:, d], zmin[:, d - 1])
        arg[:, d] = torch.where(deeper, path[:, d], arg[:, d - 1])
    return zmin, arg


def _reduction_scales(lc: torch.Tensor, plan: Plan, reduction: str, dtype) -> torch.Tensor:
    """Per-channel factor turning a sum of entries into the reduction (``[N]``)."""
    N = plan.num_nodes
    if reduction == "sum":
        return torch.ones(N, dtype=dtype, device=lc.device)
    # Valid pixels per label channel; index 0 of the shifted bincount counts the ignored ones.
    hist = torch.bincount(lc.reshape(-1) + 1, minlength=N + 1)[1:].to(torch.float64)
    counts = hist @ (plan.nodes_at_depth.unsqueeze(0) - plan.unknown_count)  # [L] unmasked entries per depth
    if reduction == "mean":
        scale = 1.0 / counts.sum().clamp(min=1)
        return scale.to(dtype).expand(N)
    scale = HSSN_SCALE / counts.clamp(min=1)  # hssn
    return scale[plan.depth - 1].to(dtype)


# ---------------------------------------------------------------------------- tree-min op
# Pixels are processed in tiles of about TILE_ELEMENTS (pixel, node) entries so that the dozen
# passes of the sweeps stay in cache and the temporaries stay small (peak memory ~ the gradient).
TILE_ELEMENTS = 1 << 21  # CPU: about 8 MB per float32 tile, the fastest size measured on 2 cores
TILE_ELEMENTS_GPU = 1 << 26  # GPU: no cache to fit, only a cap on temporaries (and few launches)


def _tiles(B: int, P: int, N: int, device: torch.device):
    step = max(1, (TILE_ELEMENTS if device.type == "cpu" else TILE_ELEMENTS_GPU) // N)
    for b in range(B):
        for p0 in range(0, P, step):
            yield b, slice(b, b + 1), slice(p0, min(P, p0 + step))


_NO_CHILD = torch.iinfo(torch.int16).max


def _sweep_with_winners(x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """:func:`zmax_sweep` plus, per level, which child rank attains each node's zmax (-1: the node
    itself, which wins ties; among tied children the first in channel order wins)."""
    zmax = zmax_sweep(x, plan)
    B, _, P = x.shape
    winners: list[torch.Tensor | None] = [None] * len(plan.levels)
    for d in range(1, len(plan.levels)):
        kids, par, parents = plan.levels[d], plan.level_parents[d], plan.levels[d - 1]
        rank = plan.kid_rank[d].view(1, -1, 1)
        attains = zmax.index_select(1, kids) == zmax.index_select(1, par)
        cand = torch.where(attains, rank, _NO_CHILD)
        win = torch.full((B, parents.numel(), P), _NO_CHILD, dtype=torch.int16, device=x.device)
        _index_reduce(win, plan.kid_parent_local[d], cand, "amin")
        win.masked_fill_(x.index_select(1, parents) == zmax.index_select(1, parents), -1)
        winners[d - 1] = win
    return zmax, winners


def _route_max_gradient(grad: torch.Tensor, winners, plan: Plan) -> torch.Tensor:
    """Turn d loss / d zmax into d loss / d x in place: top-down, each node passes its gradient
    to the child that attains its zmax, and keeps it only if it attains it itself."""
    for d in range(1, len(plan.levels)):
        win = winners[d - 1]
        kids, par, parents = plan.levels[d], plan.level_parents[d], plan.levels[d - 1]
        hit = win.index_select(1, plan.kid_parent_local[d]) == plan.kid_rank[d].view(1, -1, 1)
        grad.index_add_(1, kids, grad.index_select(1, par).masked_fill_(~hit, 0.0))
        grad.index_copy_(1, parents, grad.index_select(1, parents).masked_fill_(win != -1, 0.0))
    return grad


def _forward_tile(x, lc, plan, gamma, has_partial, want_map, weight):
    """Loss map (``want_map``) or per-channel sums of the masked entries of one tile."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    lab = _Labels(lc, plan)
    zmin, _ = _path_zmin(torch.gather(xf, 1, lab.path), lab.path)
    pos = _pos_term(zmin, gamma).mul_(lab.on_path)
    del zmin
    neg = _neg_term(zmax_sweep(xf, plan), gamma)
    if has_partial:
        neg.masked_fill_(_unknown_mask(lc, plan), 0.0)
    if want_map:
        neg.scatter_(1, lab.path, 0.0)
        neg.masked_fill_(~lab.valid.unsqueeze(1), 0.0)
        neg.scatter_add_(1, lab.path, pos)
        if weight is not None:
            neg.mul_(weight.to(ct).view(1, -1, 1))
        return neg
    # Sums over valid pixels as a matrix-vector product; the path entries (positives) are then
    # taken out and the positive terms put in.
    per_channel = torch.bmm(neg, lab.valid.to(ct).unsqueeze(2)).view(-1)
    on_path_neg = torch.gather(neg, 1, lab.path).mul_(lab.on_path)
    return per_channel.index_add_(0, lab.path.reshape(-1), (pos - on_path_neg).reshape(-1))


def _forward(x, lc, plan, gamma, reduction, weight, has_partial):
    B, N, P = x.shape
    ct = compute_dtype(x.dtype)
    if reduction == "none":
        out = torch.empty(B, N, P, dtype=ct, device=x.device)
        for _, b, p in _tiles(B, P, N, x.device):
            out[b, :, p] = _forward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial, True, weight)
        return out
    per_channel = torch.zeros(N, dtype=ct, device=x.device)
    for _, b, p in _tiles(B, P, N, x.device):
        per_channel += _forward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial, False, None)
    scale = _reduction_scales(lc, plan, reduction, ct)
    if weight is not None:
        scale = scale * weight.to(ct)
    return (per_channel * scale).sum()


def _backward_tile(x, lc, plan, gamma, has_partial, up_map, per_channel, out):
    """d loss / d x of one tile, written into ``out`` if given (same dtype), else returned;
    ``up_map`` (reduction none, weighted) or ``per_channel`` factors."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    lab = _Labels(lc, plan)
    zmax, winners = _sweep_with_winners(xf, plan)
    grad = _neg_grad(zmax, gamma, out=out if out is not None and out.dtype == ct else None)
    del zmax
    if up_map is not None:
        up_pos = torch.gather(up_map, 1, lab.path)
        grad.mul_(up_map).masked_fill_(~lab.valid.unsqueeze(1), 0.0)
    else:
        up_pos = per_channel[lab.path]
        grad.mul_(per_channel.view(1, -1, 1)).masked_fill_(~lab.valid.unsqueeze(1), 0.0)
    grad.scatter_(1, lab.path, 0.0)
    if has_partial:
        grad.masked_fill_(_unknown_mask(lc, plan), 0.0)
    _route_max_gradient(grad, winners, plan)
    # Positives: d loss / d zmin along the path, added at the channel attaining each running min.
    zmin, arg = _path_zmin(torch.gather(xf, 1, lab.path), lab.path)
    gpos = _pos_grad(zmin, gamma).mul_(up_pos).mul_(lab.on_path)
    return grad.scatter_add_(1, arg, gpos)


def _backward(x, lc, plan, gamma, reduction, weight, has_partial, grad_out):
    B, N, P = x.shape
    ct = compute_dtype(x.dtype)
    grad = torch.empty(B, N, P, dtype=x.dtype, device=x.device)
    per_channel = None
    if reduction != "none":
        per_channel = _reduction_scales(lc, plan, reduction, ct) * grad_out.to(ct)
        if weight is not None:
            per_channel = per_channel * weight.to(ct)
    for _, b, p in _tiles(B, P, N, x.device):
        up = None
        if reduction == "none":
            up = grad_out[b, :, p].to(ct)
            if weight is not None:
                up = up * weight.to(ct).view(1, N, 1)
        out = grad[b, :, p]
        tile = _backward_tile(x[b, :, p], lc[b, p], plan, gamma, has_partial, up, per_channel, out)
        if tile.data_ptr() != out.data_ptr():
            out.copy_(tile)
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
    """Hierarchy-margin triplet loss; ``leaf`` ``[B, h, w]`` holds leaf ids, -1 where not taking part.

    All classes are handled at once: pixels are put in one key order (flat order for
    ``sampling="first"``, a random permutation otherwise) and the i-th anchor / positive / negative
    of every class is located by sorting and searching, with no loop over classes.
    """
    tab = tables_for(hierarchy, embeddings.device)
    dev = embeddings.device
    B, C = embeddings.shape[:2]
    K = hierarchy.num_leaves
    ct = compute_dtype(embeddings.dtype)
    emb = torch.nn.functional.normalize(embeddings.to(ct), dim=1, eps=1e-12)
    emb = emb.permute(0, 2, 3, 1).reshape(-1, C)
    flat = leaf.reshape(-1)
    pixels = torch.nonzero(flat >= 0).squeeze(1)
    if sampling == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(pixels.numel(), generator=generator, device=gen_device).to(dev)
        pixels = pixels[perm]
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
        return embeddings.reshape(-1)[:0].sum().to(ct)  # an exact 0 still connected to the embeddings

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

    psi = tab.leaf_distance
    margin = base_margin + (psi[slot_cls, flat[negative]] - psi[slot_cls, flat[positive]]).to(ct) / (
        2.0 * hierarchy.max_depth)
    e_a, e_p, e_n = emb[anchor], emb[positive], emb[negative]
    d_ap = 1.0 - (e_a * e_p).sum(dim=1)
    d_an = 1.0 - (e_a * e_n).sum(dim=1)
    per_triplet = torch.relu(d_ap - d_an + margin)
    per_class = torch.zeros(K, dtype=ct, device=dev).index_add_(0, slot_cls, per_triplet)
    has = T > 0
    return (per_class[has] / T[has].to(ct)).sum() / has.sum().to(ct)
