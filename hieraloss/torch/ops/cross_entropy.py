"""The cross-entropy over the classes of one depth, in torch ops."""

from __future__ import annotations

import math

import torch

from ...hierarchy import Hierarchy
from . import route
from .device import compute_dtype, device_plan
from .labels import check_label_values, label_channels


def depth_cross_entropy_op(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy,
                           depth: int) -> torch.Tensor:
    """Mean cross-entropy over the classes at ``depth`` (``hierarchy.depth_channels[depth-1]``).

    The target is the labelled node's ancestor at that depth; ignored pixels and partial labels
    coarser than ``depth`` do not count. No valid pixel gives an exact 0 connected to the logits.
    """
    plan = device_plan(hierarchy, logits.device)
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


def depth_cross_entropy(x: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, depth: int, *,
                        ignore_index: int, backend: str, check_labels: bool) -> torch.Tensor:
    """:func:`depth_cross_entropy_op` of node-id ``labels`` (checked at the door but for their values),
    or the fused Triton objective with only that depth's weight where :mod:`.route` picks it (there is
    no compiled CPU kernel for it alone: ``"native"`` runs the torch op)."""
    if route.use_triton(backend, x, hierarchy):
        if check_labels:
            check_label_values(labels, hierarchy, ignore_index)
        weights = [0.0] * hierarchy.max_depth
        weights[depth - 1] = 1.0
        total, _ = route.kernels().fused_objective(x, labels, hierarchy, ignore_index=ignore_index, tree_min=False,
                                                   ce_weights=weights)
        return total
    lc, _ = label_channels(labels, hierarchy, ignore_index, check_labels)
    return depth_cross_entropy_op(x, lc, hierarchy, depth)
