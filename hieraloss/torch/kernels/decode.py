"""Fused hierarchy-consistent decoding: one pass over the logits writes leaf and per-depth labels.

A program owns BLOCK_P pixels of one image and all N nodes (padded to NP) as an ``[NP, BLOCK_P]``
tile.

* ``path``: ``score_v = sum_{u in A(v)} x_u`` from L gathered loads along the ancestor-table
  columns (root first); the leaf with the largest score wins, the lowest leaf channel on ties.
* ``top_down``: start at the implicit root; L times pick the best child of the current node
  (``parent[v] == current``), lowest channel on ties; a leaf stops the descent.

Ties are resolved as "the lowest channel among the candidates equal to the maximum", which also
keeps the choice a candidate when logits are -inf. Outputs are node ids: ``leaf [B, P]`` and
``depth [B, L, P]`` with ``depth[:, d] = node_ids[ancestor_table[leaf, d]]`` (a shallow leaf repeats).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...hierarchy import Hierarchy
from ._common import kernel_tables, launch_sizes

__all__ = ["decode_op", "METHODS"]

METHODS = ("path", "top_down")


@triton.jit
def _best_candidate(score, candidate, rows, NP: tl.constexpr):
    """Lowest row among the candidates that attain the maximum score, per column."""
    masked = tl.where(candidate, score, float("-inf"))
    best = tl.max(masked, axis=0)
    at_best = candidate & (masked == best[None, :])
    pick = tl.min(tl.where(at_best, rows[:, None], NP), axis=0)
    # A NaN maximum matches nothing: fall back to the first candidate.
    first = tl.min(tl.where(candidate, rows[:, None], NP), axis=0)
    return tl.where(pick < NP, pick, first)


@triton.jit
def _decode_kernel(
    x_ptr, sxb, sxn, sxp,
    anc_ptr, depth_ptr, parent_ptr, leaf_ptr, ids_ptr,
    leaf_out_ptr, depth_out_ptr,
    P, N,
    L: tl.constexpr, NP: tl.constexpr, BLOCK_P: tl.constexpr, TOP_DOWN: tl.constexpr, F64: tl.constexpr,
):
    CT = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_p64 = offs_p.to(tl.int64)
    rows = tl.arange(0, NP)
    rmask = rows < N
    tile_mask = rmask[:, None] & pmask[None, :]
    x_b = x_ptr + b * sxb
    col_off = offs_p64[None, :] * sxp

    if TOP_DOWN:
        x = tl.load(x_b + rows.to(tl.int64)[:, None] * sxn + col_off, mask=tile_mask, other=0.0).to(CT)
        parent = tl.load(parent_ptr + rows, mask=rmask, other=-2)
        current = tl.full([BLOCK_P], -1, tl.int32)
        for _ in tl.static_range(L):
            at_leaf = tl.load(leaf_ptr + current, mask=current >= 0, other=0) != 0
            candidate = (parent[:, None] == current[None, :]) & rmask[:, None]
            nxt = _best_candidate(x, candidate, rows, NP)
            current = tl.where(at_leaf, current, nxt)
        leaf = current
    else:
        depth_v = tl.load(depth_ptr + rows, mask=rmask, other=0)
        is_leaf = tl.load(leaf_ptr + rows, mask=rmask, other=0) != 0
        score = tl.zeros([NP, BLOCK_P], CT)
        for d in tl.static_range(L):
            anc_col = tl.load(anc_ptr + rows * L + d, mask=rmask, other=0)
            on = (d < depth_v) & rmask
            xa = tl.load(x_b + anc_col.to(tl.int64)[:, None] * sxn + col_off,
                         mask=on[:, None] & pmask[None, :], other=0.0)
            score += xa.to(CT)
        leaf = _best_candidate(score, (is_leaf & rmask)[:, None] & pmask[None, :], rows, NP)

    leaf = tl.where(pmask, leaf, 0)
    tl.store(leaf_out_ptr + b * P + offs_p64, tl.load(ids_ptr + leaf), mask=pmask)
    for d in tl.static_range(L):
        node = tl.load(anc_ptr + leaf * L + d)
        tl.store(depth_out_ptr + (b * L + d) * P + offs_p64, tl.load(ids_ptr + node), mask=pmask)


@torch.library.custom_op("hieraloss::decode", mutates_args=())
def decode_op(logits: torch.Tensor, key: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (leaf node ids ``[B, *spatial]``, per-depth node ids ``[B, L, *spatial]``) for the
    hierarchy whose fingerprint is ``key``."""
    if method not in METHODS:
        raise ValueError(f"fused decode supports methods {METHODS}, got {method!r}")
    tabs = kernel_tables(Hierarchy.by_fingerprint(key), logits.device)
    B, N = logits.shape[:2]
    spatial = logits.shape[2:]
    x = logits.reshape(B, N, math.prod(spatial))
    P = x.shape[2]
    L = tabs["ancestor_table"].shape[1]
    leaf = torch.empty((B, P), dtype=torch.int64, device=logits.device)
    depth_labels = torch.empty((B, L, P), dtype=torch.int64, device=logits.device)
    np_, block_p, warps = launch_sizes(N, P)
    if B * P > 0:
        _decode_kernel[(triton.cdiv(P, block_p), B)](
            x, x.stride(0), x.stride(1), x.stride(2),
            tabs["ancestor_table"], tabs["depth"], tabs["parent"], tabs["is_leaf"], tabs["node_ids"],
            leaf, depth_labels, P, N,
            L=L, NP=np_, BLOCK_P=block_p, TOP_DOWN=method == "top_down",
            F64=logits.dtype == torch.float64, num_warps=warps,
        )
    return leaf.view(B, *spatial), depth_labels.view(B, L, *spatial)


@decode_op.register_fake
def _(logits, key, method):
    B, L = logits.shape[0], Hierarchy.by_fingerprint(key).max_depth
    spatial = logits.shape[2:]
    return (logits.new_empty((B, *spatial), dtype=torch.int64),
            logits.new_empty((B, L, *spatial), dtype=torch.int64))
