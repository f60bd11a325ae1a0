"""The loss rules every backend shares (plain constants and pure-Python schedules, numpy-free).

* :data:`REDUCTIONS`: the reductions of the tree-min losses (DEVELOPING.md "Targets, losses, ties"); the door's
  ``check_choice`` in :mod:`hieraloss.core.checks` lists them in this order in its message.
* :data:`HSSN_SCALE`: the ``hssn`` reduction multiplies its per-depth normalised sum by 5 (the
  published code's factor); the HSSN objective divides its tree-min weight by it.
* :data:`DECODE_METHODS`: the decoders of ``decode`` (DEVELOPING.md "Decoding"), in message order.
* :data:`LEAF_REDUCTIONS`, :data:`LEAF_DECODE_METHODS`: the reductions and decoders of the leaf
  losses (HXE, soft labels; :mod:`hieraloss.core.leaf`).
* :func:`triplet_weight`: the published cosine ramp of the triplet weight; :func:`hssn_weights`
  resolves ``hssn_loss``'s cross-entropy and triplet weights; :func:`folds_triplet_weight` says
  whether ``hssn_loss`` hands the triplet weight to the fused triplet kernels as their scale.
* :data:`AUTO_FUSED_MAX_NODES`: the largest tree that ``backend="auto"`` gives the fused GPU
  kernels.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["REDUCTIONS", "HSSN_SCALE", "DECODE_METHODS", "LEAF_REDUCTIONS", "LEAF_DECODE_METHODS",
           "triplet_weight", "hssn_weights", "folds_triplet_weight", "AUTO_FUSED_MAX_NODES"]

REDUCTIONS = ("mean", "sum", "none", "hssn")
HSSN_SCALE = 5.0
DECODE_METHODS = ("path", "hssn", "top_down", "independent", "logic")
LEAF_REDUCTIONS = ("mean", "sum", "none")
LEAF_DECODE_METHODS = ("argmax", "top_down")

# backend="auto" leaves larger trees to the framework ops: the fused kernels are generated for the
# tree as straight-line code, and their first compile grows about as N**1.9 (docs/performance.md,
# "Compile time of the generated kernels"), so a 4000-class taxonomy would stall its first step for
# about half an hour. backend="triton" still takes them, up to CODE_NODE_LIMIT.
AUTO_FUSED_MAX_NODES = 1200


def triplet_weight(step: float, total_steps: float) -> float:
    """Published ramp ``0.25 * (1 + cos(pi * (t - T) / T))`` for ``t < T``, else 0.5."""
    if not total_steps > 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
    if not step >= 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if step >= total_steps:
        return 0.5
    return 0.25 * (1.0 + math.cos(math.pi * (step - total_steps) / total_steps))


def hssn_weights(max_depth: int, ce_weights: Any, has_embeddings: bool, fixed_triplet_weight: Any,
                 step: Any, total_steps: Any) -> tuple[list[float], float | None]:
    """Resolve ``hssn_loss``'s weights: one CE weight per depth (``None`` = 1.0 each, one number =
    that for all) and the triplet weight (``fixed_triplet_weight``, else the published schedule at
    ``step`` of ``total_steps``; ``None`` when there are no embeddings). Shared by the backends."""
    if ce_weights is None:
        ce_w = [1.0] * max_depth
    elif isinstance(ce_weights, (int, float)):
        ce_w = [float(ce_weights)] * max_depth
    else:
        ce_w = [float(c) for c in ce_weights]
        if len(ce_w) != max_depth:
            raise ValueError(f"ce_weights needs one weight per depth ({max_depth}), got {len(ce_w)}")
    if not has_embeddings:
        return ce_w, None
    if fixed_triplet_weight is not None:
        return ce_w, float(fixed_triplet_weight)
    if step is None or total_steps is None:
        raise ValueError("with embeddings, give triplet_weight or both step and total_steps (for the schedule)")
    return ce_w, triplet_weight(float(step), float(total_steps))


def folds_triplet_weight(weight: float) -> bool:
    """Whether ``hssn_loss`` hands its triplet weight to the fused triplet kernels as the scale they
    apply to the value and the gradient they write (so that it needs no multiply, and its backward
    no pass over the embedding gradient). Not for 0 (the unweighted value for ``return_parts`` would
    be lost, and 0 * NaN must stay NaN), inf or NaN, nor for a weight so small or large that the
    weighted float32 values could leave float32's normal range: those keep the multiply."""
    return 2.0**-64 <= abs(weight) <= 2.0**64
