"""LogicSeg's operations in paddle below the door (:mod:`hieraloss.paddle.logic` checks the inputs):
the array interface of :mod:`hieraloss.core.logic` over tensors, the rule tables on a place, the
compiled CPU kernel's glue and the rule descent of logic-guided decoding."""

from __future__ import annotations

import math
from typing import Any

import paddle
from paddle.autograd import PyLayer

from ... import _native
from ...core import logic as _logic
from ...core.plan import plan_for
from ...hierarchy import Hierarchy
from .._tables import TENSOR_TYPES, building_program, no_kernel_in_program, place_of, tables_for
from .device import compute_dtype
from .native import _gradient_buffer, num_threads
from .tree_min import expand_targets_op


class PaddleOps:
    """:class:`hieraloss.core.logic.ArrayOps` over paddle tensors."""

    sigmoid = staticmethod(paddle.nn.functional.sigmoid)
    log = staticmethod(paddle.log)

    @staticmethod
    def power(a, exponent):
        return paddle.pow(a, paddle.to_tensor(exponent, dtype=a.dtype, place=place_of(a)))  # a float is cast to float32

    @staticmethod
    def clamp(x, lo=None, hi=None):
        return paddle.clip(x, min=lo, max=hi)

    @staticmethod
    def where(cond, a, b):
        return paddle.where(cond, a, b if isinstance(b, TENSOR_TYPES) else paddle.full_like(a, b))

    @staticmethod
    def cols(a, index):
        return paddle.index_select(a, index, axis=1)

    @staticmethod
    def sum0(a):
        return a.sum(axis=0)

    @staticmethod
    def total(a):
        return a.sum()

    @staticmethod
    def gram(a):
        return paddle.matmul(a, a, transpose_x=True)

    @staticmethod
    def matmul(a, b):
        return paddle.matmul(a, b)

    @staticmethod
    def add_cols(a, index, values):
        return paddle.index_add(a, index, 1, values.astype(a.dtype))

    @staticmethod
    def sum1(a):
        return a.sum(axis=1)

    @staticmethod
    def max_all(a):
        return a.max()

    @staticmethod
    def row_count(cond):
        return cond.astype("int64").sum(axis=1)

    @staticmethod
    def as_float(cond, like):
        return cond.astype(like.dtype)


OPS = PaddleOps()


def tables(hierarchy: Hierarchy, place: Any, mode: str) -> _logic.LogicTables:
    tab = tables_for(hierarchy, place)
    t = _logic.logic_tables(plan_for(hierarchy), mode)

    def dev(name, i, a):
        return tab.get(("logic", mode, name, i), lambda: a)

    return t._replace(edge_child=dev("edge_child", 0, t.edge_child), edge_parent=dev("edge_parent", 0, t.edge_parent),
                      internal=dev("internal", 0, t.internal),
                      child_ranks=tuple(dev("rank", i, r) for i, r in enumerate(t.child_ranks)),
                      groups=tuple(dev("group", i, g) for i, g in enumerate(t.groups)),
                      off_diagonal=tuple(dev("off_diagonal", i, m) for i, m in enumerate(t.off_diagonal)))


def scores(x: paddle.Tensor) -> paddle.Tensor:
    n = x.shape[1]
    perm = [0, *range(2, x.ndim), 1]
    return paddle.nn.functional.sigmoid(x.astype(compute_dtype(x.dtype)).transpose(perm).reshape([-1, n]))


def asl(x, lc, hierarchy, gamma_neg, gamma_pos, clip, eps):
    """The asymmetric loss of checked logits and label channels, as paddle ops."""
    cdt = compute_dtype(x.dtype)
    positive, mask = expand_targets_op(lc, hierarchy)
    valid = (lc >= 0).astype(cdt).sum()
    return _logic.asymmetric_bce(OPS, x.astype(cdt), positive.astype(cdt), mask.astype(cdt), valid,
                                 gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)


def refine(x: paddle.Tensor, hierarchy: Hierarchy, steps: int, step_size: float, p: float, exclusion: str
           ) -> paddle.Tensor:
    """Rule descent on checked logits (:func:`hieraloss.paddle.logic_refine`): new logits, per image."""
    if x.size == 0 or steps == 0:
        return x.detach().clone()
    t = tables(hierarchy, place_of(x), exclusion)
    n = x.shape[1]
    z = x.detach().astype(compute_dtype(x.dtype)).transpose([0, *range(2, x.ndim), 1])  # [B, *spatial, N]
    rows = []
    for b in range(z.shape[0]):
        zb = z[b].reshape([-1, n])
        for _ in range(steps):
            zb = _logic.refine_scores_step(OPS, zb, t, p, float(step_size))
        rows.append(zb.reshape(z.shape[1:]))
    return paddle.stack(rows).transpose([0, x.ndim - 1, *range(1, x.ndim - 1)]).astype(x.dtype)


def native_runs(backend: str, x: paddle.Tensor, r: paddle.Tensor) -> bool:
    if backend not in ("auto", "native"):
        return False
    if building_program():
        return no_kernel_in_program(backend, "native")
    dtypes_ok = r.dtype == x.dtype  # float16 / bfloat16 run in float32, as on the paddle ops
    if backend == "native" and not dtypes_ok:
        raise RuntimeError("backend='native' was asked for, but the compiled CPU kernel takes logits and rule "
                           f"logits of one dtype, got {x.dtype} and {r.dtype}")
    return dtypes_ok and _native.use_for(backend, on_cpu=bool(x.place.is_cpu_place()), device=str(place_of(x)))


class _AttachOne(PyLayer):
    """The objective's value with the gradient written in the forward pass: backward scales it."""

    @staticmethod
    def forward(ctx, x, value, grad):  # value: a Python float
        ctx.grad, ctx.dtype = grad, x.dtype
        return paddle.to_tensor(value, dtype=grad.dtype, place=place_of(x))

    @staticmethod
    def backward(ctx, g):
        return (ctx.grad * g.astype(ctx.grad.dtype)).astype(ctx.dtype)


class _AttachTwo(PyLayer):
    @staticmethod
    def forward(ctx, x, r, value, grad_x, grad_r):
        ctx.grads, ctx.dtypes = (grad_x, grad_r), (x.dtype, r.dtype)
        return paddle.to_tensor(value, dtype=grad_x.dtype, place=place_of(x))

    @staticmethod
    def backward(ctx, g):
        return tuple(None if t is None else (t * g.astype(t.dtype)).astype(dt)
                     for t, dt in zip(ctx.grads, ctx.dtypes, strict=True))


def native_objective(x, r, lc, hierarchy, *, p, exclusion, easy_filter, weight, with_rules,
                      asl=_logic.ASL_DEFAULTS):
    """LogicSeg on the compiled CPU kernel (:func:`hieraloss.torch.ops.logicseg.native_objective`)."""
    rr = x if r is None else r
    need = paddle.is_grad_enabled() and (not x.stop_gradient or not rr.stop_gradient)
    cdt = compute_dtype(x.dtype)
    xc = x.detach().astype(cdt).contiguous()
    rc = xc if r is None else r.detach().astype(cdt).contiguous()
    gx = _gradient_buffer(xc) if need and (not x.stop_gradient or r is None) else None
    gr = (_gradient_buffer(rc) if need and r is not None and not r.stop_gradient and with_rules and weight != 0
          else None)
    B, N = x.shape[:2]
    P = math.prod(x.shape[2:])
    lcf = lc.reshape([B, P]).astype("int64").contiguous()
    valid = int((lcf >= 0).astype("int64").sum())
    total_value, asl_value, rules = _native.logicseg(
        _native.FLOAT64 if cdt == paddle.float64 else _native.FLOAT32, xc.data_ptr(), (B, N, P),
        lcf.data_ptr(), valid, hierarchy, asl=asl, rules_x=rc.data_ptr() if with_rules else None,
        rules_shape=(rc.shape[0], N, math.prod(rc.shape[2:])) if with_rules else None, exclusion=exclusion,
        easy_filter=easy_filter, p=p, rule_weight=weight, grad=0 if gx is None else gx.data_ptr(),
        rules_grad=0 if gr is None else gr.data_ptr(), num_threads=num_threads())
    if need and r is None:
        value = _AttachOne.apply(x, total_value, gx)
    elif need:
        gx = gx if gx is not None else paddle.zeros_like(xc)
        gr = gr if gr is not None else paddle.zeros_like(rc)
        value = _AttachTwo.apply(x, r, total_value, gx, gr)
    else:
        value = paddle.to_tensor(total_value, dtype=cdt, place=place_of(x))
    parts = None if rules is None else tuple(paddle.to_tensor(v, dtype=cdt, place=place_of(x)) for v in rules)
    return value, paddle.to_tensor(asl_value, dtype=cdt, place=place_of(x)), parts
