"""Hierarchical objectives on a flat model's leaf logits (Bertinetto et al., CVPR 2020), torch backend.

Same names, arguments and semantics as :mod:`hieraloss.numpy.leaf_losses` (the reference, which
also holds the shared rules: argument checks and messages, the bottom-up log-sum-exp plan, the
hierarchical cross-entropy coefficients and the soft targets). Leaf logits ``[B, K, *spatial]`` in
leaf-id order; labels ``[B, *spatial]`` of node ids, checked and mapped to channels by the same
label checks as the other torch losses. Values are float64 for float64 logits and float32
otherwise (float16/bfloat16 are accumulated in float32); gradients come back in the logits' dtype
through autograd. Inputs are never modified.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_hierarchy
from ..hierarchy import Hierarchy
from ..numpy.leaf_losses import (
    LEAF_DECODE_METHODS,
    LEAF_REDUCTIONS,
    check_leaf_decode_method,
    check_leaf_logits,
    check_leaf_reduction,
    check_nonnegative,
    hxe_coefficients,
    leaf_plan,
    soft_targets,
)
from . import _ops
from ._tables import tables_for
from .functional import _checked_labels

__all__ = [
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]


class _DevicePlan:
    """:class:`hieraloss.numpy.leaf_losses.LeafPlan` as index tensors on one device."""

    def __init__(self, tab):
        plan = leaf_plan(tab.hierarchy)
        dev = tab.device
        self.steps = [[(count, torch.tensor(pos, dtype=torch.int64, device=dev)) for count, pos in ranks]
                      for _, ranks in plan.steps]
        self.position = torch.tensor(plan.position, dtype=torch.int64, device=dev)
        self.leaf_path_ids = torch.tensor(plan.leaf_path_ids, dtype=torch.int64, device=dev)


def _device_plan(hierarchy: Hierarchy, device: torch.device) -> _DevicePlan:
    return tables_for(hierarchy, device).get("_leaf_plan", _DevicePlan)


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


def node_log_sum_exp(x: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """``[B, N, P]`` (channel order): the log-sum-exp of the leaf logits ``x [B, K, P]`` under each
    node, built bottom-up with ``logaddexp`` one child rank at a time (differentiable)."""
    plan = _device_plan(hierarchy, x.device)
    vals = x
    for ranks in plan.steps:
        acc = vals.index_select(1, ranks[0][1])
        for count, pos in ranks[1:]:
            head = torch.logaddexp(acc[:, :count], vals.index_select(1, pos))
            acc = head if count == acc.shape[1] else torch.cat([head, acc[:, count:]], dim=1)
        vals = torch.cat([vals, acc], dim=1)
    return vals.index_select(1, plan.position)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str, B: int, spatial: tuple[int, ...]):
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss.reshape(B, *spatial)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(loss.dtype)


def _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, value, name):
    x = _checked_leaf_logits(leaf_logits, hierarchy)
    v = check_nonnegative(value, name)
    check_leaf_reduction(reduction)
    lc, _ = _checked_labels(labels, x, hierarchy, ignore_index)
    xf, B, spatial = _flat(x)
    lc = lc.reshape(B, xf.shape[2])
    return xf, lc, B, spatial, v


def hierarchical_cross_entropy(leaf_logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
                               alpha: float = 0.1, ignore_index: int = 255, reduction: str = "mean"
                               ) -> torch.Tensor:
    """Hierarchical cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    ``-sum over the edges of the label's path of exp(-alpha * height(C)) * log p(C | parent(C))``,
    p from the softmax over leaves (``p(C)`` = sum of the leaf probabilities under C, computed as
    a log-sum-exp of the leaf logits). A partial label (internal node c) takes the edges from the
    root down to c. ``alpha = 0`` is the flat cross-entropy. ``reduction``: ``"mean"`` over
    counted (not ignored) pixels, ``"sum"`` or ``"none"`` (``[B, *spatial]``, 0 where ignored); no
    counted pixel gives an exact 0 connected to the graph.
    """
    xf, lc, B, spatial, a = _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, alpha, "alpha")
    tab = tables_for(hierarchy, xf.device)
    valid = lc >= 0
    safe = lc.clamp(min=0)
    lse = node_log_sum_exp(xf, hierarchy)  # [B, N, P]
    root = torch.logsumexp(xf, dim=1)  # [B, P]
    coef = torch.tensor(hxe_coefficients(hierarchy, a), dtype=xf.dtype, device=xf.device)[safe]  # [B, P, L+1]
    on_path = torch.gather(lse, 1, tab.ancestor_table[safe].permute(0, 2, 1))  # [B, L, P]
    loss = coef[..., 0] * root + (coef[..., 1:].permute(0, 2, 1) * on_path).sum(dim=1)
    return _reduce(loss, valid, reduction, B, spatial)


def soft_label_cross_entropy(leaf_logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
                             beta: float = 1.0, ignore_index: int = 255, reduction: str = "mean"
                             ) -> torch.Tensor:
    """Soft-label cross-entropy (Bertinetto et al. 2020) of ``leaf_logits [B, K, *spatial]``.

    Target over leaves ``q(l) = softmax_l(-beta * psi(c, l))`` for a pixel labelled c (psi =
    ``Hierarchy.node_leaf_distance``, edges through the lowest common ancestor; the paper divides
    its distance by the tree height, a constant factor absorbed in beta); loss ``-sum_l q(l) log
    p(l)``. A partial label c measures the distances from the node c. Large beta tends to the
    flat cross-entropy. Reductions as :func:`hierarchical_cross_entropy`.
    """
    xf, lc, B, spatial, b = _prepare(leaf_logits, labels, hierarchy, ignore_index, reduction, beta, "beta")
    valid = lc >= 0
    safe = lc.clamp(min=0)
    q = torch.tensor(soft_targets(hierarchy, b), dtype=xf.dtype, device=xf.device)[safe]  # [B, P, K]
    loss = torch.logsumexp(xf, dim=1) - (q.permute(0, 2, 1) * xf).sum(dim=1)
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
            return _ops.decode_op(lse.reshape(B, hierarchy.num_nodes, *spatial), hierarchy, "top_down")
        leaf = xf.argmax(dim=1)  # first maximum: lowest leaf id
        depth = _device_plan(hierarchy, x.device).leaf_path_ids[leaf].permute(0, 2, 1)
        return leaf.reshape(B, *spatial), depth.reshape(B, hierarchy.max_depth, *spatial)
