"""The hierarchy triplet loss in three Triton launches, value and gradient together.

The rule is :mod:`hieraloss.core.triplets`' (the same triplets as the torch ops of
``hieraloss.torch.ops.triplet``); the loss is SPEC section 6:

    loss = mean over classes c with T_c > 0 of  mean_i relu(d(a_i, p_i) - d(a_i, n_i) + m_i),
    d(u, v) = 1 - <u, v> of L2-normalised embeddings, m_i = base + (psi(c, n_i) - psi(c, p_i)) / (2 L).

1. ``_codes_kernel``: per embedding pixel, the label at its nearest-resampled position, mapped to
   ``leaf | group << 16`` (group: the leaf's sibling group), -1 for a pixel that does not take part.
2. ``_select_kernel``, one program per class c: scans the pixels in key order (flat order, or the
   ``order`` given for ``sampling="random"``) and keeps the first ``M`` anchors (class c),
   positives (c's group, not c) and negatives (outside c's group) by running counts and a prefix
   sum per block; it stops once it has ``M`` of each. ``T_c = min(M, #anchors, #positives,
   #negatives)``. No sort, no host sync.
3. ``_score_kernel``, one program per (class, block of triplets): gathers and normalises the three
   embedding rows, writes the block's share of the loss and, with a gradient wanted, adds the
   gradient of the loss (through the normalisation) into a zeroed buffer with atomic adds; the
   backward only scales that buffer (:mod:`._grad_buffer`). A ``scale`` (``hssn_loss``'s triplet
   weight) multiplies the per-class weight, so the value and the buffer come out weighted: the
   caller needs no multiply, and the backward sees an upstream gradient of 1 (no pass of its own).

The atomic adds make the gradient's last bits depend on the order the GPU adds them in: with
``torch.use_deterministic_algorithms(True)`` the torch backend picks the torch ops instead.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from ...core import triplets as core_triplets
from ...hierarchy import Hierarchy
from .._tables import cached_on
from ._common import FP_FUSION, MAX_GRID_ROWS, on_device
from ._grad_buffer import EagerFusedLoss, eager, saved_buffer_gradient

__all__ = ["triplet_codes", "triplet_loss", "MAX_LEAVES", "MAX_CHANNELS"]

# Codes pack the leaf id in 16 bits; an embedding row must fit one block of registers.
MAX_LEAVES = 1 << 15
MAX_CHANNELS = 4096
_F32_MAX = float(np.finfo(np.float32).max)


def _tables(hierarchy: Hierarchy, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 ``group [K]`` (sibling group of each leaf), ``possible [K]`` (1 where the class can have
    a triplet at all: its group has another leaf and there is a leaf outside it) and ``psi [K, K]``
    (leaf distance), cached per device."""

    return cached_on(hierarchy, device, "_fused_triplet", _build_tables)


def _build_tables(tab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = tab.hierarchy
    group = core_triplets.sibling_groups(h)
    size = np.bincount(group)[group]
    possible = (size > 1) & (size < h.num_leaves)
    return tuple(torch.tensor(np.asarray(a, dtype=np.int32), device=tab.device)
                 for a in (group, possible, h.leaf_distance))


@triton.jit(do_not_specialize=["slb", "sly", "slx", "H", "W", "h", "w", "K", "ignore"])
def _codes_kernel(lab_ptr, slb, sly, slx, H, W, h, w, scale_y, scale_x, K, ignore, group_ptr, out_ptr,
                  BLOCK: tl.constexpr):
    """``out [B, h * w]``: ``leaf | group << 16`` at each pixel's nearest label, or -1."""
    b = tl.program_id(1).to(tl.int64)
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = q < h * w
    y = q // w
    x = q % w
    # F.interpolate(mode="nearest"): source index min(floor(i * float32(in / out)), in - 1), in float32.
    sy = tl.minimum(tl.floor(y.to(tl.float32) * scale_y).to(tl.int32), H - 1)
    sx = tl.minimum(tl.floor(x.to(tl.float32) * scale_x).to(tl.int32), W - 1)
    lab = tl.load(lab_ptr + b * slb + sy.to(tl.int64) * sly + sx.to(tl.int64) * slx, mask=mask, other=-1)
    lab = lab.to(tl.int64)
    leaf = (lab >= 0) & (lab < K) & (lab != ignore)
    safe = tl.where(leaf, lab, 0).to(tl.int32)
    group = tl.load(group_ptr + safe, mask=mask & leaf, other=0)
    code = tl.where(leaf, safe | (group << 16), -1)
    tl.store(out_ptr + b * h * w + q, code, mask=mask)


@triton.jit(do_not_specialize=["P", "M"])
def _select_kernel(code_ptr, order_ptr, group_ptr, possible_ptr, P, M, anchor_ptr, positive_ptr, negative_ptr,
                   count_ptr, BLOCK: tl.constexpr, ORDERED: tl.constexpr):
    """Program c: the first ``M`` anchors, positives and negatives of class c in key order, as flat
    pixel positions into ``[K, M]`` tables, and ``count [K] = T_c``. A class that cannot have a
    triplet (no sibling leaf, or no leaf outside its group) does not scan at all."""
    c = tl.program_id(0)
    g = tl.load(group_ptr + c)
    possible = tl.load(possible_ptr + c) != 0
    row = c.to(tl.int64) * M
    na = tl.zeros([], tl.int32)
    npos = tl.zeros([], tl.int32)
    nneg = tl.zeros([], tl.int32)
    start = tl.zeros([], tl.int32)
    while possible & (start < P) & ((na < M) | (npos < M) | (nneg < M)):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < P
        if ORDERED:
            pos = tl.load(order_ptr + offs, mask=mask, other=0).to(tl.int32)
        else:
            pos = offs
        code = tl.load(code_ptr + pos, mask=mask, other=-1)
        taking = code >= 0
        cls = code & 65535
        grp = code >> 16
        is_a = taking & (cls == c)
        is_p = taking & (grp == g) & (cls != c)
        is_n = taking & (grp != g)
        ra = na + tl.cumsum(is_a.to(tl.int32), 0) - 1
        rp = npos + tl.cumsum(is_p.to(tl.int32), 0) - 1
        rn = nneg + tl.cumsum(is_n.to(tl.int32), 0) - 1
        tl.store(anchor_ptr + row + ra, pos, mask=is_a & (ra < M))
        tl.store(positive_ptr + row + rp, pos, mask=is_p & (rp < M))
        tl.store(negative_ptr + row + rn, pos, mask=is_n & (rn < M))
        na += tl.sum(is_a.to(tl.int32), 0)
        npos += tl.sum(is_p.to(tl.int32), 0)
        nneg += tl.sum(is_n.to(tl.int32), 0)
        start += BLOCK
    tl.store(count_ptr + c, tl.minimum(tl.minimum(na, npos), tl.minimum(nneg, M)))


@triton.jit
def _offsets(pos, hw, w, sb, sy, sx):
    """Element offsets of the flat pixel positions ``pos`` (``b * h * w + y * w + x``) of a ``[B, C, h, w]`` map."""
    pos = pos.to(tl.int64)
    q = pos % hw
    return (pos // hw) * sb + (q // w) * sy + (q % w) * sx


@triton.jit
def _rows(emb_ptr, pos, hw, w, seb, sec, sey, sex, ch, mask, CT: tl.constexpr):
    """``[BT, BC]`` embedding rows of the flat pixel positions ``pos`` (``b * h * w + y * w + x``)."""
    base = _offsets(pos, hw, w, seb, sey, sex)
    return tl.load(emb_ptr + base[:, None] + ch[None, :] * sec, mask=mask, other=0.0).to(CT)


@triton.jit
def _unit_backward(g, u, norm, eps):
    """Gradient with respect to ``x`` of ``<g, u>`` for ``u = x / max(|x|, eps)`` (F.normalize)."""
    inner = tl.sum(g * u, 1)
    big = ~(norm < eps)  # a NaN norm takes this branch, so the NaN reaches the gradient (as in torch)
    return tl.where(big[:, None], (g - u * inner[:, None]) / tl.maximum(norm, eps)[:, None], g / eps)


@triton.jit(do_not_specialize=["hw", "w", "seb", "sec", "sey", "sex", "sgb", "sgc", "sgy", "sgx", "C", "K", "M"])
def _score_kernel(emb_ptr, hw, w, seb, sec, sey, sex, C,
                  code_ptr, anchor_ptr, positive_ptr, negative_ptr, count_ptr, psi_ptr, K, M,
                  const_ptr, scale_hi, scale_lo,
                  grad_ptr, sgb, sgc, sgy, sgx, part_ptr,
                  BT: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr, F64: tl.constexpr, GRAD: tl.constexpr):
    """Program (j, c): triplets ``j * BT ..`` of class c. ``part [K, blocks]``: their share of the loss;
    ``grad`` (GRAD): the loss's gradient added in; both times ``scale = scale_hi + scale_lo`` (float32
    scalars: a float64 scale in two parts, the second read only in float64)."""
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    j = tl.program_id(0)
    c = tl.program_id(1)
    base_margin = tl.load(const_ptr).to(CT)
    two_l = tl.load(const_ptr + 1).to(CT)
    eps = tl.load(const_ptr + 2).to(CT)
    if F64:
        scale = tl.cast(scale_hi, CT) + tl.cast(scale_lo, CT)
    else:
        scale = tl.cast(scale_hi, CT)
    classes = tl.zeros([], tl.int32)  # classes with a triplet, counted KP at a time
    for k0 in range(0, K, KP):
        ks = k0 + tl.arange(0, KP)
        classes += tl.sum((tl.load(count_ptr + ks, mask=ks < K, other=0) > 0).to(tl.int32), 0)
    t = tl.load(count_ptr + c)
    i = j * BT + tl.arange(0, BT)
    valid = i < t
    row = c.to(tl.int64) * M + i
    a = tl.load(anchor_ptr + row, mask=valid, other=0)
    p = tl.load(positive_ptr + row, mask=valid, other=0)
    n = tl.load(negative_ptr + row, mask=valid, other=0)
    ch = tl.arange(0, BC)
    mask = valid[:, None] & (ch < C)[None, :]
    xa = _rows(emb_ptr, a, hw, w, seb, sec, sey, sex, ch, mask, CT)
    xp = _rows(emb_ptr, p, hw, w, seb, sec, sey, sex, ch, mask, CT)
    xn = _rows(emb_ptr, n, hw, w, seb, sec, sey, sex, ch, mask, CT)
    norm_a = tl.sqrt(tl.sum(xa * xa, 1))
    norm_p = tl.sqrt(tl.sum(xp * xp, 1))
    norm_n = tl.sqrt(tl.sum(xn * xn, 1))
    ua = xa / tl.maximum(norm_a, eps)[:, None]
    up = xp / tl.maximum(norm_p, eps)[:, None]
    un = xn / tl.maximum(norm_n, eps)[:, None]
    d_ap = 1.0 - tl.sum(ua * up, 1)
    d_an = 1.0 - tl.sum(ua * un, 1)
    cls_p = tl.load(code_ptr + p, mask=valid, other=0) & 65535
    cls_n = tl.load(code_ptr + n, mask=valid, other=0) & 65535
    psi_p = tl.load(psi_ptr + c * K + cls_p, mask=valid, other=0)
    psi_n = tl.load(psi_ptr + c * K + cls_n, mask=valid, other=0)
    margin = base_margin + (psi_n - psi_p).to(CT) / two_l
    hinge = d_ap - d_an + margin
    # Each class's mean, then the mean over the classes that have triplets (times the caller's scale).
    weight = tl.where(t > 0, scale / (tl.maximum(t, 1).to(CT) * tl.maximum(classes, 1).to(CT)), 0.0)
    active = valid & ~(hinge <= 0.0)  # relu: a NaN passes, as in torch (the loss shows it)
    per = tl.where(active, hinge, 0.0)
    tl.store(part_ptr + c * tl.num_programs(0) + j, tl.sum(per, 0) * weight)
    if GRAD:
        s = tl.where(active, weight, 0.0)[:, None]
        add = mask & active[:, None]
        ga = _unit_backward(s * (un - up), ua, norm_a, eps)
        gp = _unit_backward(-s * ua, up, norm_p, eps)
        gn = _unit_backward(s * ua, un, norm_n, eps)
        tl.atomic_add(grad_ptr + _offsets(a, hw, w, sgb, sgy, sgx)[:, None] + ch[None, :] * sgc,
                      ga.to(grad_ptr.dtype.element_ty), mask=add, sem="relaxed")
        tl.atomic_add(grad_ptr + _offsets(p, hw, w, sgb, sgy, sgx)[:, None] + ch[None, :] * sgc,
                      gp.to(grad_ptr.dtype.element_ty), mask=add, sem="relaxed")
        tl.atomic_add(grad_ptr + _offsets(n, hw, w, sgb, sgy, sgx)[:, None] + ch[None, :] * sgc,
                      gn.to(grad_ptr.dtype.element_ty), mask=add, sem="relaxed")


_CODE_BLOCK = 1024
_SELECT_BLOCK = 2048
_SELECT_WARPS = 8


def _triplet_codes(labels: torch.Tensor, key: str, ignore_index: int, h: int, w: int) -> torch.Tensor:
    """int32 ``[B * h * w]``: ``leaf | group << 16`` at each pixel of the ``h x w`` map (labels
    ``[B, H, W]`` resampled nearest, as ``F.interpolate``), -1 where the pixel does not take part."""
    hierarchy = Hierarchy.by_fingerprint(key)
    B, H, W = labels.shape
    out = torch.empty(B * h * w, dtype=torch.int32, device=labels.device)
    if out.numel():
        group = _tables(hierarchy, labels.device)[0]
        scale_y, scale_x = float(np.float32(H / h)), float(np.float32(W / w))
        with on_device(labels.device):
            _codes_kernel[(triton.cdiv(h * w, _CODE_BLOCK), B)](
                labels, labels.stride(0), labels.stride(1), labels.stride(2), H, W, h, w, scale_y, scale_x,
                hierarchy.num_leaves, int(ignore_index), group, out, BLOCK=_CODE_BLOCK, num_warps=4, **FP_FUSION)
    return out


triplet_codes_op = torch.library.custom_op("hieraloss::triplet_codes", mutates_args=())(_triplet_codes)


@triplet_codes_op.register_fake
def _(labels, key, ignore_index, h, w):
    return labels.new_empty((labels.shape[0] * h * w,), dtype=torch.int32)


def _class_chunk(K: int) -> int:
    """Classes the scoring kernel reads at a time when it counts those with a triplet."""
    return min(1024, max(16, triton.next_power_of_2(K)))


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, dtype: torch.dtype, base_margin: float, max_depth: int) -> torch.Tensor:
    """``[base_margin, 2 L, eps]`` in the compute dtype on ``device``; cached and bounded, since building
    it per call would be a host-to-device copy (a sync, not capturable in a CUDA graph)."""
    return torch.tensor([base_margin, 2.0 * max_depth, 1e-12], dtype=dtype, device=device)


def _score_sizes(C: int, f64: bool) -> tuple[int, int, int]:
    """(triplets per program, padded channels, warps) of the scoring kernel: about 8 entries of each
    ``[BT, BC]`` block per thread, so the dozen such values it holds fit in registers without spilling
    (``bench_kernels.py --compile-check``); float64 takes two registers per entry, so half as many."""
    bc = max(16, triton.next_power_of_2(C))
    per_thread = 4 if f64 else 8
    bt = max(1, min(32, 32 * 4 * per_thread // bc))
    return bt, bc, min(16, max(4, bt * bc // (32 * per_thread)))


def _triplet(embeddings: torch.Tensor, codes: torch.Tensor, order: torch.Tensor | None, key: str, max_per_class: int,
             base_margin: float, scale: float, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, grad)``: ``scale`` times the triplet loss of ``embeddings [B, C, h, w]`` for the pixel
    codes of :func:`triplet_codes_op` (key order: flat, or ``order [B * h * w]``), and with
    ``want_grad`` the gradient of that (else an empty tensor). The scale is a kernel argument (no
    tensor of its own: nothing copied to the device), folded into the per-class weight."""
    hierarchy = Hierarchy.by_fingerprint(key)
    dev = embeddings.device
    B, C, h, w = embeddings.shape
    P = B * h * w
    K = hierarchy.num_leaves
    ct = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    M = max(1, min(int(max_per_class), P))
    group, possible, psi = _tables(hierarchy, dev)
    # The anchor, positive and negative tables [K, M], each 16-byte aligned: one launch specialisation
    # whatever K * M (the JIT marks aligned pointers), and the one _aot compiles.
    row = -(-K * M // 4) * 4
    picks = torch.empty(3 * row, dtype=torch.int32, device=dev).unfold(0, K * M, row)
    # Every program of the selection writes its class's count, and every scoring program its share
    # of the loss: zeros (a fill launch each) only when nothing is launched.
    alloc = torch.empty if P else torch.zeros
    count = alloc(K, dtype=torch.int32, device=dev)
    if P:
        with on_device(dev):
            _select_kernel[(K,)](codes, order if order is not None else codes, group, possible, P, M,
                                 picks[0], picks[1], picks[2], count, BLOCK=_SELECT_BLOCK,
                                 ORDERED=order is not None, num_warps=_SELECT_WARPS, **FP_FUSION)
    bt, bc, score_warps = _score_sizes(C, ct == torch.float64)
    blocks = triton.cdiv(M, bt)
    part = alloc((K, blocks), dtype=ct, device=dev)
    grad = (torch.zeros_like(embeddings, dtype=embeddings.dtype if embeddings.dtype in (torch.float32, torch.float64)
                             else torch.float32) if want_grad else embeddings.new_empty((0,)))
    if P:  # C == 0 too: zero-width rows are zero vectors, at distance 1 from everything
        g = grad if want_grad else part
        gs = grad.stride() if want_grad else (0, 0, 0, 0)
        with on_device(dev):
            _score_kernel[(blocks, K)](
                embeddings, h * w, w, *embeddings.stride(), C,
                codes, picks[0], picks[1], picks[2], count, psi, K, M,
                _constants(dev, ct, float(base_margin), hierarchy.max_depth), *_split(scale),
                g, *gs, part,
                BT=bt, BC=bc, KP=_class_chunk(K), F64=ct == torch.float64, GRAD=bool(want_grad),
                num_warps=score_warps, **FP_FUSION)
    if want_grad and grad.dtype != embeddings.dtype:
        grad = grad.to(embeddings.dtype)
    return part.sum(), grad


def _split(scale: float) -> tuple[float, float]:
    """``scale`` as ``hi + lo``, both float32 (the kernel's float scalars): float64 compute adds them back
    (to within 2**-48 of ``scale``), float32 reads ``hi`` alone."""
    if not abs(scale) <= _F32_MAX:  # inf, NaN, or beyond float32 (the kernel reads it as inf)
        return scale, 0.0
    hi = float(np.float32(scale))
    return hi, float(np.float32(scale - hi))


triplet_op = torch.library.custom_op("hieraloss::triplet", mutates_args=())(_triplet)


@triplet_op.register_fake
def _(embeddings, codes, order, key, max_per_class, base_margin, scale, want_grad):
    ct = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    return (embeddings.new_empty((), dtype=ct),
            torch.empty_like(embeddings) if want_grad else embeddings.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad):
    none = (None,) * 7
    if grad_loss is None:
        return (None, *none)
    return (saved_buffer_gradient(ctx, grad_loss, "the fused triplet loss", "embeddings did not require grad"),
            *none)


triplet_op.register_autograd(_backward, setup_context=_setup_context)


def triplet_codes(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int, size: tuple[int, int]) -> torch.Tensor:
    """See :func:`triplet_codes_op` (eager: its implementation, without the dispatcher)."""
    args = (labels, hierarchy.fingerprint, int(ignore_index), int(size[0]), int(size[1]))
    return _triplet_codes(*args) if eager(labels) else torch.ops.hieraloss.triplet_codes(*args)


def triplet_loss(embeddings: torch.Tensor, codes: torch.Tensor, hierarchy: Hierarchy, *, max_per_class: int,
                 base_margin: float, order: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """The loss times ``scale`` (float64 for float64 embeddings, else float32), differentiable with
    respect to ``embeddings``; ``order`` is the key order for ``sampling="random"`` (None: flat order)."""
    want_grad = torch.is_grad_enabled() and embeddings.requires_grad
    args = (embeddings, codes, order, hierarchy.fingerprint, int(max_per_class), float(base_margin), float(scale),
            want_grad)
    if eager(embeddings):
        return EagerFusedLoss.apply(_triplet, *args)
    loss, _ = torch.ops.hieraloss.triplet(*args)
    return loss


def unsupported_reason(hierarchy: Hierarchy, shape: tuple[int, ...]) -> str:
    """What :func:`supports` asks of embeddings of this shape, for an error message."""
    return (f"the fused triplet kernels take fewer than {MAX_LEAVES} leaves, at most {MAX_CHANNELS} channels, "
            f"fewer than 2**31 embedding elements and at most {MAX_GRID_ROWS} images; got {hierarchy.num_leaves} "
            f"leaves and embeddings of shape {list(shape)}")


def supports(hierarchy: Hierarchy, embeddings: torch.Tensor) -> bool:
    """Whether the kernels take these sizes (leaf ids fit the 16-bit code, channels one row block, a
    grid row per image)."""
    return (hierarchy.num_leaves < MAX_LEAVES and embeddings.shape[1] <= MAX_CHANNELS
            and math.prod(embeddings.shape) < 2**31 and embeddings.shape[0] <= MAX_GRID_ROWS)
