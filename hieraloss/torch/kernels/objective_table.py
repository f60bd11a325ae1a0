"""The HSSN objective as one table-driven Triton kernel: a variant of the generated kernel
(:mod:`._codegen`) that loops over the nodes with the plan's tables instead of unrolling the tree.

It compiles once per tree depth (the per-depth sums are constexpr-sized), not once per tree, so a
new hierarchy costs no compile and the kernel's size does not grow with the tree. It holds no node
in registers: zmax and the node attaining it live in a scratch buffer (two ``[B, N, P]`` arrays,
the compute dtype's and int32), so a step reads and writes more memory than the generated kernel.
Which one a GPU should run by default is for ``make gpu-ab`` to decide; until then the generated
kernel is the default and ``HIERALOSS_TRITON_OBJECTIVE=table`` selects this one
(``_common.table_driven``). It reads the labels' channels (int32), not the packed codes, so it
takes trees of any size (``CODE_NODE_LIMIT`` or more nodes too).

Same parameters as the generated kernel (``_codegen.OBJECTIVE_PARAMS``, launched by keyword through
the same ``objective._launch``), then the tables (:data:`TABLE_PARAMS`). Per program (``BLOCK_P``
pixels of one image), with ``pc``/``ec`` the pre-order position and subtree end of the label:

1. zmax, post-order (children before parents): ``zmax_v = max(x_v, zmax of the children)`` and the
   node attaining it; children in channel order, a later child only when strictly larger or NaN
   (the last NaN), v itself when it ties or beats them or is NaN (the generated kernel's rule).
2. The negative entries, post-order: every counted node off the path adds its term at zmax, and its
   gradient goes to the node attaining the zmax (v or below it, already turned from a zmax into a
   gradient accumulator by then: the scratch holds gradients from here on).
3. The path, root first: the running minimum (the shallowest tied ancestor keeps it), the positive
   terms, their gradients to the path node holding each minimum.
4. The cross-entropy of every depth: an online log-sum-exp over the depth's classes, the target's
   logit from the ``ce_target`` table, and in a training step the softmax gradient.
5. The gradient (or the loss map, written in place by steps 2 and 3) and the per-program sums; the
   label count and the reduction of the sums are the generated kernel's (:mod:`._reduce`).

Values and gradients equal the generated kernel's to rounding (sums are added in another order); the
tie rule and the NaN rule are the same, so the routing of every gradient is identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.plan import plan_for
from .._tables import cached_on
from ._codegen import count_loop
from ._reduce import finalize_sums, padded_width, rows_per_step, shared_depth_scales
from ._terms import exp, log, lse_update, term_grad, term_loss, term_loss_grad

__all__ = ["TABLE_PARAMS", "table_arguments", "table_constants", "table_objective_kernel"]

# The table kernel's parameters after the generated kernel's, in order: (name, Triton type), for the
# reader and for the test of the def's order (the JIT specialises each launch itself).
TABLE_PARAMS: tuple[tuple[str, str], ...] = (
    ("chan_ptr", "*i32"),        # label slot -> channel, -1 ignored (the label codes' slots)
    ("pre_ptr", "*i32"),         # [N] pre-order position
    ("end_ptr", "*i32"),         # [N] pre-order position + subtree size
    ("depth_ptr", "*i32"),       # [N] depth, 1 for the top level
    ("post_ptr", "*i32"),        # [N] channels in post-order (children first, channel order)
    ("child_off_ptr", "*i32"),   # [N + 1] CSR offsets of the children
    ("child_ptr", "*i32"),       # [E] children in channel order
    ("anc_ptr", "*i32"),         # [N, L] ancestor at each depth (the channel itself below its depth)
    ("class_off_ptr", "*i32"),   # [L + 1] CSR offsets of each depth's cross-entropy classes
    ("class_ptr", "*i32"),       # the classes
    ("target_ptr", "*i32"),      # [N, L] cross-entropy target, -1 where a label does not count
    ("z_ptr", "*{acc}"),         # scratch [B, N, P]: zmax, then the gradient accumulators
    ("a_ptr", "*i32"),           # scratch [B, N, P]: the node attaining zmax
    ("N", "i32"),                # nodes
)


def _build_tables(tab) -> dict[str, torch.Tensor]:
    plan = plan_for(tab.hierarchy)
    names = {"pre_ptr": "pre", "end_ptr": "end", "depth_ptr": "depth", "post_ptr": "postorder",
             "child_off_ptr": "child_offsets", "child_ptr": "child_channels", "class_off_ptr": "class_offsets",
             "class_ptr": "class_channels", "target_ptr": "ce_target"}
    out = {arg: torch.tensor(plan.int32(name), device=tab.device) for arg, name in names.items()}
    out["anc_ptr"] = torch.tensor(tab.hierarchy.ancestor_table.astype("int32"), device=tab.device)
    return out


def table_arguments(hierarchy, channels: torch.Tensor, B: int, P: int, acc: torch.dtype, tm: bool,
                    device: torch.device) -> dict:
    """The table parameters of one launch over ``B`` images of ``P`` pixels: the cached tables, fresh
    scratch (the int32 one only with the tree-min), the label slots' channels."""
    N = hierarchy.num_nodes
    tables = cached_on(hierarchy, device, "objective_table", _build_tables)
    z = torch.empty((B, N, P), dtype=acc, device=device)
    a = torch.empty((B, N, P) if tm else (1,), dtype=torch.int32, device=device)
    return dict(chan_ptr=channels, **tables, z_ptr=z, a_ptr=a, N=N)


def table_constants(depth: int) -> dict:
    """The constexprs that depend on the tree: its depth only (the label count's loop steps are the
    small trees' of the generated kernel, ``_codegen.COUNT_LOOPS``)."""
    d2 = padded_width(2 * depth)
    _, step, count_rb = count_loop(0, depth)
    return dict(L=depth, D2=d2, RB=rows_per_step(d2), COUNT_STEP=step, COUNT_RB=count_rb)


@triton.jit(do_not_specialize=["sxb", "sxn", "sxp", "slb", "slp", "shift", "ncode", "sgb", "sgn", "sgp", "chunks",
                               "reduction", "spin_limit", "sob", "son", "group", "P", "N"])
def table_objective_kernel(
    x_ptr, sxb, sxn, sxp, lab_ptr, slb, slp, code_ptr, shift, ncode, table_ptr, w_ptr, go_ptr, sgb, sgn, sgp,
    chunks, sync_ptr, rows_ptr, reduction, spin_limit, scale_ptr, out_ptr, sob, son, sop, part_ptr, group,
    counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr, P, gamma,
    chan_ptr, pre_ptr, end_ptr, depth_ptr, post_ptr, child_off_ptr, child_ptr, anc_ptr, class_off_ptr, class_ptr,
    target_ptr, z_ptr, a_ptr, N,
    BLOCK_P: tl.constexpr, CB: tl.constexpr, F64: tl.constexpr, FOCAL: tl.constexpr, HAS_W: tl.constexpr,
    TM: tl.constexpr, CE: tl.constexpr, MODE: tl.constexpr, L: tl.constexpr, D2: tl.constexpr, RB: tl.constexpr,
    COUNT_STEP: tl.constexpr, COUNT_RB: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    L2: tl.constexpr = 2 * L
    GRAD: tl.constexpr = MODE == 1 or MODE == 3
    VALUE: tl.constexpr = MODE == 0 or MODE == 1
    if VALUE:
        # The denominators and the gradient scales: the generated kernel's label count.
        shared_depth_scales(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
                            spin_limit, coef_ptr, denom_ptr, scale_ptr, MODE == 1, L2, D2, CB, COUNT_STEP, COUNT_RB,
                            F64)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < P
    o64 = offs.to(tl.int64)
    sn = sxn.to(tl.int64)
    xb = x_ptr + b * sxb + o64 * sxp
    np64 = P.to(tl.int64)
    zb = z_ptr + b * N * np64 + o64  # scratch row of node v: zb + v * P
    ab = a_ptr + b * N * np64 + o64
    lab = tl.load(lab_ptr + b * slb + o64 * slp, mask=pmask, other=0)
    slot = tl.minimum(tl.maximum(lab.to(tl.int64) + shift, 0), ncode - 1)
    ch = tl.load(chan_ptr + slot, mask=pmask, other=-1)
    valid = ch >= 0
    c0 = tl.where(valid, ch, 0)
    pc = tl.where(valid, tl.load(pre_ptr + c0), -1)
    ec = tl.where(valid, tl.load(end_ptr + c0), -1)
    dep = tl.load(depth_ptr + c0)
    if MODE == 3:
        gob = go_ptr + b * sgb + o64 * sgp
        gn = sgn.to(tl.int64)
    if MODE != 0:
        ob = out_ptr + b * sob + o64 * sop
        on = son.to(tl.int64)
    kk = tl.arange(0, D2)
    sums = tl.zeros([D2], CT)
    zero = tl.zeros([BLOCK_P], CT)
    if TM:
        # 1. zmax and the node attaining it; post-order: every child before its parent.
        for i in range(0, N):
            v = tl.load(post_ptr + i)
            xv = tl.load(xb + v * sn, mask=pmask, other=0.0).to(CT)
            zm = xv
            am = tl.zeros([BLOCK_P], tl.int32) + v
            k0 = tl.load(child_off_ptr + v)
            k1 = tl.load(child_off_ptr + v + 1)
            if k1 > k0:
                c = tl.load(child_ptr + k0)
                zr = tl.load(zb + c * np64, mask=pmask, other=0.0)
                ar = tl.load(ab + c * np64, mask=pmask, other=0)
                for k in range(k0 + 1, k1):
                    c = tl.load(child_ptr + k)
                    zc = tl.load(zb + c * np64, mask=pmask, other=0.0)
                    ac = tl.load(ab + c * np64, mask=pmask, other=0)
                    bt = (zc > zr) | (zc != zc)
                    zr = tl.where(bt, zc, zr)
                    ar = tl.where(bt, ac, ar)
                pw = (xv >= zr) | ((xv != xv) & (zr == zr))
                zm = tl.where(pw, xv, zr)
                am = tl.where(pw, v, ar)
            tl.store(zb + v * np64, zm, mask=pmask)
            tl.store(ab + v * np64, am, mask=pmask)
        # 2. The negative entries; the gradient of each goes to the node attaining its zmax.
        for i in range(0, N):
            v = tl.load(post_ptr + i)
            d = tl.load(depth_ptr + v) - 1
            pre_v = tl.load(pre_ptr + v)
            end_v = tl.load(end_ptr + v)
            y = (pc >= pre_v) & (pc < end_v)
            ng = (pc >= 0) & ~((pc < pre_v) & (ec > pre_v)) & ~y  # counted, not below a partial label, off the path
            if HAS_W:
                wv = tl.load(w_ptr + v).to(CT)
            else:
                wv = 1.0
            zv = tl.load(zb + v * np64, mask=pmask, other=0.0)
            g = zero
            if MODE == 0:
                sums += tl.where(kk == d, tl.sum(tl.where(ng, term_loss(zv, gamma, FOCAL) * wv, 0.0), 0), 0.0)
            if MODE == 1:
                lv, gv = term_loss_grad(zv, gamma, FOCAL)
                sums += tl.where(kk == d, tl.sum(tl.where(ng, lv * wv, 0.0), 0), 0.0)
                g = tl.where(ng, gv * (wv * tl.load(scale_ptr + d, cache_modifier=".cg").to(CT)), 0.0)
            if MODE == 2:
                entry = tl.where(ng, term_loss(zv, gamma, FOCAL) * wv, 0.0)
                tl.store(ob + v * on, entry.to(out_ptr.dtype.element_ty), mask=pmask)
            if MODE == 3:
                gov = tl.load(gob + v * gn, mask=pmask, other=0.0).to(CT)
                g = tl.where(ng, term_grad(zv, gamma, FOCAL) * wv * gov, 0.0)
            if GRAD:
                av = tl.load(ab + v * np64, mask=pmask, other=0)
                own = av == v
                tl.store(zb + v * np64, tl.where(own, g, 0.0), mask=pmask)
                below = pmask & ~own  # v's zmax is a descendant's logit: that node's accumulator
                target = zb + av.to(tl.int64) * np64
                tl.store(target, tl.load(target, mask=below, other=0.0) + g, mask=below)
        # 3. The path, root first.
        zmin = zero
        held = tl.zeros([BLOCK_P], tl.int32)  # the depth holding the minimum
        for d in tl.static_range(L):
            node = tl.load(anc_ptr + c0 * L + d)
            on_d = valid & (d < dep) & pmask
            xp = tl.load(xb + node * sn, mask=on_d, other=0.0).to(CT)
            if d == 0:
                zmin = xp
            else:
                lw = (xp < zmin) | (xp != xp)
                zmin = tl.where(lw, xp, zmin)
                held = tl.where(lw, d, held)
            if HAS_W:
                wp = tl.load(w_ptr + node, mask=on_d, other=0.0).to(CT)
            else:
                wp = 1.0
            if MODE == 0:
                sums += tl.where(kk == d, tl.sum(tl.where(on_d, term_loss(-zmin, gamma, FOCAL) * wp, 0.0), 0), 0.0)
            if MODE == 2:
                entry = tl.where(on_d, term_loss(-zmin, gamma, FOCAL) * wp, 0.0)
                tl.store(ob + node * on, entry.to(out_ptr.dtype.element_ty), mask=on_d)
            if GRAD:
                if MODE == 1:
                    lp, dl = term_loss_grad(-zmin, gamma, FOCAL)
                    sums += tl.where(kk == d, tl.sum(tl.where(on_d, lp * wp, 0.0), 0), 0.0)
                    up = wp * tl.load(scale_ptr + d, cache_modifier=".cg").to(CT)
                else:
                    dl = term_grad(-zmin, gamma, FOCAL)
                    up = wp * tl.load(gob + node * gn, mask=on_d, other=0.0).to(CT)
                holder = zb + tl.load(anc_ptr + c0 * L + held).to(tl.int64) * np64
                tl.store(holder, tl.load(holder, mask=on_d, other=0.0) - dl * up, mask=on_d)
    elif MODE == 1:
        for v in range(0, N):  # the cross-entropy alone: accumulators from zero
            tl.store(zb + v * np64, zero, mask=pmask)
    if CE:
        # 4. The cross-entropy of every depth.
        for d in tl.static_range(L):
            k0 = tl.load(class_off_ptr + d)
            k1 = tl.load(class_off_ptr + d + 1)
            t = tl.load(target_ptr + c0 * L + d)
            kn = valid & (t >= 0)
            m = tl.load(xb + tl.load(class_ptr + k0) * sn, mask=pmask, other=0.0).to(CT)
            s = zero + 1.0
            for k in range(k0 + 1, k1):
                xc = tl.load(xb + tl.load(class_ptr + k) * sn, mask=pmask, other=0.0).to(CT)
                m, s = lse_update(m, s, xc)
            lse = m + log(s)
            xt = tl.load(xb + tl.maximum(t, 0) * sn, mask=kn & pmask, other=0.0).to(CT)
            if VALUE:
                sums += tl.where(kk == L + d, tl.sum(tl.where(kn, lse - xt, 0.0), 0), 0.0)
            if MODE == 1:
                csc = tl.load(scale_ptr + L + d, cache_modifier=".cg").to(CT)
                for k in range(k0, k1):
                    c = tl.load(class_ptr + k)
                    xc = tl.load(xb + c * sn, mask=pmask, other=0.0).to(CT)
                    gc = tl.where(kn, csc * (exp(xc - lse) - tl.where(t == c, 1.0, 0.0)), 0.0)
                    tl.store(zb + c * np64, tl.load(zb + c * np64, mask=pmask, other=0.0) + gc, mask=pmask)
    if GRAD:
        # 5. The gradient, from the accumulators.
        for v in range(0, N):
            g = tl.load(zb + v * np64, mask=pmask, other=0.0)
            tl.store(ob + v * on, g.to(out_ptr.dtype.element_ty), mask=pmask)
    if VALUE:
        tl.store(part_ptr + (b * tl.num_programs(0) + pid) * L2 + kk, sums, mask=kk < L2)
        finalize_sums(part_ptr, group, counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr,
                      (ncode > 0).to(tl.int32), L2, D2, RB, TM, CE, F64)
