"""LogicSeg's operations in torch below the door (:mod:`hieraloss.torch.logic` checks the inputs):
the array interface of :mod:`hieraloss.core.logic` over tensors, the rule tables on a device, the
compiled CPU kernel's glue and the rule descent of logic-guided decoding."""

from __future__ import annotations

import math

import torch

from ... import _native
from ...core import logic as _logic
from ...core.plan import plan_for
from ...hierarchy import Hierarchy
from .._tables import cached_on
from .device import compute_dtype
from .native import _gradient_buffer
from .tree_min import expand_targets_op


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
    return torch.sigmoid(x.to(compute_dtype(x.dtype)).movedim(1, -1).reshape(-1, x.shape[1]))


def asl(x, lc, hierarchy, gamma_neg, gamma_pos, clip, eps):
    """The asymmetric loss of checked logits and label channels, as vectorized torch ops."""
    cdt = compute_dtype(x.dtype)
    positive, mask = expand_targets_op(lc, hierarchy)
    return _logic.asymmetric_bce(OPS, x.to(cdt), positive.to(cdt), mask.to(cdt), (lc >= 0).sum().to(cdt),
                                 gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)


def refine(x: torch.Tensor, hierarchy: Hierarchy, steps: int, step_size: float, p: float, exclusion: str
           ) -> torch.Tensor:
    """Rule descent on checked logits (:func:`hieraloss.torch.logic_refine`): new logits, per image."""
    if x.numel() == 0 or steps == 0:
        return x.detach().clone()
    t = tables(hierarchy, x.device, exclusion)
    z = x.detach().to(compute_dtype(x.dtype)).movedim(1, -1)  # [B, *spatial, N]
    rows = []
    for b in range(z.shape[0]):
        zb = z[b].reshape(-1, x.shape[1])
        for _ in range(steps):
            zb = _logic.refine_scores_step(OPS, zb, t, p, float(step_size))
        rows.append(zb.reshape(z.shape[1:]))
    return torch.stack(rows).movedim(-1, 1).to(x.dtype)


def native_runs(backend: str, x: torch.Tensor, r: torch.Tensor) -> bool:
    if backend not in ("auto", "native"):
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


def _kernel_pass(xc, rc, lcf, hierarchy, *, p, exclusion, easy_filter, weight, with_rules, asl, want_x, want_r):
    """One call of the kernel on contiguous compute-dtype ``xc [B, N, P']`` and rule logits ``rc``
    (None: ``xc`` itself), label channels ``lcf [B, P]``: ``((total, asl, rules or None), grad_x,
    grad_r)``, the gradients (for an upstream gradient of 1) only where wanted."""
    B, N = xc.shape[:2]
    P = math.prod(xc.shape[2:])
    r = xc if rc is None else rc
    gx = _gradient_buffer(xc) if want_x else None
    gr = _gradient_buffer(rc) if want_r and rc is not None else None
    values = _native.logicseg(
        _native.FLOAT64 if xc.dtype == torch.float64 else _native.FLOAT32, xc.data_ptr(), (B, N, P),
        lcf.data_ptr(), int((lcf >= 0).sum()), hierarchy, asl=asl, rules_x=r.data_ptr() if with_rules else None,
        rules_shape=(r.shape[0], N, math.prod(r.shape[2:])) if with_rules else None, exclusion=exclusion,
        easy_filter=easy_filter, p=p, rule_weight=weight, grad=0 if gx is None else gx.data_ptr(),
        rules_grad=0 if gr is None else gr.data_ptr(), num_threads=torch.get_num_threads())
    return values, gx, gr


def native_objective(x, r, lc, hierarchy, *, p, exclusion, easy_filter, weight, with_rules,
                     asl=_logic.ASL_DEFAULTS):
    """LogicSeg on the compiled CPU kernel: ``(total, asl, (C, D, E) or None)``. ``r`` None: the rules
    see ``x``. Gradients are written in the forward pass when an input needs one. Under
    ``torch.compile`` the kernel runs as the custom op ``hieraloss::native_logicseg``."""
    rr = x if r is None else r
    need = torch.is_grad_enabled() and (x.requires_grad or rr.requires_grad)
    cdt = compute_dtype(x.dtype)
    want_x = need and (x.requires_grad or r is None)
    want_r = need and r is not None and r.requires_grad and with_rules and weight != 0
    B = x.shape[0]
    lcf = lc.reshape(B, math.prod(x.shape[2:])).contiguous()
    options = dict(p=float(p), exclusion=exclusion, easy_filter=bool(easy_filter), weight=float(weight),
                   with_rules=bool(with_rules))
    if torch.compiler.is_compiling():
        xc = x.to(cdt).contiguous()  # not detached: the op's autograd hands the gradient back through the cast
        rc = None if r is None else r.to(cdt).contiguous()
        total, asl_value, rules, _, _ = native_logicseg_op(xc, rc, lcf, hierarchy.fingerprint, asl=list(asl),
                                                           want_x=want_x, want_r=want_r, **options)
        return total, asl_value, (tuple(rules.unbind()) if with_rules else None)
    xc = x.detach().to(cdt).contiguous()
    rc = None if r is None else r.detach().to(cdt).contiguous()

    def run(grads: bool):
        return _kernel_pass(xc, rc, lcf, hierarchy, asl=asl, want_x=grads and want_x, want_r=grads and want_r,
                            **options)

    (total_value, asl_value, rules), gx, gr = run(need)
    value = torch.tensor(total_value, dtype=cdt)
    if need:
        value = _AttachGradients.apply(value, x, rr if r is not None else None, gx, gr, lambda: run(True)[1:])
    parts = None if rules is None else tuple(torch.tensor(v, dtype=cdt) for v in rules)
    return value, torch.tensor(asl_value, dtype=cdt), parts


# ---------------------------------------------------------------------------- the kernel as a custom op
_EMPTY = (0,)


@torch.library.custom_op("hieraloss::native_logicseg", mutates_args=())
def native_logicseg_op(x: torch.Tensor, r: torch.Tensor | None, lc: torch.Tensor, key: str, *, p: float,
                       exclusion: str, easy_filter: bool, weight: float, with_rules: bool, asl: list[float],
                       want_x: bool, want_r: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, asl, rules [3] or empty, grad_x, grad_r)`` of contiguous compute-dtype inputs (see
    :func:`_kernel_pass`); a gradient not wanted is an empty tensor. ``key``: the hierarchy's
    fingerprint."""
    (total, asl_value, rules), gx, gr = _kernel_pass(
        x, r, lc, Hierarchy.by_fingerprint(key), p=p, exclusion=exclusion, easy_filter=easy_filter, weight=weight,
        with_rules=with_rules, asl=tuple(asl), want_x=want_x, want_r=want_r)
    scalar = dict(dtype=x.dtype)
    return (torch.tensor(total, **scalar), torch.tensor(asl_value, **scalar),
            torch.tensor(rules if rules is not None else [], **scalar),
            x.new_empty(_EMPTY) if gx is None else gx, x.new_empty(_EMPTY) if gr is None else gr)


@native_logicseg_op.register_fake
def _(x, r, lc, key, *, p, exclusion, easy_filter, weight, with_rules, asl, want_x, want_r):
    return (x.new_empty(()), x.new_empty(()), x.new_empty((3,) if with_rules else _EMPTY),
            torch.empty_like(x) if want_x else x.new_empty(_EMPTY),
            torch.empty_like(r) if want_r and r is not None else x.new_empty(_EMPTY))


def _logicseg_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(output[3], output[4])


def _logicseg_backward(ctx, grad_total, _grad_asl, _grad_rules, _grad_gx, _grad_gr):
    gx, gr = ctx.saved_tensors

    def scaled(g):
        return None if g.dim() == 1 and g.numel() == 0 else g * grad_total.to(g.dtype)

    return scaled(gx), scaled(gr), None, None


native_logicseg_op.register_autograd(_logicseg_backward, setup_context=_logicseg_setup)
