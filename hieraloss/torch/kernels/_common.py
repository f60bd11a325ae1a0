"""Shared pieces of the fused kernels: launch sizes, int32 device tables, stable math helpers."""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from ...hierarchy import Hierarchy
from .._tables import tables_for

# Tests set this to a small power of two to force several programs per image; None = automatic.
BLOCK_P_OVERRIDE: int | None = None

# Elements per [rows, BLOCK_P] tile, and values per thread (halved for the gradient pass, which keeps
# more tiles live). Checked for sm_90 with ptxas through Triton's ahead-of-time compile (no GPU
# needed): with 2048 the float16/bfloat16/float32 Cityscapes and Mapillary specializations of both
# kernels use 80-190 registers and do not spill; 2560 started to spill, 4096 spilled badly.
_TILE_ELEMENTS = 2048
_PER_THREAD = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_sizes(num_nodes: int, num_pixels: int, grad: bool = False) -> tuple[int, int, int]:
    """(NP, BLOCK_P, num_warps) for a program holding all nodes (padded to NP) of BLOCK_P pixels."""
    np_ = triton.next_power_of_2(max(num_nodes, 2))
    if BLOCK_P_OVERRIDE is not None:
        block_p = int(BLOCK_P_OVERRIDE)
    else:
        block_p = max(8, min(256, _TILE_ELEMENTS // np_))
        block_p = min(block_p, triton.next_power_of_2(max(num_pixels, 8)))
    per_thread = _PER_THREAD // 2 if grad else _PER_THREAD
    return np_, block_p, _warps(np_ * block_p // (32 * per_thread))


def block_sizes(rows: int, num_pixels: int, grad: bool = False) -> tuple[int, int]:
    """(BLOCK_P, num_warps) for a program holding ``rows`` padded node rows."""
    if BLOCK_P_OVERRIDE is not None:
        block_p = int(BLOCK_P_OVERRIDE)
    else:
        block_p = 1 << max(3, min(8, (_TILE_ELEMENTS // max(rows, 1)).bit_length() - 1))
        block_p = min(block_p, triton.next_power_of_2(max(num_pixels, 8)))
    per_thread = _PER_THREAD // 2 if grad else _PER_THREAD
    return block_p, _warps(rows * block_p // (32 * per_thread))


def _warps(wanted: int) -> int:
    """A power of two in [4, 16] (Triton requires a power of two)."""
    return 1 << max(2, min(4, max(wanted, 1).bit_length() - 1))


def _padded(values: np.ndarray, size: int, fill: int = -1) -> np.ndarray:
    out = np.full((size,) + values.shape[1:], fill, dtype=np.int32)
    out[: len(values)] = values
    return out


def kernel_tables(hierarchy: Hierarchy, device: torch.device) -> dict[str, torch.Tensor]:
    """Contiguous int32 tables the kernels read, cached per (hierarchy, device).

    Besides the Hierarchy's own tables, the tree-min kernel splits the nodes into two row blocks,
    internal nodes and leaves (each padded to a power of two with -1): only internal nodes need
    the descendant scan. ``internal_slots[r, d]`` / ``leaf_slots[r, d]`` give the internal-block
    row of the depth-(d+1) ancestor of the block's row r (a strict ancestor, or the internal node
    itself), -1 where there is none; they route the negatives' gradients.
    """
    tabs = tables_for(hierarchy, device)

    def build(_):
        h = hierarchy
        internal = np.flatnonzero(~h.is_leaf)
        leaves = np.flatnonzero(h.is_leaf)
        ni = max(2, triton.next_power_of_2(max(len(internal), 1)))
        nl = max(2, triton.next_power_of_2(len(leaves)))
        slot_of = np.full(h.num_nodes, -1)
        slot_of[internal] = np.arange(len(internal))
        L = h.max_depth
        d = np.arange(L)[None, :]

        def slots(rows: np.ndarray, include_self: bool) -> np.ndarray:
            anc = h.ancestor_table[rows]                    # [rows, L]
            limit = h.depth[rows][:, None] - (0 if include_self else 1)
            return np.where(d < limit, slot_of[anc], -1)

        def tensor(a, dtype=np.int32):
            return torch.tensor(np.asarray(a, dtype=dtype), device=device)

        return {
            "ancestor_table": tensor(h.ancestor_table),
            "descendant_table": tensor(h.descendant_table),
            "depth": tensor(h.depth),
            "parent": tensor(h.parent),
            "is_leaf": tensor(h.is_leaf),
            "node_ids": tensor(h.node_ids, np.int64),
            "internal_rows": tensor(_padded(internal, ni)),
            "leaf_rows": tensor(_padded(leaves, nl)),
            "internal_desc": tensor(_padded(h.descendant_table[internal], ni)),
            "internal_slots": tensor(_padded(slots(internal, True), ni)),
            "leaf_slots": tensor(_padded(slots(leaves, False), nl)),
        }

    return tabs.get("_kernel_int32_tables", build)


@triton.jit
def softplus(z):
    """log(1 + exp(z)) without overflow: max(z, 0) + log(1 + exp(-|z|))."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def sigmoid(z):
    """1 / (1 + exp(-z)) from exp(-|z|), so neither branch overflows."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
