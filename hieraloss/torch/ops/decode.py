"""Decoding in torch ops: the leaf (and the node at every depth) of each pixel, and the path scores."""

from __future__ import annotations

import math

import torch

from ...core.objective import LOGIC_STEP_SIZE, LOGIC_STEPS
from ...hierarchy import Hierarchy
from . import route
from .device import DevicePlan, compute_dtype, device_plan
from .logicseg import refine


def _path_sums(scores: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    out = scores.clone()
    for lv, par in zip(plan.levels[1:], plan.level_parents[1:], strict=True):
        out.index_copy_(1, lv, out.index_select(1, par).add_(scores.index_select(1, lv)))
    return out


def _best_leaf(path_scores: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    leaves = plan.leaf_sorted
    return leaves[path_scores.index_select(1, leaves).argmax(dim=1)]  # argmax: first max = lowest channel


def _top_down(x: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
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
    plan = device_plan(hierarchy, logits.device)
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    with torch.no_grad():
        x = logits.detach().reshape(B, N, math.prod(spatial)).to(compute_dtype(logits.dtype))
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


def path_scores_op(logits: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """Leaf scores ``[B, K, *spatial]`` in leaf-id order: the sum of ``logits`` along each leaf's path
    (root first, in the compute dtype; differentiable). Their argmax over dim 1 is the leaf that
    ``decode_op(logits, hierarchy, "path")`` picks (as a position in leaf-id order)."""
    plan = device_plan(hierarchy, logits.device)
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    x = logits.reshape(B, N, math.prod(spatial)).to(compute_dtype(logits.dtype))
    leaves = plan.leaf_channels  # [K]: channel of leaf id k
    return _path_sums(x, plan).index_select(1, leaves).reshape(B, leaves.numel(), *spatial)


def decode(x: torch.Tensor, hierarchy: Hierarchy, method: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_op`, or the fused Triton decoder for ``"path"`` and ``"top_down"`` where
    :mod:`.route` picks it; ``"logic"`` refines the logits by LogicSeg's rule descent (its defaults)
    first and then decodes by ``"path"``. Decoding has no compiled CPU kernel."""
    if method == "logic":
        x, method = refine(x, hierarchy, LOGIC_STEPS, LOGIC_STEP_SIZE, 5.0, "siblings"), "path"
    if method in ("path", "top_down") and route.use_triton(backend, x, hierarchy, "decode"):
        return route.kernels().fused_decode(x.detach(), hierarchy, method)
    return decode_op(x, hierarchy, method)
