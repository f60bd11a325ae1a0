"""The objective's small reductions, run by the last program of the kernel before them (Triton
device functions): no launch and no torch op of their own.

Each program of the label-histogram kernel and of the objective kernel stores its row of partial
sums, then counts itself done on an int32 counter (zeroed per call); the program that finds itself
last reads every row (``.cg``: from L2, where the others' stores are) and reduces them:

* :func:`depth_scales`: slot histograms -> per-depth entry counts -> each per-depth sum's
  denominator and gradient scale, which the objective kernel then reads;
* :func:`finalize_sums`: the objective's per-program sums -> ``total`` and ``parts``.

Both sum in a fixed order, so the result does not depend on which program finishes last.
"""

from __future__ import annotations

import triton
import triton.language as tl

REDUCTION_IDS = {"hssn": 0, "mean": 1, "sum": 2}
ENTRIES_PER_STEP = 4096  # [rows, width] entries a reduction reads per loop step


def rows_per_step(width: int) -> int:
    return max(1, ENTRIES_PER_STEP // width)


@triton.jit
def last_program(counter_ptr, programs):
    """Whether this program is the last of ``programs`` to get here; the stores every program made
    before this call are visible to that one."""
    tl.debug_barrier()  # every thread's stores of this program, before its release below
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1


@triton.jit
def depth_scales(hist_ptr, rows, table_ptr, S, coef_ptr, denom_ptr, scale_ptr,
                 L2: tl.constexpr, D2: tl.constexpr, BINS: tl.constexpr, BB: tl.constexpr, RB: tl.constexpr,
                 REDUCTION: tl.constexpr, F64: tl.constexpr):
    """Per-depth entry counts ``(sum of hist [rows, BINS] over rows) @ table [S, L2]`` (tree-min then
    cross-entropy), then each per-depth sum's denominator (float64 ``[L2]``: tree-min per
    ``REDUCTION``, cross-entropy its count, at least 1) and gradient scale ``coef / denominator``."""
    L: tl.constexpr = L2 // 2
    k = tl.arange(0, D2)
    kin = k < L2
    depth_counts = tl.zeros([D2], dtype=tl.float64)
    for b0 in range(0, BINS, BB):
        bins = b0 + tl.arange(0, BB)
        slots = tl.zeros([BB], dtype=tl.int64)
        for r0 in range(0, rows, RB):
            r = r0 + tl.arange(0, RB)
            h = tl.load(hist_ptr + r[:, None].to(tl.int64) * BINS + bins[None, :], mask=(r < rows)[:, None],
                        other=0, cache_modifier=".cg")
            slots += tl.sum(h.to(tl.int64), 0)
        tab = tl.load(table_ptr + bins[:, None] * L2 + k[None, :], mask=(bins < S)[:, None] & kin[None, :], other=0.0)
        depth_counts += tl.sum(slots.to(tl.float64)[:, None] * tab, 0)
    denom = tl.maximum(depth_counts, 1.0)
    if REDUCTION == 1:  # mean: every tree-min depth over the count of all depths
        denom = tl.where(k < L, tl.maximum(tl.sum(tl.where(k < L, depth_counts, 0.0), 0), 1.0), denom)
    elif REDUCTION == 2:  # sum
        denom = tl.where(k < L, 1.0, denom)
    coef = tl.load(coef_ptr + k, mask=kin, other=0.0)
    tl.store(denom_ptr + k, denom, mask=kin)
    tl.store(scale_ptr + k, (coef / denom).to(tl.float64 if F64 else tl.float32), mask=kin)


@triton.jit
def finalize_sums(part_ptr, rows, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr,
                  L2: tl.constexpr, D2: tl.constexpr, RB: tl.constexpr, TM: tl.constexpr, CE: tl.constexpr,
                  F64: tl.constexpr):
    """``ratio = (sum of part [rows, L2] over rows, float64) / denominator`` over the columns the
    objective wrote (tree-min with ``TM``, cross-entropy with ``CE``), then ``total = ratio . coef``
    and ``parts = [factor * sum of the tree-min ratios, cross-entropy ratios]``."""
    L: tl.constexpr = L2 // 2
    k = tl.arange(0, D2)
    kin = k < L2
    written = tl.where(k < L, TM, CE) & kin
    sums = tl.zeros([D2], dtype=tl.float64)
    for r0 in range(0, rows, RB):
        r = r0 + tl.arange(0, RB)
        v = tl.load(part_ptr + r[:, None].to(tl.int64) * L2 + k[None, :], mask=(r < rows)[:, None] & written[None, :],
                    other=0.0, cache_modifier=".cg")
        sums += tl.sum(v.to(tl.float64), 0)
    ratio = sums / tl.load(denom_ptr + k, mask=kin, other=1.0)
    coef = tl.load(coef_ptr + k, mask=kin, other=0.0)
    OT: tl.constexpr = tl.float64 if F64 else tl.float32
    tl.store(total_ptr, tl.sum(ratio * coef, 0).to(OT))
    tl.store(parts_ptr, (tl.sum(tl.where(k < L, ratio, 0.0), 0) * factor).to(OT))
    tl.store(parts_ptr + 1 + (k - L), ratio.to(OT), mask=(k >= L) & kin)
