"""LogicSeg's operations in torch below the door (:mod:`hieraloss.torch.logic` checks the inputs):
the array interface of :mod:`hieraloss.core.logic` over tensors, the rule tables on a device, the
compiled CPU kernel's glue and the rule descent of logic-guided decoding."""

from __future__ import annotations

import math

import torch

from .. import _native
from ..core import logic as _logic
from ..core.plan import plan_for
from ..hierarchy import Hierarchy
from . import _ops
from ._native_op import _gradient_buffer
from ._tables import cached_on


class TorchOps:
    """:class:`hieraloss.core.logic.ArrayOps` over torch tensors."""

    sigmoid = staticmethod(torch.sigmoid)
    log = staticmethod(torch.log)
    power = staticmethod(torch.pow)

    @staticmethod
    def clamp(x, lo=None, hi=None):
        return torch.clamp(x, min=lo, max=hi)

    @staticmethod
    def where(cond, a, b):
        return torch.where(cond, a, b)

    @staticmethod
    def cols(a, index):
        return a.index_select(1, index)

    @staticmethod
    def sum0(a):
        return a.sum(0)

    @staticmethod
    def total(a):
        return a.sum()

    @staticmethod
    def gram(a):
        return a.transpose(0, 1) @ a

    @staticmethod
    def matmul(a, b):
        return a @ b

    @staticmethod
    def add_cols(a, index, values):
        return a.index_add(1, index, values.to(a.dtype))

    @staticmethod
    def sum1(a):
        return a.sum(1)

    @staticmethod
    def max_all(a):
        return a.amax()

    @staticmethod
    def row_count(cond):
        return cond.sum(1)

    @staticmethod
    def as_float(cond, like):
        return cond.to(like.dtype)


OPS = TorchOps()


def _build_tables(tab, mode: str) -> _logic.LogicTables:
    t = _logic.logic_tables(plan_for(tab.hierarchy), mode)

    def dev(a):
        return torch.tensor(a, device=tab.device)

    return t._replace(edge_child=dev(t.edge_child), edge_parent=dev(t.edge_parent), internal=dev(t.internal),
                      child_ranks=tuple(dev(r) for r in t.child_ranks), groups=tuple(dev(g) for g in t.groups),
                      off_diagonal=tuple(dev(m) for m in t.off_diagonal))


def tables(hierarchy: Hierarchy, device: torch.device, mode: str) -> _logic.LogicTables:
    return cached_on(hierarchy, device, ("logic", mode), _build_tables, mode)


def scores(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x)`` as a ``[P, N]`` matrix (pixels x channels) in the compute dtype."""
    return torch.sigmoid(x.to(_ops.compute_dtype(x.dtype)).movedim(1, -1).reshape(-1, x.shape[1]))


def asl(x, lc, hierarchy, gamma_neg, gamma_pos, clip, eps):
    """The asymmetric loss of checked logits and label channels, as vectorized torch ops."""
    cdt = _ops.compute_dtype(x.dtype)
    positive, mask = _ops.expand_targets_op(lc, hierarchy)
    return _logic.asymmetric_bce(OPS, x.to(cdt), positive.to(cdt), mask.to(cdt), (lc >= 0).sum().to(cdt),
                                 gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)


def refine(x: torch.Tensor, hierarchy: Hierarchy, steps: int, step_size: float, p: float, exclusion: str
           ) -> torch.Tensor:
    """Rule descent on checked logits (:func:`hieraloss.torch.logic_refine`): new logits, per image."""
    if x.numel() == 0 or steps == 0:
        return x.detach().clone()
    t = tables(hierarchy, x.device, exclusion)
    z = x.detach().to(_ops.compute_dtype(x.dtype)).movedim(1, -1)  # [B, *spatial, N]
    rows = []
    for b in range(z.shape[0]):
        zb = z[b].reshape(-1, x.shape[1])
        for _ in range(steps):
            zb = _logic.refine_scores_step(OPS, zb, t, p, float(step_size))
        rows.append(zb.reshape(z.shape[1:]))
    return torch.stack(rows).movedim(-1, 1).to(x.dtype)


def native_runs(backend: str, x: torch.Tensor, r: torch.Tensor) -> bool:
    if backend not in ("auto", "native") or torch.compiler.is_compiling():
        return False
    dtypes_ok = r.dtype == x.dtype  # float16 / bfloat16 run in float32, as on the torch ops
    if backend == "native" and not dtypes_ok:
        raise RuntimeError("backend='native' was asked for, but the compiled CPU kernel takes logits and rule "
                           f"logits of one dtype, got {x.dtype} and {r.dtype}")
    on_cpu = x.device.type == "cpu"
    return dtypes_ok and _native.use_for(backend, on_cpu=on_cpu, device=str(x.device)) and r.device == x.device


class _AttachGradients(torch.autograd.Function):
    """The objective's value with its gradients written in the forward pass: backward scales them in
    place and hands them over (no pass of its own for an upstream gradient of 1), once; a second
    backward through a retained graph recomputes them."""

    @staticmethod
    def forward(ctx, value, x, r, grad_x, grad_r, recompute):
        ctx.grads, ctx.recompute = (grad_x, grad_r), recompute
        ctx.dtypes = (x.dtype, None if r is None else r.dtype)
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            grads = ctx.recompute()
        factor = float(g)
        out = tuple(None if t is None else (t if factor == 1.0 else t.mul_(factor)).to(dt)
                    for t, dt in zip(grads, ctx.dtypes, strict=True))
        return None, out[0], out[1], None, None, None


def native_objective(x, r, lc, hierarchy, *, p, exclusion, easy_filter, weight, with_rules,
                     asl=_logic.ASL_DEFAULTS):
    """LogicSeg on the compiled CPU kernel: ``(total, asl, (C, D, E) or None)``. ``r`` None: the rules
    see ``x``. Gradients are written in the forward pass when an input needs one."""
    rr = x if r is None else r
    need = torch.is_grad_enabled() and (x.requires_grad or rr.requires_grad)
    cdt = _ops.compute_dtype(x.dtype)
    xc = x.detach().to(cdt).contiguous()
    rc = xc if r is None else r.detach().to(cdt).contiguous()
    want_x = need and (x.requires_grad or r is None)
    want_r = need and r is not None and r.requires_grad and with_rules and weight != 0
    B, N = x.shape[:2]
    P = math.prod(x.shape[2:])
    lcf = lc.reshape(B, P).contiguous()
    valid = int((lcf >= 0).sum())

    def run(grads: bool):
        gx = _gradient_buffer(xc) if grads and want_x else None
        gr = _gradient_buffer(rc) if grads and want_r else None
        values = _native.logicseg(
            _native.FLOAT64 if cdt == torch.float64 else _native.FLOAT32, xc.data_ptr(), (B, N, P),
            lcf.data_ptr(), valid, hierarchy, asl=asl, rules_x=rc.data_ptr() if with_rules else None,
            rules_shape=(rc.shape[0], N, math.prod(rc.shape[2:])) if with_rules else None, exclusion=exclusion,
            easy_filter=easy_filter, p=p, rule_weight=weight, grad=0 if gx is None else gx.data_ptr(),
            rules_grad=0 if gr is None else gr.data_ptr(), num_threads=torch.get_num_threads())
        return values, gx, gr

    (total_value, asl_value, rules), gx, gr = run(need)
    value = torch.tensor(total_value, dtype=cdt)
    if need:
        value = _AttachGradients.apply(value, x, rr if r is not None else None, gx, gr, lambda: run(True)[1:])
    parts = None if rules is None else tuple(torch.tensor(v, dtype=cdt) for v in rules)
    return value, torch.tensor(asl_value, dtype=cdt), parts
