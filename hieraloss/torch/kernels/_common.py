"""Shared pieces of the fused kernels: launch sizes, the launch device and int32 device tables."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import triton

from ...core.checks import env_choice
from ...core.plan import code_node_limit_reason
from ...hierarchy import Hierarchy
from .._tables import cached_on

# Launch sizes are automatic; these documented switches (docs/kernels.md) fix them, read per launch.
# The interpreter tests set small powers of two to force several programs per image, several chunks
# of the objective kernel's label count and several blocks per program of the gradient scaling.
BLOCK_P_ENV = "HIERALOSS_TRITON_BLOCK_P"  # pixels per program of the generated kernels
LABEL_CHUNK_ENV = "HIERALOSS_TRITON_LABEL_CHUNK"  # labels per chunk of the label count
SCALE_PROGRAMS_ENV = "HIERALOSS_TRITON_SCALE_PROGRAMS"  # programs of the gradient scaling


def launch_switch(name: str) -> int | None:
    """The positive power of two that the environment variable ``name`` fixes, None when unset."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) < 1 or int(value) & (int(value) - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}; unset it for the automatic size")
    return int(value)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# The generated kernels have no loop worth pipelining (its one-trip loops only carry pointers, see
# _terms.load_rows); one stage also skips the pipeliner's latency analysis, which is slow on ~450 loops.
NUM_STAGES = 1

# Every launch (and _aot) names FMA contraction, as every figure in docs/performance.md was measured,
# instead of leaving it to Triton's default: triton 3.9 warns that it will turn that default off.
FP_FUSION = {"enable_fp_fusion": True}

# Register cap of the objective kernel for trees of more than WIDE_TREE_NODES nodes under triton
# older than 3.9 (ptxas ``maxnreg``): 4 blocks of 128 threads per SM. Left to itself, triton 3.6's
# ptxas takes more registers (3 blocks) and spills; with the cap it does neither and the kernels run
# faster. Triton 3.9 stays within the cap by itself, and there the cap only makes ptxas take all of it
# and spill more; small trees are not capped either (a cap makes ptxas use more registers there).
# The figures: docs/performance.md, "The kernels' constants".
MAX_REGISTERS = 128
WIDE_TREE_NODES = 64
_CAP_REGISTERS = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9)


def register_cap(num_nodes: int) -> dict:
    """The objective kernel's ``maxnreg`` launch option for a ``num_nodes``-node tree, if any (none
    under the interpreter, which has no ptxas)."""
    if not _CAP_REGISTERS or interpreting() or num_nodes <= WIDE_TREE_NODES:
        return {}
    return {"maxnreg": MAX_REGISTERS}


# CUDA's limit on a grid's second dimension, along which the objective, decode and triplet-code
# kernels launch one row of programs per image.
MAX_GRID_ROWS = 65535


# The kernels index an image's pixels with int32 lane offsets (``program_id * BLOCK_P + lane``).
MAX_IMAGE_PIXELS = 2**31


def images_as_pixels(images, pixels) -> bool:
    """Whether the objective and decode kernels take ``images`` images of ``pixels`` pixels as the
    pixels of one image: one pixel each (hierarchical classification, point-sampled logits), so their
    programs fill their lanes and the grid stays one row high."""
    return pixels == 1 and images > 1


def batch_unsupported_reason(shape) -> str | None:
    """Why the fused kernels cannot take logits (or embeddings) of shape ``[B, C, *spatial]``, None when
    they can: more images than grid rows, unless each image has one pixel (the objective and decode
    kernels then take the images as the pixels of one), or more pixels in an image than int32 lane
    offsets reach (counting the images as pixels in that case)."""
    images, pixels = shape[0], math.prod(shape[2:])  # no int(): symbolic sizes stay symbolic under torch.compile
    folded = images_as_pixels(images, pixels)
    if images > MAX_GRID_ROWS and not folded:
        return (f"the fused kernels launch a row of programs per image and CUDA allows {MAX_GRID_ROWS} rows; got "
                f"{images} images of {pixels} pixels (give at most {MAX_GRID_ROWS} images per call, or one pixel "
                f"each)")
    if (images if folded else pixels) > MAX_IMAGE_PIXELS:
        return (f"the fused kernels take at most 2**31 pixels per image (or 2**31 images of one pixel); got "
                f"{images} images of {pixels} pixels")
    return None


# HIERALOSS_TRITON_OBJECTIVE chooses the Triton objective kernel: "generated" (the default, one kernel
# per tree, the tree unrolled: _codegen) or "table" (objective_table: one kernel per tree depth, looping
# over the plan's tables). Read per call.
OBJECTIVE_ENV = "HIERALOSS_TRITON_OBJECTIVE"
OBJECTIVES = ("generated", "table")


def table_driven() -> bool:
    """Whether the Triton objective runs the table-driven kernel (``HIERALOSS_TRITON_OBJECTIVE``)."""
    return env_choice(OBJECTIVE_ENV, OBJECTIVES) == "table"


def unsupported_reason(shape, hierarchy: Hierarchy | None = None, op: str = "objective") -> str | None:
    """Why the fused kernels cannot take logits of shape ``shape`` for ``hierarchy`` (or embeddings,
    without one), None when they can: :func:`batch_unsupported_reason`, and trees too big for the
    packed label codes, which every kernel reads but the table-driven objective (``op="objective"``
    with ``HIERALOSS_TRITON_OBJECTIVE=table``: it reads the labels' channels); ``op``: ``"objective"``
    or ``"decode"``."""
    packed = hierarchy is not None and not (op == "objective" and table_driven())
    return (packed and code_node_limit_reason(hierarchy.num_nodes)) or batch_unsupported_reason(shape)


def on_device(device: torch.device):
    """A context that makes ``device`` the current CUDA device, for the kernel launches inside it: Triton
    launches on the current device and its current stream, whatever device its tensors are on, so a
    launch on tensors of ``cuda:1`` while ``cuda:0`` is current would fail ("cannot be accessed from
    Triton") or run on another device's stream. Nothing off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_sizes(num_nodes: int, num_pixels: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps) of the generated kernels (objective and decode): one pixel per lane, since
    every node is a ``[BLOCK_P]`` vector held in registers."""
    warps = 4
    fixed = launch_switch(BLOCK_P_ENV)
    if fixed is not None:
        return fixed, warps
    block_p = 32 * warps
    return min(block_p, max(16, triton.next_power_of_2(max(num_pixels, 1)))), warps


def _build_kernel_tables(tab) -> dict[str, torch.Tensor]:
    h = tab.hierarchy
    return {"ancestor_table": torch.tensor(np.asarray(h.ancestor_table, dtype=np.int32), device=tab.device),
            "node_ids": torch.tensor(np.asarray(h.node_ids, dtype=np.int64), device=tab.device)}


def kernel_tables(hierarchy: Hierarchy, device: torch.device) -> dict[str, torch.Tensor]:
    """The int32 ancestor table and int64 node ids the decode kernel reads, cached per (hierarchy, device)."""
    return cached_on(hierarchy, device, "_kernel_int32_tables", _build_kernel_tables)
