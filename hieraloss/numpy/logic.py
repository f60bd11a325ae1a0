"""LogicSeg (Li et al., ICCV 2023) in numpy (forward only): the reference for torch and paddle.

The math is written once in :mod:`hieraloss.core.logic` and composed once in
:mod:`hieraloss.core.objective`; this module checks the inputs and hands numpy arrays to them.
See ``docs/concepts/logicseg.md`` for the rules, the fuzzy-logic choices and the p-mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
from ..core.plan import plan_for
from ..hierarchy import Hierarchy
from .losses import check_finite_values, check_labels, check_logits, compute_dtype, targets_and_mask

__all__ = ["asymmetric_bce_loss", "child_implies_parent_loss", "parent_implies_child_loss", "exclusion_loss",
           "logicseg_loss", "logic_refine"]


class NumpyOps:
    """:class:`hieraloss.core.logic.ArrayOps` over numpy arrays."""

    @staticmethod
    def sigmoid(x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|

    log = staticmethod(np.log)
    power = staticmethod(np.power)

    @staticmethod
    def clamp(x, lo=None, hi=None):
        return np.clip(x, lo, hi)

    @staticmethod
    def where(cond, a, b):
        return np.where(cond, a, b)

    @staticmethod
    def cols(a, index):
        return a[:, index]

    @staticmethod
    def sum0(a):
        return a.sum(axis=0)

    @staticmethod
    def total(a):
        return np.asarray(a).sum()

    @staticmethod
    def gram(a):
        return a.T @ a

    @staticmethod
    def matmul(a, b):
        return a @ b

    @staticmethod
    def add_cols(a, index, values):
        out = a.copy()
        np.add.at(out, (slice(None), index), values)
        return out

    @staticmethod
    def sum1(a):
        return a.sum(axis=1)

    @staticmethod
    def max_all(a):
        return a.max()

    @staticmethod
    def row_count(cond):
        return cond.sum(axis=1)

    @staticmethod
    def as_float(cond, like):
        return cond.astype(like.dtype)


OPS = NumpyOps()


def _scores(x: np.ndarray) -> np.ndarray:
    """``sigmoid(x)`` as a ``[P, N]`` matrix (pixels x channels) in the compute dtype."""
    n = x.shape[1]
    return OPS.sigmoid(np.moveaxis(x.astype(compute_dtype(x.dtype), copy=False), 1, -1).reshape(-1, n))


def _rule_scores(logits: Any, hierarchy: Hierarchy, name: str = "logits") -> np.ndarray:
    return _scores(check_logits(logits, hierarchy, name))


def _asl(x, labels, hierarchy, ignore_index, gamma_neg, gamma_pos, clip, eps):
    ch = check_labels(labels, (x.shape[0], *x.shape[2:]), hierarchy, ignore_index)
    positive, mask = targets_and_mask(ch, hierarchy)
    cdt = compute_dtype(x.dtype)
    return cdt.type(_logic.asymmetric_bce(
        OPS, x.astype(cdt, copy=False), positive.astype(cdt), mask.astype(cdt), cdt.type(np.count_nonzero(ch >= 0)),
        gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps))


def _check_finite_at_door(x, labels, hierarchy, ignore_index, rule_logits):
    """``check_finite=True`` of the LogicSeg losses, as in torch: the labels first, then the values."""
    check_labels(labels, (x.shape[0], *x.shape[2:]), hierarchy, ignore_index)
    check_finite_values(x)
    if rule_logits is not None:
        check_finite_values(rule_logits, "rule_logits")


def asymmetric_bce_loss(logits: Any, labels: Any, hierarchy: Hierarchy, *, gamma_neg: float = 4.0,
                        gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                        ignore_index: int = 255, check_finite: bool = False) -> np.floating:
    """The asymmetric loss (Ridnik et al., ICCV 2021) on the multi-hot node targets, LogicSeg's base
    term. With ``s = sigmoid(x)`` and ``s_neg = min(1 - s + clip, 1)``, per (pixel, node)::

        positive (v on the label's path):  -(1 - s)^gamma_pos * log(max(s, eps))
        negative:                          -(1 - s_neg)^gamma_neg * log(max(s_neg, eps))

    summed over the nodes and averaged over the valid pixels (an exact 0 when there are none). A
    partial label's strict descendants are unknown and do not count. ``check_finite=True`` raises a
    ``ValueError`` for a non-finite logit."""
    x = check_logits(logits, hierarchy)
    gn, gp, c, e = check_asl_options(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)
    if check_finite:
        _check_finite_at_door(x, labels, hierarchy, ignore_index, None)
    return _asl(x, labels, hierarchy, ignore_index, gn, gp, c, e)


def child_implies_parent_loss(logits: Any, hierarchy: Hierarchy, *, p: float = 5.0) -> np.floating:
    """LogicSeg's rule "a node implies its parent": the mean over the nodes v with a parent of the
    p-mean over all pixels of ``s_v (1 - s_parent(v))``."""
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion="siblings", step=None)
    s = _rule_scores(logits, hierarchy)
    return s.dtype.type(_logic.child_implies_parent(OPS, s, _logic.logic_tables(plan_for(hierarchy), "siblings"), p))


def parent_implies_child_loss(logits: Any, hierarchy: Hierarchy, *, p: float = 5.0) -> np.floating:
    """LogicSeg's rule "a node implies one of its children": the mean over the internal nodes v of
    the p-mean over all pixels of ``s_v (1 - max_{c in children(v)} s_c)``."""
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion="siblings", step=None)
    s = _rule_scores(logits, hierarchy)
    return s.dtype.type(_logic.parent_implies_child(OPS, s, _logic.logic_tables(plan_for(hierarchy), "siblings"), p))


def exclusion_loss(logits: Any, hierarchy: Hierarchy, *, p: float = 5.0, exclusion: str = "siblings",
                   easy_filter: bool = False) -> np.floating:
    """LogicSeg's rule "siblings exclude each other": for every group (``"siblings"``: the children
    of one node, the paper's meaning; ``"level"``: all nodes of one depth, the release's form), the
    p-mean over the pixels of ``s_a s_b`` for each ordered pair a != b, summed and divided by
    ``sum_g n_g^2``. ``easy_filter=True`` drops, per group, the pixels where exactly one score is
    above 0.7 and all others below 0.3 (the release). One ``[n_g, n_g]`` matrix product per group;
    memory ``P * n_g`` for ``P`` pixels, never ``P * n_g^2``."""
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=exclusion, step=None)
    s = _rule_scores(logits, hierarchy)
    t = _logic.logic_tables(plan_for(hierarchy), exclusion)
    return s.dtype.type(_logic.exclusion(OPS, s, t, p, bool(easy_filter)))


def _scalar(value, like):
    return np.asarray(like).dtype.type(value)


def logicseg_loss(logits: Any, labels: Any, hierarchy: Hierarchy, *, step: float | None = None,
                  rule_logits: Any = None, rule_weight: float = LOGICSEG_RULE_WEIGHT,
                  ramp: tuple[float, float] | None = LOGICSEG_RAMP, p: float = 5.0, exclusion: str = "siblings",
                  easy_filter: bool = False, ignore_index: int = 255, return_parts: bool = False,
                  check_finite: bool = False) -> Any:
    """LogicSeg's training objective::

        asymmetric_bce(logits) + rule_weight * factor(step) * (C + D + E)(rule_logits)

    ``C``, ``D``, ``E``: :func:`child_implies_parent_loss`, :func:`parent_implies_child_loss` and
    :func:`exclusion_loss` (``exclusion``, ``easy_filter``, ``p``) on ``rule_logits`` (default
    ``logits``; the release gives the rules the head's logits before upsampling). ``factor`` ramps
    linearly from 0 at ``ramp[0]`` to 1 at ``ramp[1]``; ``step=None`` or ``ramp=None`` is 1.
    ``return_parts=True`` also returns the unweighted ``asl``, ``child_implies_parent``,
    ``parent_implies_child``, ``exclusion`` and ``rule_factor``. ``check_finite=True`` raises a
    ``ValueError`` for a non-finite value in ``logits`` or ``rule_logits``."""
    x = check_logits(logits, hierarchy)
    p = check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=step)
    r = x if rule_logits is None else check_logits(rule_logits, hierarchy, "rule_logits")
    if check_finite:
        _check_finite_at_door(x, labels, hierarchy, ignore_index, None if rule_logits is None else r)
    t = _logic.logic_tables(plan_for(hierarchy), exclusion)

    def rules():
        return _logic.rule_parts(OPS, _scores(r), t, p, bool(easy_filter))

    terms = CallableTerms(lambda: _asl(x, labels, hierarchy, ignore_index, *_logic.ASL_DEFAULTS), rules, _scalar)
    return compose_logicseg(terms, rule_weight=rule_weight, factor=logicseg_rule_factor(step, ramp),
                            return_parts=return_parts)


def logic_refine(logits: Any, hierarchy: Hierarchy, *, steps: int = LOGIC_STEPS, step_size: float = LOGIC_STEP_SIZE,
                 p: float = 5.0, exclusion: str = "siblings") -> np.ndarray:
    """Logic-guided reasoning at test time by rule descent (:func:`hieraloss.torch.logic_refine`):
    ``steps`` steps of gradient descent on each image's node logits against the three rules."""
    x = check_logits(logits, hierarchy)
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=exclusion, step=None)
    steps = check_refine_steps(steps)
    t = _logic.logic_tables(plan_for(hierarchy), exclusion)
    n = x.shape[1]
    out = np.moveaxis(x.astype(compute_dtype(x.dtype)), 1, -1).copy()  # [B, *spatial, N]
    if out.size:
        for b in range(out.shape[0]):
            z = out[b].reshape(-1, n)
            for _ in range(steps):
                z = _logic.refine_scores_step(OPS, z, t, p, float(step_size))
            out[b] = z.reshape(out[b].shape)
    return np.moveaxis(out, -1, 1).astype(x.dtype, copy=False)
