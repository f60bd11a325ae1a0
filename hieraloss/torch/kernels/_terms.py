"""Per-entry math of the fused objective kernel (Triton device functions).

A tree-min entry is ``f(t) = softplus(t) * sigmoid(t)^gamma`` (``gamma = 0`` without focal), with
``t = zmax`` for a negative entry and ``t = -zmin`` for a positive one; ``sigmoid(t)^gamma =
exp(-gamma * softplus(-t))``. All three functions share ``e = exp(-|t|)``, so neither branch
overflows and no epsilon is needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# On NVIDIA GPUs the float32 log, exp and reciprocal below are one MUFU instruction and at most one
# multiply each. tl.log would call libdevice's logf, ~25 instructions and a branch per entry, which
# also breaks the straight-line code into basic blocks; tl.exp (ex2.approx without ftz) adds a range
# test and two predicated multiplies to keep denormal results, and 1.0 / x (div.full) a range test,
# a select and two multiplies for |x| > 2^126: 3-4 of the ~60 instructions of an entry, for results
# the kernels do not need (a denormal exp is below 1.2e-38, flushed to 0). The interpreter (and ROCm)
# cannot run PTX, so they take tl.log, tl.exp and the division.
_PTX_MATH = os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None


@triton.jit
def plain_exp(x):
    """Triton's own exp (what ``exp`` is without PTX; ``profile_gpu_step.py --plain-math`` swaps it in)."""
    return tl.exp(x)


@triton.jit
def plain_reciprocal(x):
    return 1.0 / x


if _PTX_MATH:

    @triton.jit
    def log(x):
        y = tl.log(x)
        if x.dtype == tl.float32:
            y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                          pack=1) * 0.6931471805599453
        return y

    @triton.jit
    def exp(x):
        y = tl.exp(x)
        if x.dtype == tl.float32:
            y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                          dtype=tl.float32, is_pure=True, pack=1)
        return y

    @triton.jit
    def reciprocal(x):
        """1 / x for ``x`` in [1, 2] (``rcp.approx.ftz``, 1 ulp in float32)."""
        y = 1.0 / x
        if x.dtype == tl.float32:
            y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return y

    @triton.jit
    def opaque(x):
        """``x``, through an instruction the compiler cannot see through: values derived from it are
        not merged with values derived from ``x`` (keeps common-subexpression elimination from
        keeping a per-node value alive from one tree walk to the next)."""
        if x.dtype == tl.int64:
            y = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [x], dtype=tl.int64, is_pure=False, pack=1)
        else:
            y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)
        return y

    @triton.jit
    def pin(x):
        """``x``, computed here: an identity the compiler cannot see through or move, so the work that
        produces ``x`` is not sunk past this point (LLVM otherwise sinks every node's terms of the
        straight-line tree walk to their first use at its end, keeping per-node values alive there)."""
        if x.dtype == tl.int1:
            y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x.to(tl.int32)], dtype=tl.int32,
                                          is_pure=False, pack=1) != 0
        elif x.dtype == tl.float64:
            y = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=d,d", [x], dtype=tl.float64, is_pure=False, pack=1)
        elif x.dtype == tl.float32:
            y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=False, pack=1)
        else:
            y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)
        return y

else:

    @triton.jit
    def log(x):
        return tl.log(x)

    exp, reciprocal = plain_exp, plain_reciprocal

    @triton.jit
    def opaque(x):
        return x

    @triton.jit
    def pin(x):
        return x


@triton.jit
def term_loss(t, gamma, FOCAL: tl.constexpr):
    """f(t)."""
    log1pe = log(1.0 + exp(-tl.abs(t)))
    loss = tl.maximum(t, 0.0) + log1pe
    if FOCAL:
        loss = loss * exp(-gamma * (tl.maximum(-t, 0.0) + log1pe))
    return loss


@triton.jit
def _sigmoid(t, e):
    """sigmoid(t) from ``e = exp(-|t|)``, one reciprocal."""
    r = reciprocal(1.0 + e)
    return tl.where(t >= 0, r, e * r)


@triton.jit
def _focal_factor(t, s, log1pe, gamma, FOCAL: tl.constexpr):
    """sigmoid(t)^gamma: products of ``s`` for a small integer ``gamma`` (``FOCAL`` is that integer),
    else one exp (``FOCAL == -1``)."""
    if FOCAL == 1:
        fw = s
    elif FOCAL == 2:
        fw = s * s
    elif FOCAL == 3:
        fw = s * s * s
    elif FOCAL == 4:
        s2 = s * s
        fw = s2 * s2
    else:
        fw = exp(-gamma * (tl.maximum(-t, 0.0) + log1pe))
    return fw


@triton.jit
def term_grad(t, gamma, FOCAL: tl.constexpr):
    """f'(t) = sigmoid(t)^gamma * (sigmoid(t) + gamma * (1 - sigmoid(t)) * softplus(t))."""
    e = exp(-tl.abs(t))
    s = _sigmoid(t, e)
    if FOCAL:
        log1pe = log(1.0 + e)
        sp = tl.maximum(t, 0.0) + log1pe
        return _focal_factor(t, s, log1pe, gamma, FOCAL) * (s + gamma * (1.0 - s) * sp)
    return s


@triton.jit
def term_loss_grad(t, gamma, FOCAL: tl.constexpr):
    """(f(t), f'(t)) from one exp."""
    e = exp(-tl.abs(t))
    log1pe = log(1.0 + e)
    sp = tl.maximum(t, 0.0) + log1pe
    s = _sigmoid(t, e)
    if FOCAL:
        fw = _focal_factor(t, s, log1pe, gamma, FOCAL)
        return sp * fw, fw * (s + gamma * (1.0 - s) * sp)
    return sp, s


def focal_code(gamma: float) -> int:
    """The kernels' ``FOCAL`` constexpr for ``gamma``: 0 without focal, the integer for gamma in 1..4
    (``sigmoid^gamma`` as products, no exp), -1 for any other gamma."""
    g = float(gamma)
    if g == 0.0:
        return 0
    return int(g) if g in (1.0, 2.0, 3.0, 4.0) else -1


@triton.jit
def lse_update(m, s, x):
    """Online log-sum-exp: fold ``x`` into (running max ``m``, sum of exp(. - m) ``s``), one exp."""
    e = exp(-tl.abs(x - m))
    s = tl.where(x > m, s * e + 1.0, s + e)
    return tl.maximum(m, x), s


@triton.jit
def load_rows(ptr, mask, one, other=0, CG: tl.constexpr = False):
    """``tl.load(ptr, mask, other)`` (from L2 with ``CG``: ``.cg``) with ``ptr`` carried through a one-trip
    loop (``one`` is a run-time 1), so it reaches the load as a block argument. Triton's coalescing
    pass searches the whole connected slice of every load or store whose pointer has a defining op,
    and that search alone is quadratic in the length of straight-line code (minutes for wide trees:
    docs/performance.md, "Compile time of the generated kernels"). A block-argument pointer skips
    that search. The loop costs a compare and a branch, and the pointer's
    alignment is lost to it (which matters only where a thread loads several consecutive entries); a
    constant ``one`` gives the plain load."""
    val = tl.zeros(ptr.shape, ptr.dtype.element_ty)
    p = ptr
    for _ in range(0, one):
        if CG:
            val = tl.load(p, mask=mask, other=other, cache_modifier=".cg")
        else:
            val = tl.load(p, mask=mask, other=other)
        p += one - 1
    return val


@triton.jit
def store_rows(ptr, value, mask, one):
    """``tl.store(ptr, value, mask)`` with the pointer carried like :func:`load_rows`'s."""
    p = ptr
    for _ in range(0, one):
        tl.store(p, value, mask=mask)
        p += one - 1
