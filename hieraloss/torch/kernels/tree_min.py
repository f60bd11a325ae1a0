"""Fused (focal) tree-min loss: one Triton kernel for the value, one launch of it for the gradient.

Per pixel with label channel c (``-1`` = ignored) and logits x over the N nodes:

    zmax_v = max_{u in D(v)} x_u                        (every node; negatives use it)
    zmin_v = min_{u in A(v)} x_u                        (only the path A(c) is positive)
    l_v = y_v * f+ (zmin_v) + (1 - y_v) * f- (zmax_v)   times node_weight[v]
    f+(z) = (1 - s)^gamma * softplus(-z) = exp(-gamma softplus(z)) softplus(-z),  s = sigmoid(z)
    f-(z) = s^gamma * softplus(z)        = exp(-gamma softplus(-z)) softplus(z)

Layout: a program owns BLOCK_P pixels of one image. The nodes are split into two row blocks, each
padded to a power of two: internal nodes ``[NI, BLOCK_P]`` and leaves ``[NL, BLOCK_P]``, read
straight from ``[B, N, P]`` logits with any strides (rows are gathered by channel, each row
coalesced along the pixels). The split is what keeps large trees cheap: Mapillary Vistas has 25
internal nodes and 124 leaves, so the descendant scan runs over 32 rows, not 256.

* zmax: a leaf is its own maximum. For internal nodes, ``Dmax`` gathered loads along the
  descendant-table columns (rows are in depth-first pre-order, so a strict ``>`` scan gives the
  documented tie rule: first in row order, v itself first). The gathered rows belong to the tile the
  program just read, so they come from L1/L2, not DRAM.
* zmin is needed only for the positives, which are the L nodes of the labelled path: a running
  strict ``<`` minimum along ``ancestor_table[c]`` (root first, so the shallowest tied ancestor
  wins), on ``[BLOCK_P]`` vectors.
* Masks come from labels only: positives ``v == ancestor_table[c, d]``, unknown strict
  descendants of a partial label ``ancestor_table[v, depth(c) - 1] == c, v != c``.
* Reductions: each program writes its per-depth loss sums and unmasked-entry counts to a small
  ``[programs, L]`` buffer that torch sums afterwards (deterministic, no atomics).
* Gradient: recomputed in the backward launch instead of stored by the forward. Storing costs a
  logits-sized write in the forward and a read in the backward (4 logits-sized passes per step);
  recomputing costs one more read of logits + labels (3 passes) and no saved buffer, at the price of
  running the descendant scan twice. The negatives' gradient reaches ``argmax_v``; it is routed with
  ``tl.gather`` from the internal block over the ancestor columns (u receives from each internal
  v in A(u) whose argmax is u; a leaf also from itself), so there is no scatter and no atomic: the
  result is deterministic.

Float16/bfloat16/float32 logits compute in float32; float64 logits compute in float64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...numpy.losses import REDUCTIONS
from ._common import block_sizes, sigmoid, softplus

__all__ = ["tree_min_loss_op", "tree_min_loss_backward_op", "REDUCTIONS", "TABLE_NAMES"]

_HSSN_FACTOR = 5.0


@triton.jit
def _load_rows(x_b, sxn, ch, rmask, col_off, pmask, CT: tl.constexpr):
    """Rows ``ch`` of one image's ``[N, P]`` logits as a ``[rows, BLOCK_P]`` tile in CT."""
    ptr = x_b + ch.to(tl.int64)[:, None] * sxn + col_off
    return tl.load(ptr, mask=rmask[:, None] & pmask[None, :], other=0.0).to(CT)


@triton.jit
def _neg_loss(zmax, gamma, FOCAL: tl.constexpr):
    """f-(z) = sigmoid(z)^gamma softplus(z), with sigmoid(z)^gamma = exp(-gamma softplus(-z))."""
    loss = softplus(zmax)
    if FOCAL:
        loss = tl.exp(-gamma * softplus(-zmax)) * loss
    return loss


@triton.jit
def _neg_dloss(zmax, gamma, FOCAL: tl.constexpr):
    """d f-(z) / dz = s^gamma (gamma (1 - s) softplus(z) + s), s = sigmoid(z)."""
    s = sigmoid(zmax)
    if FOCAL:
        return tl.exp(-gamma * softplus(-zmax)) * (gamma * (1.0 - s) * softplus(zmax) + s)
    return s


@triton.jit
def _tree_min_kernel(
    x_ptr, sxb, sxn, sxp,            # logits [B, N, P]
    lab_ptr, slb, slp,               # label channels [B, P], -1 = ignored
    anc_ptr, depth_ptr,              # int32 tables [N, L], [N]
    irow_ptr, lrow_ptr,              # channels of the internal / leaf block rows, -1 = padding
    idesc_ptr,                       # [NI, DMAX] descendant-table rows of the internal block
    islot_ptr, lslot_ptr,            # [NI, L], [NL, L]: internal-block row of A(u) at depth d, or -1
    w_ptr,                           # node weights [N] (if HAS_W)
    go_ptr, sgb, sgn, sgp,           # upstream gradient map [B, N, P] (MODE 3)
    scale_ptr,                       # per-depth gradient scale [L] (MODE 2)
    out_ptr,                         # loss map (MODE 1) or gradient (MODE 2, 3): contiguous [B, N, P]
    psum_ptr, pcnt_ptr,              # per-program partials [B * T, L] (MODE 0, 1)
    P, N, gamma,
    L: tl.constexpr, LP: tl.constexpr, DMAX: tl.constexpr, NI: tl.constexpr, NL: tl.constexpr,
    BLOCK_P: tl.constexpr, HAS_W: tl.constexpr, FOCAL: tl.constexpr, F64: tl.constexpr,
    MODE: tl.constexpr,              # 0: reduced value, 1: loss map, 2: grad of reduced, 3: grad of map
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    GRAD: tl.constexpr = MODE >= 2
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_p64 = offs_p.to(tl.int64)
    col_off = offs_p64[None, :] * sxp
    x_b = x_ptr + b * sxb

    lab = tl.load(lab_ptr + b * slb + offs_p64 * slp, mask=pmask, other=-1)
    valid = (lab >= 0) & pmask
    c = tl.where(valid, lab, 0).to(tl.int32)
    depth_c = tl.load(depth_ptr + c)

    # Two row blocks: internal nodes (need the descendant scan) and leaves (zmax = x, arg = self).
    irow = tl.arange(0, NI)
    ich = tl.load(irow_ptr + irow)
    imask = ich >= 0
    ich = tl.where(imask, ich, 0)
    lch = tl.load(lrow_ptr + tl.arange(0, NL))
    lmask = lch >= 0
    lch = tl.where(lmask, lch, 0)
    idepth = tl.load(depth_ptr + ich)
    ldepth = tl.load(depth_ptr + lch)
    xi = _load_rows(x_b, sxn, ich, imask, col_off, pmask, CT)
    xl = _load_rows(x_b, sxn, lch, lmask, col_off, pmask, CT)

    # zmax over D(v) for internal v: first maximum in descendant-table (pre-order) row order.
    zmax = xi
    arg = ich[:, None] + tl.zeros([NI, BLOCK_P], tl.int32)
    for j in range(1, DMAX):
        dj = tl.load(idesc_ptr + irow * DMAX + j)
        real = (dj != ich) & imask  # rows are padded with v itself
        xd = tl.load(x_b + dj.to(tl.int64)[:, None] * sxn + col_off,
                     mask=real[:, None] & pmask[None, :], other=float("-inf")).to(CT)
        better = xd > zmax
        zmax = tl.where(better, xd, zmax)
        arg = tl.where(better, dj[:, None], arg)

    if HAS_W:
        wi = tl.load(w_ptr + ich, mask=imask, other=0.0).to(CT)
        wl = tl.load(w_ptr + lch, mask=lmask, other=0.0).to(CT)
    else:
        wi = tl.full([NI], 1.0, CT)
        wl = tl.full([NL], 1.0, CT)
    if MODE == 3:
        go_b = go_ptr + b * sgb
        go_col = offs_p64[None, :] * sgp
        gi = tl.load(go_b + ich.to(tl.int64)[:, None] * sgn + go_col,
                     mask=imask[:, None] & pmask[None, :], other=0.0).to(CT)
        gl = tl.load(go_b + lch.to(tl.int64)[:, None] * sgn + go_col,
                     mask=lmask[:, None] & pmask[None, :], other=0.0).to(CT)

    # Walk the labelled path root-first: positives, their running minimum, and the masks.
    pos_i = tl.zeros([NI, BLOCK_P], tl.int1)
    pos_l = tl.zeros([NL, BLOCK_P], tl.int1)
    unk_i = tl.zeros([NI, BLOCK_P], tl.int1)
    unk_l = tl.zeros([NL, BLOCK_P], tl.int1)
    loss_i = tl.zeros([NI, BLOCK_P], CT)      # positive losses (MODE 1)
    loss_l = tl.zeros([NL, BLOCK_P], CT)
    grad_i = tl.zeros([NI, BLOCK_P], CT)      # positive gradients routed to their argmin
    grad_l = tl.zeros([NL, BLOCK_P], CT)
    zmin = tl.full([BLOCK_P], float("inf"), CT)
    amin = tl.zeros([BLOCK_P], tl.int32)
    levels = tl.arange(0, LP)
    depth_sums = tl.zeros([LP], CT)           # per-depth loss sums of this program (MODE 0)
    at_label_depth = (depth_c - 1)[None, :]
    for d in tl.static_range(L):
        unk_i = unk_i | ((at_label_depth == d) & (tl.load(anc_ptr + ich * L + d)[:, None] == c[None, :]))
        unk_l = unk_l | ((at_label_depth == d) & (tl.load(anc_ptr + lch * L + d)[:, None] == c[None, :]))
        node = tl.load(anc_ptr + c * L + d)           # path node at depth d + 1
        on = valid & (d < depth_c)
        hit_i = (ich[:, None] == node[None, :]) & on[None, :] & imask[:, None]
        hit_l = (lch[:, None] == node[None, :]) & on[None, :] & lmask[:, None]
        pos_i = pos_i | hit_i
        pos_l = pos_l | hit_l
        xd = tl.load(x_b + node.to(tl.int64) * sxn + offs_p64 * sxp, mask=on, other=0.0).to(CT)
        lower = xd < zmin  # strict: the shallowest tied ancestor keeps the minimum
        zmin = tl.where(lower, xd, zmin)
        amin = tl.where(lower, node, amin)
        if HAS_W:
            w_d = tl.load(w_ptr + node).to(CT)
        else:
            w_d = tl.full([BLOCK_P], 1.0, CT)
        if GRAD:
            s_neg = sigmoid(-zmin)  # 1 - sigmoid(zmin)
            if FOCAL:
                dz = -tl.exp(-gamma * softplus(zmin)) * (gamma * (1.0 - s_neg) * softplus(-zmin) + s_neg)
            else:
                dz = -s_neg
            if MODE == 2:
                up = tl.load(scale_ptr + d).to(CT)
            else:
                up = tl.load(go_b + node.to(tl.int64) * sgn + offs_p64 * sgp, mask=on, other=0.0).to(CT)
            g = tl.where(on, dz * w_d * up, 0.0)[None, :]
            to = amin[None, :]
            grad_i += tl.where((ich[:, None] == to) & on[None, :] & imask[:, None], g, 0.0)
            grad_l += tl.where((lch[:, None] == to) & on[None, :] & lmask[:, None], g, 0.0)
        else:
            lpos = softplus(-zmin)
            if FOCAL:
                lpos = tl.exp(-gamma * softplus(zmin)) * lpos
            lpos = tl.where(on, lpos * w_d, 0.0)
            if MODE == 1:
                loss_i = tl.where(hit_i, lpos[None, :], loss_i)
                loss_l = tl.where(hit_l, lpos[None, :], loss_l)
            else:
                depth_sums += tl.where(levels == d, tl.sum(lpos, axis=0), 0.0)

    entry_pix = valid[None, :] & pmask[None, :]
    entry_i = imask[:, None] & entry_pix & ~(unk_i & (ich[:, None] != c[None, :]))
    entry_l = lmask[:, None] & entry_pix & ~(unk_l & (lch[:, None] != c[None, :]))
    neg_i = entry_i & ~pos_i
    neg_l = entry_l & ~pos_l
    out_b = out_ptr + b * N * P
    i_off = ich.to(tl.int64)[:, None] * P + offs_p64[None, :]
    l_off = lch.to(tl.int64)[:, None] * P + offs_p64[None, :]

    if GRAD:
        if MODE == 2:
            up_i = (wi * tl.load(scale_ptr + idepth - 1).to(CT))[:, None]
            up_l = (wl * tl.load(scale_ptr + ldepth - 1).to(CT))[:, None]
        else:
            up_i = wi[:, None] * gi
            up_l = wl[:, None] * gl
        g_neg_i = tl.where(neg_i, _neg_dloss(zmax, gamma, FOCAL) * up_i, 0.0)
        grad_l += tl.where(neg_l, _neg_dloss(xl, gamma, FOCAL) * up_l, 0.0)  # a leaf is its own max
        # u collects g_neg[v] from every internal v in A(u) whose maximum sits at u.
        for d in tl.static_range(L):
            si = tl.load(islot_ptr + irow * L + d)
            idx_i = tl.maximum(si, 0)[:, None] + tl.zeros([NI, BLOCK_P], tl.int32)
            take_i = (si >= 0)[:, None] & (tl.gather(arg, idx_i, 0) == ich[:, None])
            grad_i += tl.where(take_i, tl.gather(g_neg_i, idx_i, 0), 0.0)
            sl = tl.load(lslot_ptr + tl.arange(0, NL) * L + d)
            idx_l = tl.maximum(sl, 0)[:, None] + tl.zeros([NL, BLOCK_P], tl.int32)
            take_l = (sl >= 0)[:, None] & (tl.gather(arg, idx_l, 0) == lch[:, None])
            grad_l += tl.where(take_l, tl.gather(g_neg_i, idx_l, 0), 0.0)
        ty = out_ptr.dtype.element_ty
        tl.store(out_b + i_off, grad_i.to(ty), mask=imask[:, None] & pmask[None, :])
        tl.store(out_b + l_off, grad_l.to(ty), mask=lmask[:, None] & pmask[None, :])
    else:
        lneg_i = tl.where(neg_i, _neg_loss(zmax, gamma, FOCAL) * wi[:, None], 0.0)
        lneg_l = tl.where(neg_l, _neg_loss(xl, gamma, FOCAL) * wl[:, None], 0.0)
        if MODE == 1:
            ty = out_ptr.dtype.element_ty
            tl.store(out_b + i_off, tl.where(neg_i, lneg_i, loss_i).to(ty),
                     mask=imask[:, None] & pmask[None, :])
            tl.store(out_b + l_off, tl.where(neg_l, lneg_l, loss_l).to(ty),
                     mask=lmask[:, None] & pmask[None, :])
        count_i = tl.sum(entry_i.to(tl.int32), axis=1)
        count_l = tl.sum(entry_l.to(tl.int32), axis=1)
        depth_counts = tl.zeros([LP], tl.int32)
        if MODE == 0:
            sum_i = tl.sum(lneg_i, axis=1)
            sum_l = tl.sum(lneg_l, axis=1)
        for d in tl.static_range(L):
            at_i = imask & (idepth == d + 1)
            at_l = lmask & (ldepth == d + 1)
            n_d = tl.sum(tl.where(at_i, count_i, 0), axis=0) + tl.sum(tl.where(at_l, count_l, 0), axis=0)
            depth_counts += tl.where(levels == d, n_d, 0)
            if MODE == 0:
                s_d = tl.sum(tl.where(at_i, sum_i, 0.0), axis=0) + tl.sum(tl.where(at_l, sum_l, 0.0), axis=0)
                depth_sums += tl.where(levels == d, s_d, 0.0)
        base = (b * tl.num_programs(0) + pid) * L
        tl.store(pcnt_ptr + base + levels, depth_counts, mask=levels < L)
        if MODE == 0:
            tl.store(psum_ptr + base + levels, depth_sums, mask=levels < L)


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _as_bnp(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, *spatial]`` as ``[B, N, P]`` (a view when the spatial strides allow it)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _launch(mode: int, logits: torch.Tensor, label_channels: torch.Tensor, tabs: dict,
            node_weight: torch.Tensor | None, gamma: float,
            grad_map: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    x = _as_bnp(logits)
    B, N, P = x.shape
    L = tabs["ancestor_table"].shape[1]
    ni, nl = tabs["internal_rows"].numel(), tabs["leaf_rows"].numel()
    lab = label_channels.reshape(B, P)
    f64 = logits.dtype == torch.float64
    acc = _acc_dtype(logits)
    block_p, warps = block_sizes(ni + nl, P, grad=mode >= 2)
    tiles = triton.cdiv(P, block_p)
    dev = logits.device
    psum = torch.zeros((B * tiles, L), dtype=acc, device=dev)
    pcnt = torch.zeros((B * tiles, L), dtype=torch.int32, device=dev)
    out_dtype = logits.dtype if mode >= 2 else acc  # gradients in the input dtype, losses in acc
    out = torch.zeros((B, N, P), dtype=out_dtype, device=dev) if mode else psum
    go = _as_bnp(grad_map) if grad_map is not None else x
    w = node_weight if node_weight is not None else psum
    sc = scale if scale is not None else psum
    if B * P > 0:
        _tree_min_kernel[(tiles, B)](
            x, x.stride(0), x.stride(1), x.stride(2),
            lab, lab.stride(0), lab.stride(1),
            tabs["ancestor_table"], tabs["depth"], tabs["internal_rows"], tabs["leaf_rows"],
            tabs["internal_desc"], tabs["internal_slots"], tabs["leaf_slots"], w,
            go, go.stride(0), go.stride(1), go.stride(2),
            sc, out, psum, pcnt, P, N, float(gamma),
            L=L, LP=triton.next_power_of_2(L), DMAX=tabs["internal_desc"].shape[1], NI=ni, NL=nl,
            BLOCK_P=block_p, HAS_W=node_weight is not None, FOCAL=float(gamma) != 0.0, F64=f64,
            MODE=mode, num_warps=warps,
        )
    return out, psum, pcnt


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# The int32 tables the kernel reads, in the order the ops take them (see _common.kernel_tables).
TABLE_NAMES = ("ancestor_table", "depth", "internal_rows", "leaf_rows", "internal_desc",
               "internal_slots", "leaf_slots")


@torch.library.custom_op("hieraloss::tree_min_loss", mutates_args=())
def tree_min_loss_op(logits: torch.Tensor, label_channels: torch.Tensor, tables: list[torch.Tensor],
                     node_weight: torch.Tensor | None, gamma: float, reduction: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, counts): the reduced loss (or the ``[B, N, *spatial]`` map for "none"), float64
    for float64 logits else float32, and the number of unmasked entries per depth (int64 ``[L]``)."""
    _check_reduction(reduction)
    tabs = dict(zip(TABLE_NAMES, tables, strict=True))
    mode = 1 if reduction == "none" else 0
    out, psum, pcnt = _launch(mode, logits, label_channels, tabs, node_weight, gamma)
    counts = pcnt.to(torch.int64).sum(0)
    if reduction == "none":
        return out.view(logits.shape), counts
    sums = psum.to(torch.float64).sum(0)
    if reduction == "sum":
        loss = sums.sum()
    elif reduction == "mean":
        loss = sums.sum() / counts.sum().clamp_min(1)
    else:
        loss = (sums / counts.clamp_min(1)).sum() * _HSSN_FACTOR
    return loss.to(_acc_dtype(logits)), counts


@tree_min_loss_op.register_fake
def _(logits, label_channels, tables, node_weight, gamma, reduction):
    shape = logits.shape if reduction == "none" else ()
    counts = logits.new_empty((tables[0].shape[1],), dtype=torch.int64)
    return logits.new_empty(shape, dtype=_acc_dtype(logits)), counts


@torch.library.custom_op("hieraloss::tree_min_loss_backward", mutates_args=())
def tree_min_loss_backward_op(grad: torch.Tensor, logits: torch.Tensor, label_channels: torch.Tensor,
                              tables: list[torch.Tensor], node_weight: torch.Tensor | None,
                              counts: torch.Tensor, gamma: float, reduction: str) -> torch.Tensor:
    """Gradient of ``sum(loss * grad)`` with respect to the logits, in the logits' dtype."""
    _check_reduction(reduction)
    tabs = dict(zip(TABLE_NAMES, tables, strict=True))
    acc = _acc_dtype(logits)
    if reduction == "none":
        out, _, _ = _launch(3, logits, label_channels, tabs, node_weight, gamma, grad_map=grad)
        return out.view(logits.shape)
    g = grad.to(acc).reshape(())
    if reduction == "sum":
        scale = g.expand(counts.shape)
    elif reduction == "mean":
        scale = (g / counts.sum().clamp_min(1).to(acc)).expand(counts.shape)
    else:
        scale = g * _HSSN_FACTOR / counts.clamp_min(1).to(acc)
    out, _, _ = _launch(2, logits, label_channels, tabs, node_weight, gamma, scale=scale.contiguous())
    return out.view(logits.shape)


@tree_min_loss_backward_op.register_fake
def _(grad, logits, label_channels, tables, node_weight, counts, gamma, reduction):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, label_channels, tables, node_weight, gamma, reduction = inputs
    ctx.save_for_backward(logits, label_channels, node_weight, output[1], *tables)
    ctx.gamma, ctx.reduction = gamma, reduction


def _backward(ctx, grad_loss, grad_counts):
    logits, label_channels, node_weight, counts, *tables = ctx.saved_tensors
    grad = tree_min_loss_backward_op(grad_loss, logits, label_channels, tables, node_weight, counts,
                                     ctx.gamma, ctx.reduction)
    return grad, None, [None] * len(tables), None, None, None


tree_min_loss_op.register_autograd(_backward, setup_context=_setup_context)
