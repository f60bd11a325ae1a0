"""The cross-entropy over the classes of one depth, in torch ops."""

from __future__ import annotations

import math

import torch

from ...hierarchy import Hierarchy
from .device import compute_dtype, device_plan


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
