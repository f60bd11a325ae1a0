"""The objective's small reductions, run inside the objective kernel (Triton device functions): no
launch and no torch op of their own.

* :func:`shared_depth_scales`, at the start of every program: the per-depth denominators and
  gradient scales from all the labels (their entries per depth, looked up in a small table), counted
  in chunks by the first programs to arrive while the others wait for them (see there why that
  wait is safe); one program sums the chunks' rows;
* :func:`finalize_sums`, at the end: the per-program sums -> ``total`` and ``parts``.

For the second, each program stores its row of partial sums, then counts itself done on an int32
counter (zeroed per call). Rows come in groups of ``group`` consecutive programs: the last program
of a group sums the group's rows into one float64 row, and the last group to finish sums those rows
and finishes (``.cg`` loads: from L2, where the other programs' stores are). Two levels keep the
serial tail short (one program reducing every row would add a fifth to a Cityscapes step on the H100:
docs/performance.md).

Both sum in a fixed order, so the result does not depend on which program finishes last.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._terms import load_rows, store_rows

REDUCTION_IDS = {"hssn": 0, "mean": 1, "sum": 2}
ENTRIES_PER_STEP = 4096  # [rows, width] entries a reduction reads per loop step


def rows_per_step(width: int) -> int:
    return max(1, ENTRIES_PER_STEP // width)


COUNT_CHUNK = 4096  # labels per chunk of the label count (one image's consecutive pixels)
SYNC_SLOTS = 4  # int32 slots of shared_depth_scales: next chunk, chunks done, ready, waits given up
# Polls of the ready flag before a waiting program counts every label itself (about a second on a
# GPU, where the count takes microseconds; it bounds a wait the design rules out). The interpreter
# runs programs one after another, so there a wait can only be a test's.
SPIN_LIMIT = 1 << 20


def spin_limit() -> int:
    return 1 if _common.interpreting() else SPIN_LIMIT


def count_chunk() -> int:
    """Labels per chunk of the label count (``HIERALOSS_TRITON_LABEL_CHUNK`` fixes it)."""
    return _common.launch_switch(_common.LABEL_CHUNK_ENV) or COUNT_CHUNK


def count_chunks(images: int, pixels: int) -> int:
    """Chunks of the label count of labels ``[images, pixels]``: ``count_chunk()`` pixels of one image each."""
    return images * triton.cdiv(pixels, count_chunk())


def padded_width(width: int) -> int:
    return triton.next_power_of_2(width)


def group_rows(rows: int) -> int:
    """Rows per group of the two-level reduction: about the square root of ``rows``."""
    return max(16, triton.next_power_of_2(math.isqrt(max(rows, 1))))


def workspace(rows: int, width: int, device: torch.device, *, sync: bool = False
              ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(group, counter, gsum)`` of a reduction over ``rows`` rows of ``width`` columns: rows per group,
    the zeroed int32 counters (the groups', then one per group; with ``sync``, first the
    ``SYNC_SLOTS`` of :func:`shared_depth_scales`: one zeroing for both) and the float64 group sums
    ``[groups, padded_width(width)]``."""
    group = group_rows(rows)
    groups = triton.cdiv(rows, group)
    counter = torch.zeros((SYNC_SLOTS if sync else 0) + 1 + groups, dtype=torch.int32, device=device)
    return group, counter, torch.empty((groups, padded_width(width)), dtype=torch.float64, device=device)


@triton.jit
def last_program(counter_ptr, programs):
    """Whether this program is the last of ``programs`` to get here; the stores every program made
    before this call are visible to that one."""
    tl.debug_barrier()  # every thread's stores of this program, before its release below
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1


@triton.jit
def _sum_rows(ptr, first, n, width, cols, col_mask, one, RB: tl.constexpr):
    """float64 column sums of rows ``first .. first + n`` of a row-major ``[., width]`` array at ``cols``
    (``.cg``: the rows other programs stored). ``one``: the trip count of ``_terms.load_rows``, a
    run-time 1 in the wide trees' objective kernels (see ``_codegen._one_wide``), else a constant 1."""
    acc = tl.zeros(cols.shape, dtype=tl.float64)
    for r0 in range(0, n, RB):
        r = first + r0 + tl.arange(0, RB)
        v = load_rows(ptr + r[:, None].to(tl.int64) * width + cols[None, :],
                      (r < first + n)[:, None] & col_mask[None, :], one, 0, True)
        acc += tl.sum(v.to(tl.float64), 0)
    return acc


@triton.jit
def _group_of_this_program(group):
    """(group index, first row, rows in it, groups) of this program's row ``b * programs(0) + pid``."""
    rows = tl.num_programs(0) * tl.num_programs(1)
    g = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) // group
    return g, g * group, tl.minimum(group, rows - g * group), tl.cdiv(rows, group)


@triton.jit
def _column_sums(ptr, width, group, counter_ptr, gsum_ptr, cols, col_mask, one, D2: tl.constexpr, RB: tl.constexpr):
    """Called by every program after storing its row of ``rows [programs, width]``: ``(done, sums)``,
    ``done`` true in the one program that finds every row summed, ``sums`` (float64 ``[D2]``, valid
    there) the column sums at ``cols`` where ``col_mask``. ``gsum [groups, D2]`` float64: the groups'
    sums; ``counter [1 + groups]`` zeroed."""
    g, first, n, groups = _group_of_this_program(group)
    done = tl.zeros([], dtype=tl.int1)
    sums = tl.zeros([D2], dtype=tl.float64)
    if last_program(counter_ptr + 1 + g, n):
        store_rows(gsum_ptr + g * D2 + cols, _sum_rows(ptr, first, n, width, cols, col_mask, one, RB), cols < D2, one)
        if last_program(counter_ptr, groups):
            done = tl.full([], 1, dtype=tl.int1)
            sums = _sum_rows(gsum_ptr, 0, groups, D2, cols, col_mask, one, RB)
    return done, sums


@triton.jit
def _store_scales(depth_counts, k, kin, reduction, coef_ptr, denom_ptr, scale_ptr, L2: tl.constexpr,
                  F64: tl.constexpr):
    """From the entries per depth (float64, tree-min then cross-entropy): each per-depth sum's
    denominator (float64 ``[L2]``: tree-min per ``reduction``, cross-entropy its count, at least 1) and
    gradient scale ``coef / denominator``."""
    L: tl.constexpr = L2 // 2
    denom = tl.maximum(depth_counts, 1.0)
    if reduction == 1:  # mean: every tree-min depth over the count of all depths
        denom = tl.where(k < L, tl.maximum(tl.sum(tl.where(k < L, depth_counts, 0.0), 0), 1.0), denom)
    elif reduction == 2:  # sum
        denom = tl.where(k < L, 1.0, denom)
    coef = tl.load(coef_ptr + k, mask=kin, other=0.0)
    tl.store(denom_ptr + k, denom, mask=kin)
    tl.store(scale_ptr + k, (coef / denom).to(tl.float64 if F64 else tl.float32), mask=kin)


@triton.jit
def _chunk_entries(lab_ptr, slb, slp, shift, ncode, table_ptr, P, c, k, L2: tl.constexpr, D2: tl.constexpr,
                   CB: tl.constexpr, STEP: tl.constexpr):
    """float64 ``[D2]``: the entries per depth that the labels of chunk ``c`` (pixels ``j * CB ..`` of
    image ``b``, ``(b, j) = divmod(c, cdiv(P, CB))``) add: the rows of ``table [ncode, L2]`` at their
    slots ``clamp(label + shift, 0, ncode - 1)``, summed, ``STEP`` labels at a time."""
    SUB: tl.constexpr = CB if CB < STEP else STEP
    per_image = tl.cdiv(P, CB)
    b = c // per_image
    first = (c - b * per_image) * CB
    row = tl.zeros([D2], dtype=tl.float64)
    for p0 in range(first, first + CB, SUB):
        p = p0 + tl.arange(0, SUB)
        m = p < P
        lab = tl.load(lab_ptr + b.to(tl.int64) * slb + p.to(tl.int64) * slp, mask=m, other=0)
        slot = tl.minimum(tl.maximum(lab.to(tl.int64) + shift, 0), ncode - 1).to(tl.int32)
        for j in tl.static_range(L2):
            row += tl.where(k == j, tl.sum(tl.load(table_ptr + slot * L2 + j, mask=m, other=0.0), 0), 0.0)
    return row


@triton.jit
def _flag(sync_ptr):
    """The ready flag (``sync[2]``), read with acquire semantics by one thread for the whole program."""
    return tl.atomic_add(sync_ptr + 2, 0, sem="acquire", scope="gpu")


@triton.jit
def shared_depth_scales(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
                        spin_limit, coef_ptr, denom_ptr, scale_ptr, WAIT: tl.constexpr, L2: tl.constexpr,
                        D2: tl.constexpr, CB: tl.constexpr, STEP: tl.constexpr, RB: tl.constexpr, F64: tl.constexpr):
    """Called first by every program of the objective kernel: the per-depth denominators and gradient
    scales (:func:`_store_scales`) from all the labels, in the same launch. With ``WAIT`` the program
    returns only once they are stored and visible to it.

    ``sync`` int32 ``[4]`` zeroed: next chunk, chunks done, ready flag, waits given up. Until the
    flag is up, an arriving program claims chunks of the labels from an atomic counter, one after
    another, and counts each (:func:`_chunk_entries`, one row of ``rows [chunks, D2]``) until none is
    left; the program that completes the last chunk
    sums the rows, stores the scales and raises the flag (release). The others then wait for the
    flag (acquire). A program waits only once every chunk is claimed, and only for programs that
    claimed one, which are running and finish it without waiting for anything: so the wait needs no
    grid-wide barrier, no cooperative launch and no guess of how many programs are resident, and
    whichever programs run first share the count. Programs that start after the flag is up skip all
    of it. A wait is still bounded: after ``spin_limit`` polls the program counts every chunk itself
    (whole numbers summed in float64: the same bits) and counts the give-up in ``sync[3]``, which the
    tests expect to stay 0 on a GPU. ``STEP``: labels per loop step of a chunk; ``RB``: rows per loop
    step of their sum."""
    k = tl.arange(0, D2)
    kin = k < L2
    if _flag(sync_ptr) == 0:
        c = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
        while c < chunks:
            tl.store(rows_ptr + c.to(tl.int64) * D2 + k,
                     _chunk_entries(lab_ptr, slb, slp, shift, ncode, table_ptr, P, c, k, L2, D2, CB, STEP))
            if last_program(sync_ptr + 1, chunks):
                # plain loads (a constant 1): wide trees call the count as a function of its own
                _store_scales(_sum_rows(rows_ptr, 0, chunks, D2, k, kin, 1, RB), k, kin, reduction, coef_ptr,
                              denom_ptr, scale_ptr, L2, F64)
                tl.debug_barrier()  # every thread's stores, before the release below
                tl.atomic_xchg(sync_ptr + 2, 1, sem="release", scope="gpu")
            c = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
        if WAIT:
            ready = _flag(sync_ptr)
            polls = 0
            while (ready == 0) & (polls < spin_limit):
                ready = _flag(sync_ptr)
                polls += 1
            if ready == 0:
                tl.atomic_add(sync_ptr + 3, 1, sem="relaxed", scope="gpu")
                counts = tl.zeros([D2], dtype=tl.float64)
                for c2 in range(0, chunks):
                    counts += _chunk_entries(lab_ptr, slb, slp, shift, ncode, table_ptr, P, c2, k, L2, D2, CB, STEP)
                _store_scales(counts, k, kin, reduction, coef_ptr, denom_ptr, scale_ptr, L2, F64)
    if WAIT:
        tl.debug_barrier()  # the flag read, before any thread loads a scale


@triton.jit(noinline=True)
def shared_depth_scales_apart(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
                              spin_limit, coef_ptr, denom_ptr, scale_ptr, WAIT: tl.constexpr, L2: tl.constexpr,
                              D2: tl.constexpr, CB: tl.constexpr, STEP: tl.constexpr, RB: tl.constexpr,
                              F64: tl.constexpr):
    """:func:`shared_depth_scales` as a function of its own (a call, not inlined), so that ptxas
    allocates the caller's registers without it (see ``_codegen.COUNT_LOOPS``)."""
    shared_depth_scales(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
                        spin_limit, coef_ptr, denom_ptr, scale_ptr, WAIT, L2, D2, CB, STEP, RB, F64)


@triton.jit
def finalize_sums(part_ptr, group, counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr, one,
                  L2: tl.constexpr, D2: tl.constexpr, RB: tl.constexpr, TM: tl.constexpr, CE: tl.constexpr,
                  F64: tl.constexpr):
    """Called by every program of the objective kernel after storing its row of ``part [rows, L2]``:
    ``ratio = (column sums of part, float64) / denominator`` over the columns the objective wrote
    (tree-min with ``TM``, cross-entropy with ``CE``), then ``total = ratio . coef`` and
    ``parts = [factor * sum of the tree-min ratios, cross-entropy ratios]``. ``one``: as
    :func:`_sum_rows`'s."""
    L: tl.constexpr = L2 // 2
    k = tl.arange(0, D2)
    kin = k < L2
    written = tl.where(k < L, TM, CE) & kin
    done, sums = _column_sums(part_ptr, L2, group, counter_ptr, gsum_ptr, k, written, one, D2, RB)
    if done:
        ratio = sums / load_rows(denom_ptr + k, kin, one, 1.0, True)
        coef = load_rows(coef_ptr + k, kin, one)
        OT: tl.constexpr = tl.float64 if F64 else tl.float32
        tl.store(total_ptr, tl.sum(ratio * coef, 0).to(OT))
        tl.store(parts_ptr, (tl.sum(tl.where(k < L, ratio, 0.0), 0) * factor).to(OT))
        store_rows(parts_ptr + 1 + (k - L), ratio.to(OT), (k >= L) & kin, one)
