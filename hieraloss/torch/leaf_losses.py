"""Hierarchical objectives on a flat model's leaf logits (Bertinetto et al., CVPR 2020), torch backend.

Same names, arguments and semantics as :mod:`hieraloss.numpy.leaf_losses` (the reference). The
shared rules come from the core: argument checks and messages (:mod:`hieraloss.core.checks`), the
reductions and decoders (:mod:`hieraloss.core.rules`), the bottom-up log-sum-exp plan, the
hierarchical cross-entropy coefficients and the soft targets (:mod:`hieraloss.core.leaf`).
Leaf logits ``[B, K, *spatial]`` in leaf-id order; labels ``[B, *spatial]`` of node ids, checked
and mapped to channels by the same label checks as the other torch losses. Values are float64 for
float64 logits and float32 otherwise (float16/bfloat16 are accumulated in float32); gradients come
back in the logits' dtype through autograd. Inputs are never modified.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..core.checks import (
    check_hierarchy,
    check_leaf_decode_method,
    check_leaf_logits,
    check_leaf_reduction,
    check_nonnegative,
)
from ..core.leaf import (
    check_hxe_weighting,
    coefficients_from_path_weights,
    hxe_coefficients,
    leaf_plan,
    soft_targets,
)
from ..core.plan import plan_for
from ..core.rules import LEAF_DECODE_METHODS, LEAF_REDUCTIONS
from ..hierarchy import Hierarchy
from ._tables import cached_on
from .functional import _check_finite, _labels_at_door, upsample_to_labels
from .ops.decode import decode_op
from .ops.labels import label_channels

__all__ = [
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]


class _DevicePlan:
    """:class:`hieraloss.core.leaf.LeafPlan` as index tensors on one device
    (``common_depth`` transposed: ``[K, N]``)."""

    def __init__(self, tab):
        plan = leaf_plan(tab.hierarchy)
        dev = tab.device

        def t(a):
            return torch.tensor(a, dtype=torch.int64, device=dev)

        self.leaf_channels = t(plan.leaf_channels)
        self.steps = [(t(nodes), [(count, t(kids)) for count, kids in ranks]) for nodes, ranks in plan.steps]
        self.leaf_path_ids = t(plan.leaf_path_ids)
        self.common_depth_t = t(plan.common_depth.T)  # [K, N]
        self.depth = tab.depth  # [N]
        # For the tables a compiled graph builds itself (see hierarchical_cross_entropy):
        h = tab.hierarchy
        f64 = dict(dtype=torch.float64, device=dev)
        self.edge_level = {"depth": torch.tensor(h.depth, **f64), "height": torch.tensor(h.height, **f64)}
        self.root_level = {"depth": 0.0, "height": float(h.height.max()) + 1.0}
        self.ancestor_table = tab.ancestor_table  # [N, L]
        self.path_real = torch.tensor(plan_for(h).path_real, device=dev)  # [N, L] bool
        self.leaf_distance_t = torch.tensor(h.node_leaf_distance.T, **f64)  # [K, N]


def _hxe_table_in_graph(plan: _DevicePlan, alpha: Any, weighting: str, normalize: bool,
                        dtype: torch.dtype) -> torch.Tensor:
    """:func:`hieraloss.core.leaf.hxe_coefficients` as torch ops (``alpha`` may be symbolic)."""
    w = torch.exp(plan.edge_level[weighting] * -alpha)
    if normalize:
        root = torch.full((), plan.root_level[weighting], dtype=w.dtype, device=w.device)
        w = w / (w.sum() + torch.exp(root * -alpha))
    path = torch.where(plan.path_real, w[plan.ancestor_table], torch.zeros((), dtype=w.dtype, device=w.device))
    return coefficients_from_path_weights(path, torch.cat).to(dtype)


def _hxe_table(tab, alpha: float, weighting: str, normalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor]:
    coef = hxe_coefficients(tab.hierarchy, alpha, weighting, normalize)
    return (torch.tensor(coef, dtype=dtype, device=tab.device),)


def _soft_table(tab, beta: float, dtype: torch.dtype) -> tuple[torch.Tensor]:
    return (torch.tensor(soft_targets(tab.hierarchy, beta).T, dtype=dtype, device=tab.device),)


def _finite_shift(top: torch.Tensor) -> torch.Tensor:
    """The shift of a log-sum-exp: the maximum, or 0 where it is infinite, so that a +inf (or an
    all -inf) row gives +inf (-inf) as ``torch.logsumexp`` does, not NaN from ``inf - inf``."""
    return torch.where(torch.isinf(top), torch.zeros((), dtype=top.dtype, device=top.device), top)


def _rows_by_label(table_t: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """``table[safe]`` laid out as ``[B, K, P]`` for a transposed table ``table_t [K, N]`` and label
    channels ``safe [B, P]`` (pixels stay the contiguous axis, like the logits')."""
    B, P = safe.shape
    K = table_t.shape[0]
    rows = torch.gather(table_t, 1, safe.reshape(1, -1).expand(K, -1))  # faster than index_select on dim 1
    return rows.view(K, B, P).permute(1, 0, 2)


def _device_plan(hierarchy: Hierarchy, device: torch.device) -> _DevicePlan:
    return cached_on(hierarchy, device, "_leaf_plan", _DevicePlan)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _checked_leaf_logits(leaf_logits: Any, hierarchy: Hierarchy) -> torch.Tensor:
    check_hierarchy(hierarchy)
    if not isinstance(leaf_logits, torch.Tensor):
        raise TypeError(f"leaf_logits must be a torch.Tensor, got {type(leaf_logits).__name__}")
    check_leaf_logits(tuple(leaf_logits.shape), str(leaf_logits.dtype).replace("torch.", ""), hierarchy)
    return leaf_logits


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """``[B, K, P]`` in the compute dtype (a new tensor for halves; a view otherwise)."""
    B, K = x.shape[:2]
    spatial = tuple(x.shape[2:])
    return x.reshape(B, K, math.prod(spatial)).to(_compute_dtype(x.dtype)), B, spatial


@torch.no_grad()
def node_log_sum_exp(x: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """``[B, N, P]`` (channel order): the log-sum-exp of the leaf logits ``x [B, K, P]`` under each
    node, built bottom-up with ``logaddexp`` one child rank at a time (no autograd: the losses
    have their own backward)."""
    plan = _device_plan(hierarchy, x.device)
    lse = x.new_empty(x.shape[0], hierarchy.num_nodes, x.shape[2])
    lse.index_copy_(1, plan.leaf_channels, x)
    for nodes, ranks in plan.steps:
        acc = lse.index_select(1, ranks[0][1])
        for count, kids in ranks[1:]:
            acc[:, :count] = torch.logaddexp(acc[:, :count], lse.index_select(1, kids))
        lse.index_copy_(1, nodes, acc)
    return lse


# Below this sum of exp(x - max) a subtree's log-sum-exp is recomputed with its own maximum.
_TINY = {torch.float32: 1e-30, torch.float64: 1e-290}
_EXP_CAP = {torch.float32: 80.0, torch.float64: 700.0}


class _HierarchicalCE(torch.autograd.Function):
    """Per-pixel hierarchical cross-entropy ``sum_{d=0..L} coef[c, d] * LSE(C_d)`` (``C_0`` = root,
    ``C_d`` the node at depth d of the label's path, the label itself below its depth;
    :func:`hieraloss.core.leaf.hxe_coefficients`).

    Leaf l is under ``C_0 .. C_m`` with ``m = common_depth[c, l]`` (``LeafPlan.common_depth``).
    Forward: with ``e = exp(x - max_l x)``, the leaves are bucketed by m (one scatter-add), and
    ``LSE(C_d) = max + log(sum of the buckets >= d)``. A depth where some pixel's sum falls below
    ``_TINY`` (its subtree ~70 nats or more below the pixel's best leaf) is recomputed with the
    subtree's own maximum, so nothing underflows.

    Backward: ``d LSE(v) / d x_l = exp(x_l - LSE(v)) = e_l exp(max - LSE(v))`` for the leaves under
    v, so the gradient is ``e_l * sum_{d <= m(l)} k_d`` with per-pixel ``k_d = grad * coef_d *
    exp(max - LSE(C_d))`` (a cumulative sum over depths, gathered by m): a few passes over the
    logits and no ``[B, N, P]`` tensor. Recomputed depths add ``exp(x - LSE(C_d))`` on their
    subtree instead.
    """

    @staticmethod
    def forward(ctx, xf, safe, coef_table, hierarchy):
        L = hierarchy.max_depth
        B, _, P = xf.shape
        plan = _device_plan(hierarchy, xf.device)
        m = _rows_by_label(plan.common_depth_t, safe)  # [B, K, P]
        top = _finite_shift(xf.amax(dim=1, keepdim=True))  # [B, 1, P]
        buckets = xf.new_zeros((B, L + 1, P)).scatter_add_(1, m, torch.exp(xf - top))
        sums = buckets.flip(1).cumsum(dim=1).flip(1)  # [B, L+1, P]: sum of e over the leaves under C_d
        # Depths below the label's own take the label's value (their coefficient is 0).
        d_index = torch.minimum(torch.arange(L + 1, device=xf.device).view(1, -1, 1),
                                plan.depth[safe].unsqueeze(1))
        sums = torch.gather(sums, 1, d_index)
        path = top + torch.log(sums)
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph: redo every depth below the root
            redo = list(range(1, L + 1))
        else:
            redo = [int(d) for d in torch.nonzero((sums < _TINY[xf.dtype]).any(dim=2).any(dim=0)).flatten().tolist()]
        if redo:  # rare: LSE of the subtree with the subtree's own maximum
            neg_inf = torch.full((), -math.inf, dtype=xf.dtype, device=xf.device)
            label_depth = m.amax(dim=1, keepdim=True)  # [B, 1, P]: the leaves under c have m = depth(c)
            for d in redo:
                masked = torch.where(m >= label_depth.clamp(max=d), xf, neg_inf)
                best = _finite_shift(masked.amax(dim=1, keepdim=True))
                path[:, d] = (best + torch.log(torch.exp(masked - best).sum(dim=1, keepdim=True))).squeeze(1)
        coef = coef_table[safe].permute(0, 2, 1)  # [B, L+1, P]
        ctx.save_for_backward(xf, safe, path, coef_table, top)
        ctx.hierarchy, ctx.redo = hierarchy, redo
        # a 0 coefficient contributes 0 even where its LSE is infinite (a -inf label logit)
        return torch.where(coef != 0, coef * path, torch.zeros((), dtype=path.dtype, device=path.device)).sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xf, safe, path, coef_table, top = ctx.saved_tensors
        plan = _device_plan(ctx.hierarchy, xf.device)
        m = _rows_by_label(plan.common_depth_t, safe)
        coef = coef_table[safe].permute(0, 2, 1) * grad.unsqueeze(1)  # [B, L+1, P]
        k = coef * torch.exp((top - path).clamp(max=_EXP_CAP[xf.dtype]))  # 0 wherever coef is 0
        for d in ctx.redo:
            k[:, d] = 0
        dx = torch.exp(xf - top).mul_(torch.gather(k.cumsum(dim=1), 1, m))
        for d in ctx.redo:
            part = torch.exp(xf - path[:, d].unsqueeze(1)).mul_((m >= d).to(xf.dtype))
            dx.add_(part.nan_to_num_(0.0, 0.0, 0.0) * coef[:, d].unsqueeze(1))
        return dx, None, None, None


class _SoftLabelCE(torch.autograd.Function):
    """Per-pixel ``LSE(x) - sum_l q[c, l] x_l``; backward ``softmax(x) - q[c]`` (q gathered again)."""

    @staticmethod
    def forward(ctx, xf, safe, targets_t):
        root = torch.logsumexp(xf, dim=1)  # [B, P]
        loss = root - (_rows_by_label(targets_t, safe) * xf).sum(dim=1)
        ctx.save_for_backward(xf, safe, targets_t, root)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xf, safe, targets_t, root = ctx.saved_tensors
        dx = torch.exp(xf - root.unsqueeze(1)).sub_(_rows_by_label(targets_t, safe))
        return dx.mul_(grad.unsqueeze(1)), None, None


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str, B: int, spatial: tuple[int, ...]):
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss.reshape(B, *spatial)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(loss.dtype)


def _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, value, name, upsample_logits, check_finite):
    x = upsample_to_labels(_checked_leaf_logits(leaf_logits, hierarchy), labels, upsample_logits)
    v = check_nonnegative(value, name)
    check_leaf_reduction(reduction)
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    if check_finite:
        _check_finite(x, "leaf_logits")
    lc, _ = label_channels(labels, hierarchy, ignore_index)
    xf, B, spatial = _flat(x)
    lc = lc.reshape(B, xf.shape[2])
    return xf, lc, B, spatial, v


def hierarchical_cross_entropy(leaf_logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
                               alpha: float = 0.1, ignore_index: int = 255, reduction: str = "mean",
                               upsample_logits: bool = False, weighting: str = "depth",
                               normalize: bool = False, check_finite: bool = False) -> torch.Tensor:
    """Hierarchical cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    ``-sum over the edges of the label's path of w(C) * log p(C | parent(C))``, with the published
    ``w(C) = exp(-alpha * depth(C))`` (``weighting="depth"``, a top-level node has depth 1; ``"height"``:
    ``exp(-alpha * height(C))``; ``normalize=True`` divides by the sum over all nodes, as the released
    code: :func:`hieraloss.core.leaf.hxe_edge_weights`),
    p from the softmax over leaves (``p(C)`` = sum of the leaf probabilities under C, computed as
    a log-sum-exp of the leaf logits). A partial label (internal node c) takes the edges from the
    root down to c. ``alpha = 0`` is the flat cross-entropy. ``reduction``: ``"mean"`` over
    counted (not ignored) pixels, ``"sum"`` or ``"none"`` (``[B, *spatial]``, 0 where ignored); no
    counted pixel gives an exact 0 connected to the graph. ``upsample_logits=True`` resizes leaf
    logits at a lower resolution than the labels first, as for :func:`~hieraloss.torch.tree_min_loss`.
    """
    check_hxe_weighting(weighting, normalize)
    xf, lc, B, spatial, a = _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, alpha, "alpha",
                                       upsample_logits, check_finite)
    valid = lc >= 0
    safe = lc.clamp(min=0)
    if torch.compiler.is_compiling():
        # In the graph, from alpha: torch.compile(dynamic=True) makes a float read from a module
        # attribute or a default symbolic, and no cache can be keyed on a symbolic number.
        coef = _hxe_table_in_graph(_device_plan(hierarchy, xf.device), a, weighting, bool(normalize), xf.dtype)
    else:
        key = ("hxe", a, weighting, bool(normalize), xf.dtype)
        (coef,) = cached_on(hierarchy, xf.device, key, _hxe_table, a, weighting, bool(normalize), xf.dtype)
    loss = _HierarchicalCE.apply(xf, safe, coef, hierarchy)
    return _reduce(loss, valid, reduction, B, spatial)


def soft_label_cross_entropy(leaf_logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
                             beta: float = 1.0, ignore_index: int = 255, reduction: str = "mean",
                             upsample_logits: bool = False, check_finite: bool = False) -> torch.Tensor:
    """Soft-label cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    Target over leaves ``q(l) = softmax_l(-beta * psi(c, l))`` for a pixel labelled c (psi =
    ``Hierarchy.node_leaf_distance``, edges through the lowest common ancestor). The paper uses the
    height of the lowest common ancestor over the tree height instead of psi: on a balanced tree of
    depth L, psi is twice that height, so its ``beta_paper`` is ``beta = beta_paper / (2 * L)`` here.
    Loss ``-sum_l q(l) log p(l)``. A partial label c measures the distances from the node c. Large beta tends to the
    flat cross-entropy. Reductions and ``upsample_logits`` as :func:`hierarchical_cross_entropy`.
    """
    xf, lc, B, spatial, b = _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, beta, "beta",
                                       upsample_logits, check_finite)
    valid = lc >= 0
    if torch.compiler.is_compiling():  # core.leaf.soft_targets (transposed) in the graph, as for HXE
        targets_t = torch.softmax(_device_plan(hierarchy, xf.device).leaf_distance_t * -b, dim=0).to(xf.dtype)
    else:
        (targets_t,) = cached_on(hierarchy, xf.device, ("soft", b, xf.dtype), _soft_table, b, xf.dtype)
    loss = _SoftLabelCE.apply(xf, lc.clamp(min=0), targets_t)
    return _reduce(loss, valid, reduction, B, spatial)


def decode_leaf_logits(leaf_logits: torch.Tensor, hierarchy: Hierarchy, method: str = "argmax"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``leaf_logits [B, K, *spatial]`` to ``(leaf_ids [B, *spatial], depth_labels [B, L,
    *spatial])`` (int64 node ids; ``depth_labels[:, d-1]`` is the node at depth d of the chosen
    leaf's path, a shallow leaf repeating).

    ``"argmax"``: the leaf argmax (ties: lowest leaf id). ``"top_down"``: among the depth-1 nodes,
    then among the children of the chosen node, ..., the node with the largest summed leaf
    probability (compared as the log-sum-exp of its leaf logits; ties: lowest channel); a chosen
    leaf stops the descent.
    """
    x = _checked_leaf_logits(leaf_logits, hierarchy)
    check_leaf_decode_method(method)
    with torch.no_grad():
        xf, B, spatial = _flat(x.detach())
        if method == "top_down" and xf.numel():
            lse = node_log_sum_exp(xf, hierarchy)
            return decode_op(lse.reshape(B, hierarchy.num_nodes, *spatial), hierarchy, "top_down")
        leaf = xf.argmax(dim=1)  # first maximum: lowest leaf id
        depth = _device_plan(hierarchy, x.device).leaf_path_ids[leaf].permute(0, 2, 1)
        return leaf.reshape(B, *spatial), depth.reshape(B, hierarchy.max_depth, *spatial)
