"""Shared pieces of the fused kernels: launch sizes and int32 device tables."""

from __future__ import annotations

import os

import numpy as np
import torch
import triton

from ...hierarchy import Hierarchy
from .._tables import tables_for

# Tests set this to a small power of two to force several programs per image; None = automatic.
BLOCK_P_OVERRIDE: int | None = None

# Decode: elements per [rows, BLOCK_P] tile and values per thread (checked for sm_90 with ptxas
# through Triton's ahead-of-time compile: 80-190 registers, no spills for the presets).
_TILE_ELEMENTS = 2048
_PER_THREAD = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_sizes(num_nodes: int, num_pixels: int) -> tuple[int, int, int]:
    """(NP, BLOCK_P, num_warps) for a decode program holding all nodes (padded to NP) of BLOCK_P pixels."""
    np_ = triton.next_power_of_2(max(num_nodes, 2))
    if BLOCK_P_OVERRIDE is not None:
        block_p = int(BLOCK_P_OVERRIDE)
    else:
        block_p = max(8, min(256, _TILE_ELEMENTS // np_))
        block_p = min(block_p, triton.next_power_of_2(max(num_pixels, 8)))
    return np_, block_p, _warps(np_ * block_p // (32 * _PER_THREAD))


# The objective kernel has no loop worth pipelining (its one-trip loops only carry pointers, see
# _terms.load_rows); one stage also skips the pipeliner's latency analysis, which is slow on ~450 loops.
OBJECTIVE_STAGES = 1


def objective_launch(num_nodes: int, num_pixels: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps) of the generated objective kernel: one pixel per lane (two for small
    trees), since every node is a ``[BLOCK_P]`` vector held in registers."""
    warps = 4
    if BLOCK_P_OVERRIDE is not None:
        return int(BLOCK_P_OVERRIDE), warps
    block_p = 32 * warps
    return min(block_p, max(16, triton.next_power_of_2(max(num_pixels, 1)))), warps


def _warps(wanted: int) -> int:
    """A power of two in [4, 16] (Triton requires a power of two)."""
    return 1 << max(2, min(4, max(wanted, 1).bit_length() - 1))


def kernel_tables(hierarchy: Hierarchy, device: torch.device) -> dict[str, torch.Tensor]:
    """Contiguous int32 tables the decode kernel reads (node ids int64), cached per (hierarchy, device)."""
    tabs = tables_for(hierarchy, device)

    def build(_):
        h = hierarchy

        def tensor(a, dtype=np.int32):
            return torch.tensor(np.asarray(a, dtype=dtype), device=device)

        return {
            "ancestor_table": tensor(h.ancestor_table),
            "depth": tensor(h.depth),
            "parent": tensor(h.parent),
            "is_leaf": tensor(h.is_leaf),
            "node_ids": tensor(h.node_ids, np.int64),
        }

    return tabs.get("_kernel_int32_tables", build)
