"""LogicSeg's terms (Li et al., ICCV 2023), written once over a small array interface.

Every backend hands these functions an :class:`ArrayOps` for its framework (numpy, torch, paddle),
so the math below is the only copy: the backends translate, autograd differentiates. Scores are
``s = sigmoid(x)`` of the node logits; the rules read them as a ``[P, N]`` matrix (pixels x
channels, every pixel of the rule logits, void ones included: the rules use no labels).

* :func:`asymmetric_bce`: the asymmetric loss (Ridnik et al., ICCV 2021) on the multi-hot node
  targets, summed over the counted nodes and averaged over the valid pixels.
* :func:`child_implies_parent`: ``s_v (1 - s_parent(v))`` for every channel with a parent.
* :func:`parent_implies_child`: ``s_v (1 - max_{c in children(v)} s_c)`` for every internal channel.
* :func:`exclusion`: ``s_a s_b`` for ordered pairs a != b of one group (siblings or one depth).

Each clause's "for all pixels" is the p-mean of its violations, ``(mean_i viol_i^p)^(1/p)``;
:func:`pmean_columns` returns an exact 0, with gradient 0, for a clause whose violations are all 0
(where ``m^(1/p)`` has an infinite derivative). A rule is the mean of its clauses; exclusion
divides the sum over pairs a != b by the count of ordered pairs with the diagonal (``sum_g n_g^2``
over groups of two or more channels), as the released code does.

Exclusion never forms a ``[P, n, n]`` tensor: for a group g, ``sum_i (s_a s_b)^p = (S^T S)[a, b]``
with ``S = s[:, g]^p``, one matrix product per group (memory ``P * n_g`` for ``S`` plus ``n_g^2``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Protocol

import numpy as np

from .plan import Plan

__all__ = ["ArrayOps", "LogicTables", "logic_tables", "EXCLUSIONS", "EASY_HIGH", "EASY_LOW", "ASL_DEFAULTS",
           "exclusion_groups", "pmean_columns", "asymmetric_bce", "child_implies_parent", "parent_implies_child",
           "exclusion", "rule_parts", "all_rules", "all_rules_gradient", "refine_scores_step", "rules_from_sums"]

EXCLUSIONS = ("siblings", "level")
ASL_DEFAULTS = (4.0, 1.0, 0.05, 1e-8)  # the release's gamma_neg, gamma_pos, clip, eps
EASY_HIGH, EASY_LOW = 0.7, 0.3  # the release's "easy pixel": one score above 0.7, the rest below 0.3


class ArrayOps(Protocol):
    """The operations the LogicSeg terms need from a framework (arrays of its own type)."""

    def sigmoid(self, x: Any) -> Any: ...
    def log(self, x: Any) -> Any: ...
    def clamp(self, x: Any, lo: float | None = None, hi: float | None = None) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...       # b an array or a number
    def power(self, a: Any, exponent: float) -> Any: ...         # a ** exponent, exponent in a's dtype
    def cols(self, a: Any, index: np.ndarray) -> Any: ...       # a[:, index]
    def sum0(self, a: Any) -> Any: ...                          # sum over axis 0
    def total(self, a: Any) -> Any: ...                         # sum of all entries (0-d)
    def gram(self, a: Any) -> Any: ...                          # a^T a
    def matmul(self, a: Any, b: Any) -> Any: ...
    def add_cols(self, a: Any, index: Any, values: Any) -> Any: ...  # a copy of a, a[:, index] += values
    def sum1(self, a: Any) -> Any: ...                          # sum over axis 1
    def max_all(self, a: Any) -> Any: ...                       # max of all entries (0-d)
    def row_count(self, cond: Any) -> Any: ...                  # per row, how many entries are true
    def as_float(self, cond: Any, like: Any) -> Any: ...        # a boolean array as like's float dtype


class LogicTables(NamedTuple):
    """The index tables of the rules for one hierarchy and exclusion mode, as numpy arrays from
    :func:`logic_tables`; a backend converts the arrays once to its own type (a cached device copy)
    and keeps the Python ints.

    ``edge_child`` / ``edge_parent``: the (channel, parent) pairs; ``internal``: the channels with
    children; ``child_ranks``: row r of :attr:`Plan.children_by_rank`; ``groups``: the exclusion
    groups (two or more channels each) and ``off_diagonal``: a bool ``[n_g, n_g]`` mask each;
    ``pair_count``: ``sum_g n_g^2``."""

    edge_child: Any
    edge_parent: Any
    internal: Any
    child_ranks: tuple[Any, ...]
    groups: tuple[Any, ...]
    off_diagonal: tuple[Any, ...]
    pair_count: int


def exclusion_groups(plan: Plan, mode: str) -> tuple[np.ndarray, ...]:
    """The channel groups whose pairs exclude each other: sibling groups, or each depth's channels
    (``"level"``, the release's form); groups of one channel have no pairs and are left out."""
    if mode == "siblings":
        return plan.sibling_groups
    return tuple(lv for lv in plan.levels if lv.size >= 2)


@functools.lru_cache(maxsize=128)  # plans are cached per hierarchy, so this is once per (tree, mode)
def logic_tables(plan: Plan, mode: str) -> LogicTables:
    """The :class:`LogicTables` of ``plan`` with exclusion over ``mode`` groups (read-only arrays)."""

    def ro(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        a.setflags(write=False)
        return a

    groups = exclusion_groups(plan, mode)
    return LogicTables(
        edge_child=ro(plan.edges[:, 0]), edge_parent=ro(plan.edges[:, 1]), internal=plan.internal,
        child_ranks=tuple(ro(r) for r in plan.children_by_rank), groups=groups,
        off_diagonal=tuple(ro(~np.eye(g.size, dtype=bool)) for g in groups),
        pair_count=int(sum(int(g.size) ** 2 for g in groups)))


def pmean_columns(ops: ArrayOps, viol: Any, p: float, count: Any) -> Any:
    """Per column of the ``[P, C]`` violations, the p-mean ``(sum_i viol_i^p / count)^(1/p)``: an
    exact 0 with gradient 0 where the column is all 0."""
    return root_mean(ops, ops.sum0(ops.power(viol, p)), p, count)


def root_mean(ops: ArrayOps, sums: Any, p: float, count: Any) -> Any:
    """``(sums / count)^(1/p)``, and 0 (gradient 0, never NaN) where ``sums`` is 0 (``count`` at least
    1: no pixels means no violation)."""
    m = sums / (count if not isinstance(count, (int, float)) else max(float(count), 1.0))
    positive = m > 0
    return ops.where(positive, ops.power(ops.where(positive, m, 1.0), 1.0 / p), 0.0)


def asymmetric_bce(ops: ArrayOps, x: Any, positive: Any, mask: Any, valid_pixels: Any, *, gamma_neg: float,
                   gamma_pos: float, clip: float, eps: float) -> Any:
    """The asymmetric loss on node targets: per entry, with ``s = sigmoid(x)`` and
    ``s_neg = min(1 - s + clip, 1)``::

        positive: -(1 - s)^gamma_pos * log(max(s, eps))
        negative: -(1 - s_neg)^gamma_neg * log(max(s_neg, eps))

    (focusing weights differentiated), summed over the entries of ``mask`` and divided by
    ``valid_pixels`` (at least 1). ``positive`` and ``mask`` are 0/1 arrays shaped like ``x``."""
    s = ops.sigmoid(x)
    s_neg = 1.0 - s
    if clip > 0:
        s_neg = ops.clamp(s_neg + clip, hi=1.0)
    pos_term = ops.log(ops.clamp(s, lo=eps))
    neg_term = ops.log(ops.clamp(s_neg, lo=eps))
    if gamma_pos != 0:
        pos_term = pos_term * ops.power(1.0 - s, gamma_pos)
    if gamma_neg != 0:
        neg_term = neg_term * ops.power(1.0 - s_neg, gamma_neg)
    loss = positive * pos_term + (1.0 - positive) * neg_term
    return -ops.total(loss * mask) / ops.clamp(valid_pixels, lo=1.0)


def child_implies_parent(ops: ArrayOps, s: Any, t: LogicTables, p: float) -> Any:
    """Mean over the channels v with a parent of the p-mean of ``s_v (1 - s_parent(v))``."""
    count = int(t.edge_child.shape[0])
    if count == 0:
        return ops.total(s) * 0.0
    cv = ops.cols(s, t.edge_child)
    viol = cv - cv * ops.cols(s, t.edge_parent)
    return ops.total(pmean_columns(ops, viol, p, s.shape[0])) / count


def parent_implies_child(ops: ArrayOps, s: Any, t: LogicTables, p: float) -> Any:
    """Mean over the internal channels v of the p-mean of ``s_v (1 - max_{c in children(v)} s_c)``."""
    count = int(t.internal.shape[0])
    if count == 0:
        return ops.total(s) * 0.0
    best = ops.cols(s, t.child_ranks[0])
    for row in t.child_ranks[1:]:  # a tie keeps the earlier child (its gradient goes to one child)
        nxt = ops.cols(s, row)
        best = ops.where(nxt > best, nxt, best)
    sv = ops.cols(s, t.internal)
    viol = sv - sv * best
    return ops.total(pmean_columns(ops, viol, p, s.shape[0])) / count


def exclusion(ops: ArrayOps, s: Any, t: LogicTables, p: float, easy_filter: bool) -> Any:
    """Sum over the groups of the p-means of ``s_a s_b`` over ordered pairs a != b, divided by
    ``sum_g n_g^2``. ``easy_filter`` drops, per group, the pixels where exactly one score of the
    group is above 0.7 and all others below 0.3 (the p-mean then averages over the remaining
    pixels; a group with none left contributes 0)."""
    if not t.groups:
        return ops.total(s) * 0.0
    acc = None
    for g, off_diagonal in zip(t.groups, t.off_diagonal, strict=True):
        n = int(g.shape[0])
        sg = ops.cols(s, g)
        sp = ops.power(sg, p)
        if easy_filter:
            easy = (ops.row_count(sg > EASY_HIGH) == 1) & (ops.row_count(sg < EASY_LOW) == n - 1)
            hard = 1.0 - ops.as_float(easy, sg)
            count = ops.clamp(ops.total(hard), lo=1.0)
            sp = sp * hard.reshape([-1, 1])
        else:
            count = float(s.shape[0])
        term = ops.total(ops.where(off_diagonal, root_mean(ops, ops.gram(sp), p, count), 0.0))
        acc = term if acc is None else acc + term
    return acc / float(t.pair_count)


def rule_parts(ops: ArrayOps, s: Any, t: LogicTables, p: float, easy_filter: bool) -> tuple[Any, Any, Any]:
    """``(C, D, E)``: :func:`child_implies_parent`, :func:`parent_implies_child`, :func:`exclusion`."""
    return (child_implies_parent(ops, s, t, p), parent_implies_child(ops, s, t, p),
            exclusion(ops, s, t, p, easy_filter))


def all_rules(ops: ArrayOps, s: Any, t: LogicTables, p: float) -> Any:
    """``C + D + E`` without the easy-pixel filter: what logic-guided decoding descends on."""
    c, d, e = rule_parts(ops, s, t, p, False)
    return c + d + e


# ---------------------------------------------------------------------------- logic-guided decoding
def _root_mean_slope(ops: ArrayOps, sums: Any, p: float, count: Any) -> Any:
    """d/d(sums) of :func:`root_mean`: ``(1/p) m^(1/p - 1) / count``, 0 where ``sums`` is 0."""
    m = sums / count
    positive = m > 0
    return ops.where(positive, ops.power(ops.where(positive, m, 1.0), 1.0 / p - 1.0), 0.0) / (p * count)


def all_rules_gradient(ops: ArrayOps, s: Any, t: LogicTables, p: float) -> Any:
    """The gradient of :func:`all_rules` with respect to the scores ``s`` ``[P, N]`` (derived by
    hand, so that decoding needs no autograd; tested against it). A max over children sends its
    gradient to the child that attains it, the earlier one at a tie."""
    count = float(s.shape[0])
    grad = s * 0.0
    n_edges = int(t.edge_child.shape[0])
    if n_edges:  # C: viol = s_v (1 - s_u), u = parent(v)
        cv, cu = ops.cols(s, t.edge_child), ops.cols(s, t.edge_parent)
        viol = cv - cv * cu
        dv = _root_mean_slope(ops, ops.sum0(ops.power(viol, p)), p, count) * p * ops.power(viol, p - 1.0) / n_edges
        grad = ops.add_cols(grad, t.edge_child, dv * (1.0 - cu))
        grad = ops.add_cols(grad, t.edge_parent, -dv * cv)
    n_internal = int(t.internal.shape[0])
    if n_internal:  # D: viol = s_v (1 - max_c s_c)
        best = ops.cols(s, t.child_ranks[0])
        which = best * 0.0
        for r, row in enumerate(t.child_ranks[1:], start=1):
            nxt = ops.cols(s, row)
            better = nxt > best
            best = ops.where(better, nxt, best)
            which = ops.where(better, which * 0.0 + r, which)
        sv = ops.cols(s, t.internal)
        viol = sv - sv * best
        dv = _root_mean_slope(ops, ops.sum0(ops.power(viol, p)), p, count) * p * ops.power(viol, p - 1.0) / n_internal
        grad = ops.add_cols(grad, t.internal, dv * (1.0 - best))
        for r, row in enumerate(t.child_ranks):
            grad = ops.add_cols(grad, row, ops.where(which == r, -dv * sv, 0.0))
    for g, off_diagonal in zip(t.groups, t.off_diagonal, strict=True):  # E: sum_{a != b} (G_ab / P)^(1/p)
        sg = ops.cols(s, g)
        sp = ops.power(sg, p)
        slope = ops.where(off_diagonal, _root_mean_slope(ops, ops.gram(sp), p, count), 0.0) / float(t.pair_count)
        d_sp = ops.matmul(sp, slope + slope.T)
        grad = ops.add_cols(grad, g, d_sp * p * ops.power(sg, p - 1.0))
    return grad


def refine_scores_step(ops: ArrayOps, x: Any, t: LogicTables, p: float, step_size: float) -> Any:
    """One step of rule descent on the ``[P, N]`` node logits ``x`` of one image: ``x - step_size *
    g / max_i rms(g_i)`` with ``g`` the gradient of :func:`all_rules` with respect to ``x`` (the
    pixel with the largest gradient moves by ``step_size``, root-mean-square over its channels)."""
    s = ops.sigmoid(x)
    g = all_rules_gradient(ops, s, t, p) * s * (1.0 - s)
    scale = ops.max_all(ops.power(ops.sum1(g * g) / float(x.shape[1]), 0.5))
    return x - g * (step_size / ops.clamp(scale, lo=1e-30))


# ---------------------------------------------------------------------------- the compiled kernel's sums
def rules_from_sums(sums: np.ndarray, t: LogicTables, p: float, pixels: int) -> tuple[tuple[float, float, float],
                                                                                       np.ndarray]:
    """The rules' values and the kernel's slopes from its per-clause sums (float64, in the order
    edges, internal nodes, unordered pairs group by group, then each group's hard-pixel count).

    Returns ``((C, D, E), slopes)``: ``slopes`` float64 ``[E + I + pairs]`` is ``p`` times the
    derivative of ``C + D + E`` with respect to each clause's sum (0 where the sum is 0)."""
    n_e, n_i = int(t.edge_child.shape[0]), int(t.internal.shape[0])
    sizes = [int(g.shape[0]) for g in t.groups]
    n_pairs = sum(n * (n - 1) // 2 for n in sizes)
    sums = np.asarray(sums, dtype=np.float64)
    slopes = np.zeros(n_e + n_i + n_pairs, dtype=np.float64)

    def part(lo: int, hi: int, count, clauses: float, factor: float) -> float:
        m = sums[lo:hi] / count
        positive = m > 0
        safe = np.where(positive, m, 1.0)
        slopes[lo:hi] = np.where(positive, factor * safe ** (1.0 / p - 1.0) / (count * clauses), 0.0)
        return float(factor * np.where(positive, safe ** (1.0 / p), 0.0).sum() / clauses)

    pixels = float(max(pixels, 1))
    c = part(0, n_e, pixels, float(max(n_e, 1)), 1.0)
    d = part(n_e, n_e + n_i, pixels, float(max(n_i, 1)), 1.0)
    e, start = 0.0, n_e + n_i
    hard = sums[n_e + n_i + n_pairs:]
    for g, n in enumerate(sizes):
        k = n * (n - 1) // 2
        # each unordered pair stands for the two ordered ones: twice its root, over sum_g n_g^2
        e += part(start, start + k, max(float(hard[g]), 1.0), float(t.pair_count), 2.0)
        start += k
    return (c, d, e), slopes
