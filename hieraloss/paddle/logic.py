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
    CallableTerms,
    check_asl_options,
    check_logicseg_options,
    check_refine_steps,
    compose_logicseg,
    logicseg_rule_factor,
)
from ..hierarchy import Hierarchy
from . import functional as F
from ._tables import TENSOR_TYPES, building_program, place_of
from .ops import logicseg as _lo
from .ops.device import compute_dtype

__all__ = ["asymmetric_bce_loss", "child_implies_parent_loss", "parent_implies_child_loss", "exclusion_loss",
           "logicseg_loss", "LogicSegLoss", "logic_refine"]


def _asl(x, labels, hierarchy, ignore_index, check_labels, gamma_neg, gamma_pos, clip, eps):
    lc, _ = F._checked_labels(labels, x, hierarchy, ignore_index, check_labels)
    return _lo.asl(x, lc, hierarchy, gamma_neg, gamma_pos, clip, eps)


def asymmetric_bce_loss(logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                        gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                        ignore_index: int = 255, check_labels: bool = True, upsample_logits: bool = False,
                        backend: str = "auto", check_finite: bool = False) -> paddle.Tensor:
    """The asymmetric loss on node targets (:func:`hieraloss.torch.asymmetric_bce_loss`)."""
    F._check_choice(backend, F.BACKENDS, "backend")
    x0 = F._check_logits(logits, hierarchy)
    x = F.upsample_to_labels(x0, labels, upsample_logits)
    gn, gp, c, e = check_asl_options(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)
    if check_finite:
        _check_finite_at_door(x, labels, hierarchy, ignore_index, x0, None)
    if _lo.native_runs(backend, x, x):
        lc, _ = F._checked_labels(labels, x, hierarchy, ignore_index, check_labels)
        return _lo.native_objective(x, None, lc, hierarchy, p=5.0, exclusion="siblings", easy_filter=False,
                                    weight=0.0, with_rules=False, asl=(gn, gp, c, e))[0]
    return _asl(x, labels, hierarchy, ignore_index, check_labels, gn, gp, c, e)


def _rule(logits, hierarchy, p, mode):
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=mode, step=None)
    x = F._check_logits(logits, hierarchy)
    return _lo.scores(x), _lo.tables(hierarchy, place_of(x), mode), p


def child_implies_parent_loss(logits: paddle.Tensor, hierarchy: Hierarchy, *, p: float = 5.0) -> paddle.Tensor:
    """The rule "a node implies its parent" (:func:`hieraloss.torch.child_implies_parent_loss`)."""
    s, t, p = _rule(logits, hierarchy, p, "siblings")
    return _logic.child_implies_parent(_lo.OPS, s, t, p)


def parent_implies_child_loss(logits: paddle.Tensor, hierarchy: Hierarchy, *, p: float = 5.0) -> paddle.Tensor:
    """The rule "a node implies a child" (:func:`hieraloss.torch.parent_implies_child_loss`)."""
    s, t, p = _rule(logits, hierarchy, p, "siblings")
    return _logic.parent_implies_child(_lo.OPS, s, t, p)


def exclusion_loss(logits: paddle.Tensor, hierarchy: Hierarchy, *, p: float = 5.0, exclusion: str = "siblings",
                   easy_filter: bool = False) -> paddle.Tensor:
    """The rule "siblings exclude each other" (:func:`hieraloss.torch.exclusion_loss`): one
    ``[n_g, n_g]`` matrix product per group, memory ``P * n_g``, never ``P * n_g^2``."""
    s, t, p = _rule(logits, hierarchy, p, exclusion)
    return _logic.exclusion(_lo.OPS, s, t, p, bool(easy_filter))


def _scalar(value, like):
    if isinstance(value, TENSOR_TYPES):
        return value.detach().astype(like.dtype)
    return paddle.to_tensor(value, dtype=like.dtype, place=place_of(like))


def logicseg_loss(logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                  step: float | None = None, rule_logits: paddle.Tensor | None = None,
                  rule_weight: float = LOGICSEG_RULE_WEIGHT, ramp: tuple[float, float] | None = LOGICSEG_RAMP,
                  p: float = 5.0, exclusion: str = "siblings", easy_filter: bool = False, ignore_index: int = 255,
                  return_parts: bool = False, check_labels: bool = True, upsample_logits: bool = False,
                  backend: str = "auto", check_finite: bool = False) -> Any:
    """LogicSeg's training objective (:func:`hieraloss.torch.logicseg_loss`)::

        asymmetric_bce(logits) + rule_weight * factor(step) * (C + D + E)(rule_logits)

    ``backend``: ``"auto"`` runs the compiled CPU kernel for CPU tensors when it is built (as in
    torch), else the paddle ops (``"paddle"``); ``"native"`` requires the kernel.
    """
    return _logicseg(logits, labels, hierarchy, step=step, rule_logits=rule_logits, rule_weight=rule_weight,
                     ramp=ramp, p=p, exclusion=exclusion, easy_filter=easy_filter, ignore_index=ignore_index,
                     return_parts=return_parts, check_labels=check_labels, upsample_logits=upsample_logits,
                     backend=backend, check_finite=check_finite)


def _check_finite_at_door(x, labels, hierarchy, ignore_index, logits, rule_logits):
    """``check_finite=True`` of the LogicSeg losses, as in torch: labels' type and shape, then values."""
    F._labels_at_door(labels, x, hierarchy, ignore_index)
    F._check_finite(logits)
    if rule_logits is not None:
        F._check_finite(rule_logits, "rule_logits")


def _logicseg(logits, labels, hierarchy, *, step, rule_logits, rule_weight, ramp, p, exclusion, easy_filter,
              ignore_index, return_parts, check_labels, upsample_logits, backend, factor=None, check_finite=False):
    """:func:`logicseg_loss`, with the ramp's ``factor`` given as a tensor where ``LogicSegLoss``
    computes it from its step buffer inside a static program."""
    F._check_choice(backend, F.BACKENDS, "backend")
    x0 = F._check_logits(logits, hierarchy)
    x = F.upsample_to_labels(x0, labels, upsample_logits)
    p = check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=step)
    r = x0 if rule_logits is None else F._check_logits(rule_logits, hierarchy, "rule_logits")
    if check_finite:
        _check_finite_at_door(x, labels, hierarchy, ignore_index, x0, None if rule_logits is None else r)

    def rules():
        return _logic.rule_parts(_lo.OPS, _lo.scores(r), _lo.tables(hierarchy, place_of(r), exclusion), p,
                                 bool(easy_filter))

    def fused(weight, with_rules):
        if not _lo.native_runs(backend, x, r):
            return None
        lc, _ = F._checked_labels(labels, x, hierarchy, ignore_index, check_labels)
        return _lo.native_objective(x, None if r is x else r, lc, hierarchy, p=p, exclusion=exclusion,
                                    easy_filter=bool(easy_filter), weight=weight, with_rules=with_rules)

    terms = CallableTerms(lambda: _asl(x, labels, hierarchy, ignore_index, check_labels, *_logic.ASL_DEFAULTS),
                          rules, _scalar, fused)
    factor = logicseg_rule_factor(step, ramp) if factor is None else factor
    return compose_logicseg(terms, rule_weight=rule_weight, factor=factor, return_parts=return_parts)


class LogicSegLoss(nn.Layer):
    """:func:`logicseg_loss` as a layer that keeps the training step for the rules' ramp (a
    persistable ``step`` buffer, advanced by training calls with gradients enabled and no explicit
    ``step``), as :class:`hieraloss.torch.LogicSegLoss`."""

    def __init__(self, hierarchy: Hierarchy, *, rule_weight: float = LOGICSEG_RULE_WEIGHT,
                 ramp: tuple[float, float] | None = LOGICSEG_RAMP, p: float = 5.0, exclusion: str = "siblings",
                 easy_filter: bool = False, ignore_index: int = 255, check_labels: bool = True,
                 upsample_logits: bool = False, check_finite: bool = False):
        super().__init__()
        F._check_hierarchy(hierarchy)
        check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=None)
        self.hierarchy = hierarchy
        self.options = dict(rule_weight=rule_weight, ramp=ramp, p=p, exclusion=exclusion,
                            easy_filter=bool(easy_filter), ignore_index=ignore_index,
                            check_labels=bool(check_labels), upsample_logits=bool(upsample_logits),
                            check_finite=bool(check_finite))
        self.register_buffer("step", paddle.zeros([], dtype="int64"), persistable=True)

    def forward(self, logits, labels, rule_logits=None, *, step=None, return_parts=False):
        use_step, factor = step, None
        if step is None and self.options["ramp"] is not None:
            if building_program():  # no host read in a program: the ramp from the buffer, in it
                start, end = (float(v) for v in self.options["ramp"])
                t = self.step.astype("float64")
                factor = (paddle.clip((t - start) / (end - start), 0.0, 1.0) if end > start
                          else (t >= start).astype("float64"))
                factor = factor.astype(compute_dtype(logits.dtype))
            else:
                use_step = int(self.step)
        out = _logicseg(logits, labels, self.hierarchy, step=use_step, rule_logits=rule_logits,
                        return_parts=return_parts, backend="auto", factor=factor, **self.options)
        if step is None and self.training and paddle.is_grad_enabled():
            if building_program():
                paddle.assign(self.step + 1, output=self.step)  # the program writes the buffer back
            else:
                self.step.set_value(self.step + 1)
        return out


def logic_refine(logits: paddle.Tensor, hierarchy: Hierarchy, *, steps: int = LOGIC_STEPS,
                 step_size: float = LOGIC_STEP_SIZE, p: float = 5.0, exclusion: str = "siblings") -> paddle.Tensor:
    """Logic-guided reasoning by rule descent (:func:`hieraloss.torch.logic_refine`)."""
    x = F._check_logits(logits, hierarchy)
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=exclusion, step=None)
    return _lo.refine(x, hierarchy, check_refine_steps(steps), float(step_size), p, exclusion)
