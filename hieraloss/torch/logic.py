"""LogicSeg (Li et al., ICCV 2023) in torch: the functional form, the module, and logic-guided decoding.

The math is written once in :mod:`hieraloss.core.logic` over :class:`TorchOps`, and composed once in
:mod:`hieraloss.core.objective`; autograd differentiates it. See ``docs/concepts/logicseg.md``.
Everything runs as vectorized torch ops on any device; exclusion is one matrix product per group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
from .ops import logicseg as _lo
from .ops.device import compute_dtype

__all__ = ["asymmetric_bce_loss", "child_implies_parent_loss", "parent_implies_child_loss", "exclusion_loss",
           "logicseg_loss", "LogicSegLoss", "logic_refine"]


def _asl(x, labels, hierarchy, ignore_index, check_labels, gamma_neg, gamma_pos, clip, eps):
    lc, _ = F._checked_labels(labels, x, hierarchy, ignore_index, check_labels)
    return _lo.asl(x, lc, hierarchy, gamma_neg, gamma_pos, clip, eps)


def asymmetric_bce_loss(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
                        gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                        ignore_index: int = 255, check_labels: bool = True, upsample_logits: bool = False,
                        backend: str = "auto", check_finite: bool = False) -> torch.Tensor:
    """The asymmetric loss (Ridnik et al., ICCV 2021) on the multi-hot node targets, LogicSeg's base
    term. With ``s = sigmoid(x)`` and ``s_neg = min(1 - s + clip, 1)``, per (pixel, node)::

        positive (v on the label's path):  -(1 - s)^gamma_pos * log(max(s, eps))
        negative:                          -(1 - s_neg)^gamma_neg * log(max(s_neg, eps))

    (the focusing weights are differentiated), summed over the nodes and averaged over the valid
    pixels (an exact 0 when there are none). A partial label's strict descendants do not count.
    ``check_labels``, ``check_finite`` and ``upsample_logits`` as for
    :func:`hieraloss.torch.tree_min_loss`; ``backend`` as for :func:`logicseg_loss`."""
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


def _rule(logits, hierarchy, p, mode, name):
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=mode, step=None)
    x = F._check_logits(logits, hierarchy, name)
    return _lo.scores(x), _lo.tables(hierarchy, x.device, mode), p


def child_implies_parent_loss(logits: torch.Tensor, hierarchy: Hierarchy, *, p: float = 5.0) -> torch.Tensor:
    """LogicSeg's rule "a node implies its parent": the mean over the nodes v with a parent of the
    p-mean over all pixels ``(mean_i viol_i^p)^(1/p)`` of ``s_v (1 - s_parent(v))``, ``s = sigmoid``.
    Uses no labels. A clause whose violations are all 0 is 0 with gradient 0."""
    s, t, p = _rule(logits, hierarchy, p, "siblings", "logits")
    return _logic.child_implies_parent(_lo.OPS, s, t, p)


def parent_implies_child_loss(logits: torch.Tensor, hierarchy: Hierarchy, *, p: float = 5.0) -> torch.Tensor:
    """LogicSeg's rule "a node implies one of its children": the mean over the internal nodes v of
    the p-mean over all pixels of ``s_v (1 - max_{c in children(v)} s_c)``. Uses no labels."""
    s, t, p = _rule(logits, hierarchy, p, "siblings", "logits")
    return _logic.parent_implies_child(_lo.OPS, s, t, p)


def exclusion_loss(logits: torch.Tensor, hierarchy: Hierarchy, *, p: float = 5.0, exclusion: str = "siblings",
                   easy_filter: bool = False) -> torch.Tensor:
    """LogicSeg's rule "siblings exclude each other": for every group (``"siblings"``: the children
    of one node, the paper's meaning; ``"level"``: all nodes of one depth, the release's form), the
    p-mean over the pixels of ``s_a s_b`` for each ordered pair a != b, summed and divided by
    ``sum_g n_g^2``. ``easy_filter=True`` drops, per group, the pixels where exactly one score is
    above 0.7 and all others below 0.3 (the release).

    Memory: one ``[P, n_g]`` matrix of ``s^p`` per group and its ``[n_g, n_g]`` product with itself
    (``sum_i s_a^p s_b^p`` for every pair at once), never ``[P, n_g, n_g]``."""
    s, t, p = _rule(logits, hierarchy, p, exclusion, "logits")
    return _logic.exclusion(_lo.OPS, s, t, p, bool(easy_filter))


def _scalar(value, like):
    return value.detach().to(like.dtype) if isinstance(value, torch.Tensor) else like.new_full((), value)


def logicseg_loss(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, step: float | None = None,
                  rule_logits: torch.Tensor | None = None, rule_weight: float = LOGICSEG_RULE_WEIGHT,
                  ramp: tuple[float, float] | None = LOGICSEG_RAMP, p: float = 5.0, exclusion: str = "siblings",
                  easy_filter: bool = False, ignore_index: int = 255, return_parts: bool = False,
                  check_labels: bool = True, upsample_logits: bool = False, backend: str = "auto",
                  check_finite: bool = False) -> Any:
    """LogicSeg's training objective::

        asymmetric_bce(logits) + rule_weight * factor(step) * (C + D + E)(rule_logits)

    ``C``, ``D``, ``E``: :func:`child_implies_parent_loss`, :func:`parent_implies_child_loss` and
    :func:`exclusion_loss` (``exclusion``, ``easy_filter``, ``p``) on ``rule_logits``, default the
    ``logits`` as given (the release gives the rules the head's logits before upsampling: pass
    low-resolution logits with ``upsample_logits=True`` to get exactly that). ``factor`` ramps
    linearly from 0 at ``ramp[0]`` to 1 at ``ramp[1]`` (the release: steps 20k to 50k);
    ``step=None`` or ``ramp=None`` gives 1. A rule weight of 0 skips the rules.

    ``return_parts=True`` also returns the unweighted, detached ``asl``, ``child_implies_parent``,
    ``parent_implies_child``, ``exclusion`` and ``rule_factor``. ``check_labels`` as for
    :func:`hieraloss.torch.tree_min_loss`; ``check_finite=True`` raises a ``ValueError`` for a
    non-finite value in ``logits`` or ``rule_logits`` (one device sync each).

    ``backend``: ``"auto"`` runs the compiled CPU kernel for CPU tensors when it is built (logits and
    rule logits of one dtype; float16/bfloat16 computed in float32; two passes over the logits: the
    rules' sums, then the loss and the whole gradient, written in the forward pass and scaled in the
    backward), else the vectorized torch ops (``"torch"``; every device, and under
    ``torch.compile``); ``"native"`` requires the kernel. ``"triton"`` runs the torch ops (there is
    no Triton kernel for LogicSeg)."""
    return _logicseg(logits, labels, hierarchy, step=step, rule_logits=rule_logits, rule_weight=rule_weight,
                     ramp=ramp, p=p, exclusion=exclusion, easy_filter=easy_filter, ignore_index=ignore_index,
                     return_parts=return_parts, check_labels=check_labels, upsample_logits=upsample_logits,
                     backend=backend, factor=None, check_finite=check_finite)


def _check_finite_at_door(x, labels, hierarchy, ignore_index, logits, rule_logits):
    """``check_finite=True`` of the LogicSeg losses: the labels' type and shape first (as every
    loss's door), then ``logits`` and ``rule_logits`` (None: none given)."""
    F._labels_at_door(labels, x, hierarchy, ignore_index)
    F._check_finite(logits)
    if rule_logits is not None:
        F._check_finite(rule_logits, "rule_logits")


def _logicseg(logits, labels, hierarchy, *, step, rule_logits, rule_weight, ramp, p, exclusion, easy_filter,
              ignore_index, return_parts, check_labels, upsample_logits, backend, factor, check_finite=False):
    """:func:`logicseg_loss`, with ``factor`` the ramp's value when the caller computed it (a 0-d
    tensor under ``torch.compile``, from :class:`LogicSegLoss`'s step buffer), else None."""
    F._check_choice(backend, F.BACKENDS, "backend")
    x0 = F._check_logits(logits, hierarchy)
    x = F.upsample_to_labels(x0, labels, upsample_logits)
    p = check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=step)
    r = x0 if rule_logits is None else F._check_logits(rule_logits, hierarchy, "rule_logits")
    if r.device != x.device:
        raise ValueError(f"rule_logits are on {r.device} but the logits are on {x.device}")
    if check_finite:
        _check_finite_at_door(x, labels, hierarchy, ignore_index, x0, None if rule_logits is None else r)

    def rules():
        return _logic.rule_parts(_lo.OPS, _lo.scores(r), _lo.tables(hierarchy, r.device, exclusion), p,
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


class LogicSegLoss(nn.Module):
    """:func:`logicseg_loss` as a module that keeps the training step for the rules' ramp.

    ``step`` is a buffer (saved in ``state_dict``): a call in training mode with gradients enabled
    and no explicit ``step`` uses it and then advances it by one; evaluation calls never advance it.
    Pass ``step=trainer.global_step`` to follow a trainer's optimizer steps instead. Under
    ``torch.compile`` the ramp is computed from the buffer on the device (no host read).
    """

    def __init__(self, hierarchy: Hierarchy, *, rule_weight: float = LOGICSEG_RULE_WEIGHT,
                 ramp: tuple[float, float] | None = LOGICSEG_RAMP, p: float = 5.0, exclusion: str = "siblings",
                 easy_filter: bool = False, ignore_index: int = 255, check_labels: bool = True,
                 upsample_logits: bool = False, check_finite: bool = False):
        super().__init__()
        F._check_hierarchy(hierarchy)
        check_logicseg_options(p=p, rule_weight=rule_weight, ramp=ramp, exclusion=exclusion, step=None)
        self.hierarchy = hierarchy
        self.rule_weight, self.ramp, self.p, self.exclusion = rule_weight, ramp, p, exclusion
        self.easy_filter, self.ignore_index = bool(easy_filter), ignore_index
        self.check_labels, self.upsample_logits = bool(check_labels), bool(upsample_logits)
        self.check_finite = bool(check_finite)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, rule_logits: torch.Tensor | None = None, *,
                step: int | None = None, return_parts: bool = False):
        use_step, factor = step, None
        if step is None and self.ramp is not None:
            if torch.compiler.is_compiling():
                start, end = (float(v) for v in self.ramp)
                t = self.step.to(torch.float64)
                factor = ((t - start) / (end - start)).clamp(0.0, 1.0) if end > start else (t >= start).double()
                factor = factor.to(compute_dtype(logits.dtype))
            else:
                use_step = int(self.step)
        out = _logicseg(logits, labels, self.hierarchy, step=use_step, rule_logits=rule_logits,
                        rule_weight=self.rule_weight, ramp=self.ramp, p=self.p, exclusion=self.exclusion,
                        easy_filter=self.easy_filter, ignore_index=self.ignore_index,
                        return_parts=return_parts, check_labels=self.check_labels,
                        upsample_logits=self.upsample_logits, backend="auto", factor=factor,
                        check_finite=self.check_finite)
        if step is None and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # A new tensor, not an in-place add: compiled backwards rebuild the ramp from the
                # buffer they saved, and would read it advanced (tested in test_torch_compile.py).
                self.step = self.step + 1
            else:
                self.step += 1
        return out

    def extra_repr(self) -> str:
        return (f"num_nodes={self.hierarchy.num_nodes}, rule_weight={self.rule_weight}, ramp={self.ramp}, "
                f"p={self.p}, exclusion={self.exclusion!r}, easy_filter={self.easy_filter}")


def logic_refine(logits: torch.Tensor, hierarchy: Hierarchy, *, steps: int = LOGIC_STEPS,
                 step_size: float = LOGIC_STEP_SIZE, p: float = 5.0, exclusion: str = "siblings") -> torch.Tensor:
    """Logic-guided reasoning at test time by rule descent: ``steps`` steps of gradient descent on the
    node logits against ``C + D + E`` (the three rules of :func:`logicseg_loss`, no easy-pixel
    filter), starting from ``logits``. Each step subtracts ``step_size`` times the gradient, scaled
    per image so that the pixel with the largest gradient (root-mean-square over its channels) moves
    by ``step_size``: the step does not depend on the pixel count. The rules are taken per image, so
    images in a batch do not steer each other. The gradient is the hand-derived one of
    :func:`hieraloss.core.logic.all_rules_gradient` (no autograd; works under ``torch.no_grad``).

    Returns new logits (the input is not modified), in the input's dtype; ``decode(...,
    method="logic")`` refines with the defaults and then decodes by ``"path"``."""
    x = F._check_logits(logits, hierarchy)
    p = check_logicseg_options(p=p, rule_weight=0.0, ramp=None, exclusion=exclusion, step=None)
    return _lo.refine(x, hierarchy, check_refine_steps(steps), float(step_size), p, exclusion)
