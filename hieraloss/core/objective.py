"""How the objectives are composed, once for every framework: weights, schedules, parts, which terms run.

A backend validates its inputs at the door, wraps them in a small "terms" object that computes each
term in its framework (:class:`HSSNTerms`, :class:`LogicSegTerms`), and calls
:func:`compose_hssn` or :func:`compose_logicseg`. Those decide everything else: the fused pass or
the separate terms, the cross-entropy depths that run, the triplet weight and whether the fused
triplet kernels fold it in, the rule ramp, and the detached parts for logging. They import no
framework.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from .logic import EXCLUSIONS
from .rules import folds_triplet_weight

__all__ = ["HSSNTerms", "HSSNTermsBase", "LogicSegTerms", "CallableTerms", "compose_hssn", "compose_logicseg",
           "logicseg_rule_factor", "check_logicseg_options", "check_asl_options", "check_refine_steps",
           "LOGICSEG_RAMP", "LOGICSEG_RULE_WEIGHT", "LOGIC_STEPS", "LOGIC_STEP_SIZE"]

LOGICSEG_RAMP = (20000, 50000)  # the release: the rules fade in linearly from step 20k to 50k
LOGICSEG_RULE_WEIGHT = 0.2
LOGIC_STEPS, LOGIC_STEP_SIZE = 10, 0.5  # logic-guided decoding's rule descent (docs/concepts/logicseg.md)


class HSSNTerms(Protocol):
    """One HSSN call's terms in a framework, over already-checked inputs."""

    def fused(self, tree_min_weight: float, ce_weights: list[float], return_parts: bool
              ) -> tuple[Any, Any, Sequence[Any]] | None:
        """``(total, tree_min, ce)`` from one fused pass (``tree_min`` the unweighted, detached value,
        or None when ``return_parts`` is False and it would cost a launch; ``ce[d-1]`` the detached
        cross-entropy at depth d), or None where no fused pass runs."""

    def tree_min(self) -> Any:
        """The tree-min loss with the ``hssn`` per-depth normalisation, without its factor 5."""

    def depth_cross_entropy(self, depth: int) -> Any: ...

    def triplet(self, scale: float) -> tuple[Any, bool]:
        """``(loss, scaled)``: the triplet loss, times ``scale`` when ``scaled`` (the fused kernels)."""

    def detach(self, value: Any) -> Any: ...

    def scalar(self, value: float, like: Any) -> Any:
        """A 0-d array of ``value`` with the dtype and device of ``like``."""

    def match(self, value: Any, like: Any) -> Any:
        """``value`` in ``like``'s dtype (where the framework does not promote on its own)."""


class HSSNTermsBase:
    """What the frameworks' :class:`HSSNTerms` share: the inputs, the label channels mapped (and
    checked) once, and the separate terms through the framework's ops. A subclass sets the ops as
    static methods (``label_channels``, ``tree_min_op``, ``depth_cross_entropy_op``,
    ``triplet_loss``, ``scale``: ``HSSN_SCALE``) and adds ``fused``, ``scalar`` and ``match``."""

    label_channels: Any
    tree_min_op: Any
    depth_cross_entropy_op: Any
    triplet_loss: Any
    scale: float

    def __init__(self, x, labels, hierarchy, ignore_index, gamma, node_weight, backend, check_labels, triplet):
        self.x, self.labels, self.h, self.ignore_index = x, labels, hierarchy, ignore_index
        self.gamma, self.w, self.backend, self.check_labels, self.triplet_args = (
            gamma, node_weight, backend, check_labels, triplet)
        self._lc = None

    def channels(self):
        """``(label channels, has_partial)``, mapped once."""
        if self._lc is None:
            self._lc = self.label_channels(self.labels, self.h, self.ignore_index, self.check_labels)
        return self._lc

    def tree_min(self):
        lc, has_partial = self.channels()
        return self.tree_min_op(self.x, lc, self.h, gamma=self.gamma, reduction="hssn", node_weight=self.w,
                                has_partial=has_partial) / self.scale

    def depth_cross_entropy(self, depth):
        return self.depth_cross_entropy_op(self.x, self.channels()[0], self.h, depth)

    def triplet(self, scale):
        a = self.triplet_args
        # the framework ops gather across ranks, the fused kernels do not
        backend = "auto" if self.backend == "triton" and a["gather_across_ranks"] else self.backend
        return self.triplet_loss(a["embeddings"], self.labels, self.h, max_per_class=a["max_per_class"],
                                 base_margin=a["base_margin"], sampling=a["sampling"], generator=a["generator"],
                                 ignore_index=self.ignore_index, process_group=a["process_group"],
                                 gather_across_ranks=a["gather_across_ranks"], backend=backend,
                                 check_labels=False,  # the labels were checked with the logits' terms
                                 scale=scale)

    @staticmethod
    def detach(value):
        return value.detach()


def compose_hssn(terms: HSSNTerms, *, tree_min_weight: float, ce_weights: list[float],
                 triplet_weight: float | None, return_parts: bool) -> Any:
    """``tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d (+ triplet_weight * TT)`` and its parts.

    ``ce_weights`` and ``triplet_weight`` are resolved (:func:`hieraloss.core.rules.hssn_weights`;
    ``triplet_weight`` None: no embeddings). A cross-entropy weight 0 skips that depth. Parts:
    ``tree_min``, ``ce_depth{d}``, ``triplet`` (unweighted, detached) and ``triplet_weight``."""
    parts: dict[str, Any] = {}
    fused = terms.fused(float(tree_min_weight), ce_weights, return_parts)
    if fused is not None:
        total, tm, ce = fused
        if tm is not None:
            parts["tree_min"] = tm
        parts.update({f"ce_depth{d}": ce[d - 1] for d, w in enumerate(ce_weights, start=1) if w != 0})
    else:
        tm = terms.tree_min()
        parts["tree_min"] = terms.detach(tm)
        total = float(tree_min_weight) * tm
        for d, w in enumerate(ce_weights, start=1):
            if w != 0:
                ce_d = terms.depth_cross_entropy(d)
                parts[f"ce_depth{d}"] = terms.detach(ce_d)
                total = total + w * ce_d
    if triplet_weight is not None:
        tw = triplet_weight
        # The fused triplet kernels fold the weight in (value and gradient buffer come out weighted):
        # no multiply, and the backward takes no pass over the embedding gradient. A weight 0, or
        # one far from 1 (folds_triplet_weight), and the framework ops keep the multiply.
        fold = folds_triplet_weight(tw)
        tt, scaled = terms.triplet(tw if fold else 1.0)
        folded = scaled and fold
        if not folded:
            parts["triplet"] = terms.detach(tt)
        elif return_parts:  # the unweighted value: a division is a launch, only when asked for
            parts["triplet"] = terms.detach(tt if tw == 1.0 else tt / tw)
        if return_parts:
            parts["triplet_weight"] = terms.scalar(tw, total)
        tt = terms.match(tt, total)
        total = total + (tt if folded else tw * tt)
    return (total, parts) if return_parts else total


# ---------------------------------------------------------------------------- LogicSeg
class LogicSegTerms(Protocol):
    """One LogicSeg call's terms in a framework, over already-checked inputs."""

    def fused(self, rule_weight: float, with_rules: bool) -> tuple[Any, Any, tuple[Any, Any, Any] | None] | None:
        """``(total, asl, rules)`` from one fused computation (``asl`` and the rules ``(C, D, E)``
        detached; ``rules`` None when ``with_rules`` is False), or None where none runs."""

    def asymmetric_bce(self) -> Any: ...

    def rules(self) -> tuple[Any, Any, Any]:
        """``(child_implies_parent, parent_implies_child, exclusion)`` on the rule logits."""

    def detach(self, value: Any) -> Any: ...

    def scalar(self, value: float, like: Any) -> Any: ...


class CallableTerms:
    """:class:`LogicSegTerms` from callables: ``asl()`` and ``rules()`` compute the terms, ``fused(weight,
    with_rules)`` the fused path or None, ``scalar(value, like)`` a 0-d array; ``detach`` is the
    arrays' own ``.detach()`` (numpy arrays pass through)."""

    def __init__(self, asl, rules, scalar, fused=None):
        self.asymmetric_bce, self.rules, self.scalar, self._fused = asl, rules, scalar, fused

    def fused(self, rule_weight: float, with_rules: bool):
        return None if self._fused is None else self._fused(rule_weight, with_rules)

    @staticmethod
    def detach(value):
        return value.detach() if hasattr(value, "detach") else value


def logicseg_rule_factor(step: Any, ramp: Any) -> float:
    """The rules' ramp at ``step``: 0 before ``ramp[0]``, linear up to 1 at ``ramp[1]``, then 1.
    ``step=None`` or ``ramp=None``: 1 (the rules at full weight)."""
    if step is None or ramp is None:
        return 1.0
    start, end = ramp
    step = float(step)
    if step < start:
        return 0.0
    if step >= end:
        return 1.0
    return (step - start) / (end - start)


def _finite(v: Any) -> bool:
    """``math.isfinite`` by comparisons, which a graph tracer can also evaluate on a symbolic number."""
    return v == v and v != math.inf and v != -math.inf


def check_logicseg_options(*, p: Any, rule_weight: Any, ramp: Any, exclusion: Any, step: Any) -> float:
    """Check LogicSeg's options at the door (the same message in every backend); returns ``p``."""
    from .checks import check_choice

    if isinstance(p, bool) or not isinstance(p, (int, float)) or not _finite(p) or p < 1:
        raise ValueError(f"p must be a finite number >= 1 (the p-mean's exponent; the release uses 5), got {p!r}")
    if isinstance(rule_weight, bool) or not isinstance(rule_weight, (int, float)) or not _finite(rule_weight):
        raise ValueError(f"rule_weight must be a finite number, got {rule_weight!r}")
    if ramp is not None:
        try:
            start, end = (float(r) for r in ramp)
        except (TypeError, ValueError):
            raise ValueError(f"ramp must be None or (start, end) steps, got {ramp!r}") from None
        if not (0 <= start <= end and _finite(end)):
            raise ValueError(f"ramp must be (start, end) with 0 <= start <= end, got {ramp!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not step >= 0):
        raise ValueError(f"step must be None or a number >= 0, got {step!r}")
    check_choice(exclusion, EXCLUSIONS, "exclusion")
    return float(p)


def check_refine_steps(steps: Any) -> int:
    """The number of rule-descent steps of logic-guided decoding: an int >= 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0 (the rule-descent steps of logic decoding), got {steps!r}")
    return steps


def check_asl_options(*, gamma_neg: Any, gamma_pos: Any, clip: Any, eps: Any) -> tuple[float, float, float, float]:
    """Check the asymmetric loss's options at the door; returns them as floats."""
    from .checks import check_nonnegative

    gn, gp = check_nonnegative(gamma_neg, "gamma_neg"), check_nonnegative(gamma_pos, "gamma_pos")
    c = check_nonnegative(clip, "clip")
    if not c < 1:
        raise ValueError(f"clip must be in [0, 1) (it shifts 1 - sigmoid(x) up before the log), got {clip!r}")
    e = check_nonnegative(eps, "eps")
    if not e > 0:
        raise ValueError(f"eps must be > 0 (the floor under the log), got {eps!r}")
    return gn, gp, c, e


def compose_logicseg(terms: LogicSegTerms, *, rule_weight: float, factor: Any, return_parts: bool) -> Any:
    """``ASL + rule_weight * factor * (child_implies_parent + parent_implies_child + exclusion)``.

    ``factor`` is a number, or a 0-d array (a ramp computed on the device, under a graph
    compiler). The rules run unless their weight is the number 0 and no parts are asked for.
    Parts (detached, unweighted): ``asl``, ``child_implies_parent``, ``parent_implies_child``,
    ``exclusion`` and ``rule_factor``."""
    known = isinstance(factor, (int, float))
    weight = float(rule_weight) * (float(factor) if known else factor)
    with_rules = not known or weight != 0 or return_parts
    fused = terms.fused(weight, with_rules) if known else None
    if fused is not None:
        total, asl, rules = fused
        parts: dict[str, Any] = {"asl": asl}
    else:
        total = terms.asymmetric_bce()
        parts = {"asl": terms.detach(total)}
        rules = None
        if with_rules:
            c, d, e = terms.rules()
            if not known or weight != 0:
                total = total + weight * (c + d + e)
            rules = tuple(terms.detach(v) for v in (c, d, e))
    if rules is not None:
        parts.update(zip(("child_implies_parent", "parent_implies_child", "exclusion"), rules, strict=True))
    if not return_parts:
        return total
    parts["rule_factor"] = terms.scalar(float(factor) if known else factor, total)
    return total, parts
