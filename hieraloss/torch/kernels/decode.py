"""Fused hierarchy-consistent decoding: one pass over the logits writes leaf and per-depth labels.

The kernel is generated per hierarchy next to the objective kernel (``_codegen.decode_source``): the
tree is straight-line code over ``[BLOCK_P]`` vectors, one pixel per lane.

* ``path``: ``score_v = score_parent + x_v`` in pre-order; the leaf with the largest score wins,
  the lowest leaf channel on ties.
* ``top_down``: the best child of every parent (the implicit root included; first maximum in
  channel order), then L - 1 steps down from the root's choice; a leaf stops the descent.

Outputs are node ids: ``leaf [B, P]`` and ``depth [B, L, P]`` with
``depth[:, d] = node_ids[ancestor_table[leaf, d]]`` (a shallow leaf repeats).
"""

from __future__ import annotations

import math

import torch
import triton

from ...hierarchy import Hierarchy
from ._common import FP_FUSION, NUM_STAGES, images_as_pixels, kernel_tables, launch_sizes, on_device
from .objective import decode_kernel_for

__all__ = ["decode_op", "METHODS"]

METHODS = ("path", "top_down")


@torch.library.custom_op("hieraloss::decode", mutates_args=())
def decode_op(logits: torch.Tensor, key: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (leaf node ids ``[B, *spatial]``, per-depth node ids ``[B, L, *spatial]``) for the
    hierarchy whose fingerprint is ``key``."""
    if method not in METHODS:
        raise ValueError(f"fused decode supports methods {METHODS}, got {method!r}")
    hierarchy = Hierarchy.by_fingerprint(key)
    tabs = kernel_tables(hierarchy, logits.device)
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    x = logits.reshape(B, N, math.prod(spatial))
    P = x.shape[2]
    L = hierarchy.max_depth
    leaf = torch.empty((B, P), dtype=torch.int64, device=logits.device)
    # One pixel per image: the per-depth labels of the images taken as pixels come out [L, B] and are
    # transposed into place.
    fold = images_as_pixels(B, P)
    depth_labels = torch.empty((1, L, B) if fold else (B, L, P), dtype=torch.int64, device=logits.device)
    kb, kp = (1, B) if fold else (B, P)
    block_p, warps = launch_sizes(N, kp)
    if B * P > 0:
        kx = x.transpose(0, 2) if fold else x
        with on_device(logits.device):
            decode_kernel_for(hierarchy)[(triton.cdiv(kp, block_p), kb)](
                kx, kx.stride(0), kx.stride(1), kx.stride(2), tabs["ancestor_table"], tabs["node_ids"],
                leaf, depth_labels, kp,
                BLOCK_P=block_p, F64=logits.dtype == torch.float64, TOP_DOWN=method == "top_down",
                num_warps=warps, num_stages=NUM_STAGES, **FP_FUSION,
            )
    if fold:
        depth_labels = depth_labels[0].t().contiguous()
    return leaf.view(B, *spatial), depth_labels.view(B, L, *spatial)


@decode_op.register_fake
def _(logits, key, method):
    B, L = logits.shape[0], Hierarchy.by_fingerprint(key).max_depth
    spatial = logits.shape[2:]
    return (logits.new_empty((B, *spatial), dtype=torch.int64),
            logits.new_empty((B, L, *spatial), dtype=torch.int64))
