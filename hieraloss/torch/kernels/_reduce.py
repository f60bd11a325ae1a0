"""The objective's small reductions, run by the last programs of the kernels before them (Triton
device functions): no launch and no torch op of their own.

Each program of the label-count kernel and of the objective kernel stores its row of partial
sums, then counts itself done on an int32 counter (zeroed per call). Rows come in groups of
``group`` consecutive programs: the last program of a group sums the group's rows into one float64
row, and the last group to finish sums those rows and finishes (``.cg`` loads: from L2, where the
other programs' stores are). Two levels keep the serial tail short: one program reducing the
32768 rows of a Cityscapes step added 0.13 ms on the H100 to a 0.62 ms step.

* :func:`depth_scales`: per-program entry counts per depth -> each per-depth sum's denominator and
  gradient scale, which the objective kernel then reads;
* :func:`finalize_sums`: the objective's per-program sums -> ``total`` and ``parts``.

Both sum in a fixed order, so the result does not depend on which program finishes last.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

REDUCTION_IDS = {"hssn": 0, "mean": 1, "sum": 2}
ENTRIES_PER_STEP = 4096  # [rows, width] entries a reduction reads per loop step


def rows_per_step(width: int) -> int:
    return max(1, ENTRIES_PER_STEP // width)


def padded_width(width: int) -> int:
    return triton.next_power_of_2(width)


def group_rows(rows: int) -> int:
    """Rows per group of the two-level reduction: about the square root of ``rows``."""
    return max(16, triton.next_power_of_2(math.isqrt(max(rows, 1))))


def workspace(rows: int, width: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(group, counter, gsum)`` of a reduction over ``rows`` rows of ``width`` columns: rows per group,
    the zeroed int32 counters (the groups', then one per group) and the float64 group sums
    ``[groups, padded_width(width)]``."""
    group = group_rows(rows)
    groups = triton.cdiv(rows, group)
    counter = torch.zeros(1 + groups, dtype=torch.int32, device=device)
    return group, counter, torch.empty((groups, padded_width(width)), dtype=torch.float64, device=device)


@triton.jit
def last_program(counter_ptr, programs):
    """Whether this program is the last of ``programs`` to get here; the stores every program made
    before this call are visible to that one."""
    tl.debug_barrier()  # every thread's stores of this program, before its release below
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1


@triton.jit
def _sum_rows(ptr, first, n, width, cols, col_mask, RB: tl.constexpr):
    """float64 column sums of rows ``first .. first + n`` of a row-major ``[., width]`` array at ``cols``."""
    acc = tl.zeros(cols.shape, dtype=tl.float64)
    for r0 in range(0, n, RB):
        r = first + r0 + tl.arange(0, RB)
        v = tl.load(ptr + r[:, None].to(tl.int64) * width + cols[None, :],
                    mask=(r < first + n)[:, None] & col_mask[None, :], other=0, cache_modifier=".cg")
        acc += tl.sum(v.to(tl.float64), 0)
    return acc


@triton.jit
def _group_of_this_program(group):
    """(group index, first row, rows in it, groups) of this program's row ``b * programs(0) + pid``."""
    rows = tl.num_programs(0) * tl.num_programs(1)
    g = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) // group
    return g, g * group, tl.minimum(group, rows - g * group), tl.cdiv(rows, group)


@triton.jit
def _column_sums(ptr, width, group, counter_ptr, gsum_ptr, cols, col_mask, D2: tl.constexpr, RB: tl.constexpr):
    """Called by every program after storing its row of ``rows [programs, width]``: ``(done, sums)``,
    ``done`` true in the one program that finds every row summed, ``sums`` (float64 ``[D2]``, valid
    there) the column sums at ``cols`` where ``col_mask``. ``gsum [groups, D2]`` float64: the groups'
    sums; ``counter [1 + groups]`` zeroed."""
    g, first, n, groups = _group_of_this_program(group)
    done = tl.zeros([], dtype=tl.int1)
    sums = tl.zeros([D2], dtype=tl.float64)
    if last_program(counter_ptr + 1 + g, n):
        tl.store(gsum_ptr + g * D2 + cols, _sum_rows(ptr, first, n, width, cols, col_mask, RB))
        if last_program(counter_ptr, groups):
            done = tl.full([], 1, dtype=tl.int1)
            sums = _sum_rows(gsum_ptr, 0, groups, D2, cols, col_mask, RB)
    return done, sums


@triton.jit
def depth_scales(count_ptr, group, counter_ptr, gsum_ptr, coef_ptr, denom_ptr, scale_ptr,
                 L2: tl.constexpr, D2: tl.constexpr, RB: tl.constexpr, REDUCTION: tl.constexpr, F64: tl.constexpr):
    """Called by every program of the count kernel after storing its row of ``counts [rows, L2]``
    (its pixels' entries per depth, tree-min then cross-entropy): each per-depth sum's denominator
    (float64 ``[L2]``: tree-min per ``REDUCTION``, cross-entropy its count, at least 1) and gradient
    scale ``coef / denominator``."""
    L: tl.constexpr = L2 // 2
    k = tl.arange(0, D2)
    kin = k < L2
    done, depth_counts = _column_sums(count_ptr, L2, group, counter_ptr, gsum_ptr, k, kin, D2, RB)
    if done:
        denom = tl.maximum(depth_counts, 1.0)
        if REDUCTION == 1:  # mean: every tree-min depth over the count of all depths
            denom = tl.where(k < L, tl.maximum(tl.sum(tl.where(k < L, depth_counts, 0.0), 0), 1.0), denom)
        elif REDUCTION == 2:  # sum
            denom = tl.where(k < L, 1.0, denom)
        coef = tl.load(coef_ptr + k, mask=kin, other=0.0)
        tl.store(denom_ptr + k, denom, mask=kin)
        tl.store(scale_ptr + k, (coef / denom).to(tl.float64 if F64 else tl.float32), mask=kin)


@triton.jit
def finalize_sums(part_ptr, group, counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr,
                  L2: tl.constexpr, D2: tl.constexpr, RB: tl.constexpr, TM: tl.constexpr, CE: tl.constexpr,
                  F64: tl.constexpr):
    """Called by every program of the objective kernel after storing its row of ``part [rows, L2]``:
    ``ratio = (column sums of part, float64) / denominator`` over the columns the objective wrote
    (tree-min with ``TM``, cross-entropy with ``CE``), then ``total = ratio . coef`` and
    ``parts = [factor * sum of the tree-min ratios, cross-entropy ratios]``."""
    L: tl.constexpr = L2 // 2
    k = tl.arange(0, D2)
    kin = k < L2
    written = tl.where(k < L, TM, CE) & kin
    done, sums = _column_sums(part_ptr, L2, group, counter_ptr, gsum_ptr, k, written, D2, RB)
    if done:
        ratio = sums / tl.load(denom_ptr + k, mask=kin, other=1.0)
        coef = tl.load(coef_ptr + k, mask=kin, other=0.0)
        OT: tl.constexpr = tl.float64 if F64 else tl.float32
        tl.store(total_ptr, tl.sum(ratio * coef, 0).to(OT))
        tl.store(parts_ptr, (tl.sum(tl.where(k < L, ratio, 0.0), 0) * factor).to(OT))
        tl.store(parts_ptr + 1 + (k - L), ratio.to(OT), mask=(k >= L) & kin)
