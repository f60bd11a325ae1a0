"""LogicSeg (Li et al., ICCV 2023) in paddle: the same names, arguments and values as
:mod:`hieraloss.torch.logic` (whose docstrings give the math), over :class:`PaddleOps`.

The math is written once in :mod:`hieraloss.core.logic` and composed once in
:mod:`hieraloss.core.objective`; paddle's autograd differentiates it.
"""

from __future__ import annotations

from typing import Any

import paddle
from paddle import nn

from ..core import logic as _logic
from ..core.objective import (
    LOGIC_STEP_SIZE,
    LOGIC_STEPS,
    LOGICSEG_RAMP,
    LOGICSEG_RULE_WEIGHT,
    check_asl_options,
    check_logicseg_options,
    check_refine_steps,
    compose_logicseg,
    logicseg_rule_factor,
)
from ..core.plan import plan_for
from ..hierarchy import Hierarchy
from . import functional as F
from ._ops import compute_dtype, expand_targets_op
from ._tables import tables_for

__all__ = ["asymmetric_bce_loss", "child_implies_parent_loss", "parent_implies_child_loss", "exclusion_loss",
           "logicseg_loss", "LogicSegLoss", "logic_refine"]


class PaddleOps:
    """:class:`hieraloss.core.logic.ArrayOps` over paddle tensors."""

    sigmoid = staticmethod(paddle.nn.functional.sigmoid)
    log = staticmethod(paddle.log)

    @staticmethod
    def power(a, exponent):
        return paddle.pow(a, paddle.to_tensor(exponent, dtype=a.dtype, place=a.place))  # a float is cast to float32

    @staticmethod
    def clamp(x, lo=None, hi=None):
        return paddle.clip(x, min=lo, max=hi)

    @staticmethod
    def where(cond, a, b):
        return paddle.where(cond, a, b if isinstance(b, paddle.Tensor) else paddle.full_like(a, b))

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


def _tables(hierarchy: Hierarchy, place: Any, mode: str) -> _logic.LogicTables:
    tab = tables_for(hierarchy, place)
    t = _logic.logic_tables(plan_for(hierarchy), mode)

    def dev(name, i, a):
        return tab.get(("logic", mode, name, i), lambda: a)

    return t._replace(edge_child=dev("edge_child", 0, t.edge_child), edge_parent=dev("edge_parent", 0, t.edge_parent),
                      internal=dev("internal", 0, t.internal),
                      child_ranks=tuple(dev("rank", i, r) for i, r in enumerate(t.child_ranks)),
                      groups=tuple(dev("group", i, g) for i, g in enumerate(t.groups)),
                      off_diagonal=tuple(dev("off_diagonal", i, m) for i, m in enumerate(t.off_diagonal)))


def _scores(x: paddle.Tensor) -> paddle.Tensor:
    n = x.shape[1]
    perm = [0, *range(2, x.ndim), 1]
    return paddle.nn.functional.sigmoid(x.astype(compute_dtype(x.dtype)).transpose(perm).reshape([-1, n]))


def _asl(x, labels, hierarchy, ignore_index, check_labels, gamma_neg, gamma_pos, clip, eps):
    labels, ignore_index = F._labels_at_door(labels, x, hierarchy, ignore_index)
    lc, _ = F._label_channels(labels, hierarchy, ignore_index, check_labels)
    cdt = compute_dtype(x.dtype)
    positive, mask = expand_targets_op(lc, hierarchy)
    valid = (lc >= 0).astype(cdt).sum()
    return _logic.asymmetric_bce(OPS, x.astype(cdt), positive.astype(cdt), mask.astype(cdt), valid,
                                 gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)


def asymmetric_bce_loss(logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                        gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                        ignore_index: int = 255, check_labels: bool = True,
                        upsample_logits: bool = False) -> paddle.Tensor:
    """The asymmetric loss on node targets (:func:`hieraloss.torch.asymmetric_bce_loss`)."""
    x = F.upsample_to_labels(F._check_logits(logits, hierarchy), labels, upsample_logits)
    gn, gp, c, e = check_asl_options(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)
    return _asl(x, labels, hierarchy, ignore_index, check_labels, gn, gp, c, e)


def _rule(logits, hierarchy, p, mode):
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=mode, step=None)
    x = F._check_logits(logits, hierarchy)
    return _scores(x), _tables(hierarchy, x.place, mode), p


def child_implies_parent_loss(logits: paddle.Tensor, hierarchy: Hierarchy, *, p: float = 5.0) -> paddle.Tensor:
    """The rule "a node implies its parent" (:func:`hieraloss.torch.child_implies_parent_loss`)."""
    s, t, p = _rule(logits, hierarchy, p, "siblings")
    return _logic.child_implies_parent(OPS, s, t, p)


def parent_implies_child_loss(logits: paddle.Tensor, hierarchy: Hierarchy, *, p: float = 5.0) -> paddle.Tensor:
    """The rule "a node implies a child" (:func:`hieraloss.torch.parent_implies_child_loss`)."""
    s, t, p = _rule(logits, hierarchy, p, "siblings")
    return _logic.parent_implies_child(OPS, s, t, p)


def exclusion_loss(logits: paddle.Tensor, hierarchy: Hierarchy, *, p: float = 5.0, exclusion: str = "siblings",
                   easy_filter: bool = False) -> paddle.Tensor:
    """The rule "siblings exclude each other" (:func:`hieraloss.torch.exclusion_loss`): one
    ``[n_g, n_g]`` matrix product per group, memory ``P * n_g``, never ``P * n_g^2``."""
    s, t, p = _rule(logits, hierarchy, p, exclusion)
    return _logic.exclusion(OPS, s, t, p, bool(easy_filter))


class _Terms:
    def __init__(self, asl, rules):
        self.asymmetric_bce, self.rules = asl, rules

    @staticmethod
    def detach(value):
        return value.detach()

    @staticmethod
    def scalar(value, like):
        if isinstance(value, paddle.Tensor):
            return value.detach().astype(like.dtype)
        return paddle.to_tensor(value, dtype=like.dtype, place=like.place)


def logicseg_loss(logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                  step: float | None = None, rule_logits: paddle.Tensor | None = None,
                  rule_weight: float = LOGICSEG_RULE_WEIGHT, ramp: tuple[float, float] | None = LOGICSEG_RAMP,
                  p: float = 5.0, exclusion: str = "siblings", easy_filter: bool = False, ignore_index: int = 255,
                  return_parts: bool = False, check_labels: bool = True, upsample_logits: bool = False) -> Any:
    """LogicSeg's training objective (:func:`hieraloss.torch.logicseg_loss`)::

        asymmetric_bce(logits) + rule_weight * factor(step) * (C + D + E)(rule_logits)
    """
    x0 = F._check_logits(logits, hierarchy)
    x = F.upsample_to_labels(x0, labels, upsample_logits)
    p = check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=step)
    r = x0 if rule_logits is None else F._check_logits(rule_logits, hierarchy, "rule_logits")

    def rules():
        s, t = _scores(r), _tables(hierarchy, r.place, exclusion)
        return (_logic.child_implies_parent(OPS, s, t, p), _logic.parent_implies_child(OPS, s, t, p),
                _logic.exclusion(OPS, s, t, p, bool(easy_filter)))

    terms = _Terms(lambda: _asl(x, labels, hierarchy, ignore_index, check_labels, 4.0, 1.0, 0.05, 1e-8), rules)
    return compose_logicseg(terms, rule_weight=rule_weight, factor=logicseg_rule_factor(step, ramp),
                            return_parts=return_parts)


class LogicSegLoss(nn.Layer):
    """:func:`logicseg_loss` as a layer that keeps the training step for the rules' ramp (a
    persistable ``step`` buffer, advanced by training calls with gradients enabled and no explicit
    ``step``), as :class:`hieraloss.torch.LogicSegLoss`."""

    def __init__(self, hierarchy: Hierarchy, *, rule_weight: float = LOGICSEG_RULE_WEIGHT,
                 ramp: tuple[float, float] | None = LOGICSEG_RAMP, p: float = 5.0, exclusion: str = "siblings",
                 easy_filter: bool = False, ignore_index: int = 255, check_labels: bool = True,
                 upsample_logits: bool = False):
        super().__init__()
        F._check_hierarchy(hierarchy)
        check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=None)
        self.hierarchy = hierarchy
        self.options = dict(rule_weight=rule_weight, ramp=ramp, p=p, exclusion=exclusion,
                            easy_filter=bool(easy_filter), ignore_index=ignore_index,
                            check_labels=bool(check_labels), upsample_logits=bool(upsample_logits))
        self.register_buffer("step", paddle.zeros([], dtype="int64"), persistable=True)

    def forward(self, logits, labels, rule_logits=None, *, step=None, return_parts=False):
        use_step = step
        if step is None and self.options["ramp"] is not None:
            use_step = int(self.step)
        out = logicseg_loss(logits, labels, self.hierarchy, step=use_step, rule_logits=rule_logits,
                            return_parts=return_parts, **self.options)
        if step is None and self.training and paddle.is_grad_enabled():
            self.step.set_value(self.step + 1)
        return out


def logic_refine(logits: paddle.Tensor, hierarchy: Hierarchy, *, steps: int = LOGIC_STEPS,
                 step_size: float = LOGIC_STEP_SIZE, p: float = 5.0, exclusion: str = "siblings") -> paddle.Tensor:
    """Logic-guided reasoning by rule descent (:func:`hieraloss.torch.logic_refine`)."""
    x = F._check_logits(logits, hierarchy)
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=exclusion, step=None)
    steps = check_refine_steps(steps)
    if x.size == 0 or steps == 0:
        return x.detach().clone()
    t = _tables(hierarchy, x.place, exclusion)
    n = x.shape[1]
    z = x.detach().astype(compute_dtype(x.dtype)).transpose([0, *range(2, x.ndim), 1])  # [B, *spatial, N]
    rows = []
    for b in range(z.shape[0]):
        zb = z[b].reshape([-1, n])
        for _ in range(steps):
            zb = _logic.refine_scores_step(OPS, zb, t, p, float(step_size))
        rows.append(zb.reshape(z.shape[1:]))
    return paddle.stack(rows).transpose([0, x.ndim - 1, *range(1, x.ndim - 1)]).astype(x.dtype)
