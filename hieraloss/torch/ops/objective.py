"""The HSSN objective's fused step: tree-min and every depth's cross-entropy in one pass over the
logits, which also writes the gradient of their weighted sum. :mod:`.route` picks the fused Triton
kernel on CUDA or the compiled CPU kernel; elsewhere there is no fused step, and
:func:`hieraloss.core.objective.compose_hssn` adds the terms of the torch ops one by one."""

from __future__ import annotations

from ...core.rules import HSSN_SCALE
from . import route
from .labels import check_label_values
from .native import hssn_objective_native


def fused_step(terms, tree_min_weight: float, ce_weights: list[float], return_parts: bool):
    """``(total, tree_min or None, ce per depth)`` of a :class:`hieraloss.core.objective.HSSNTermsBase`
    (checked inputs; ``tree_min`` only when ``return_parts`` asks for it on the Triton path), or None
    where neither fused kernel runs."""
    x, h = terms.x, terms.h
    if route.use_triton(terms.backend, x, h):
        if terms.check_labels:
            check_label_values(terms.labels, h, terms.ignore_index)
        total, values = route.kernels().fused_objective(
            x, terms.labels, h, ignore_index=terms.ignore_index, gamma=terms.gamma, reduction="hssn",
            tm_weight=tree_min_weight / HSSN_SCALE, ce_weights=ce_weights, node_weight=terms.w)
        # the unweighted tree-min is a division, so a launch: only when asked for
        return total, (values[0] / HSSN_SCALE if return_parts else None), values[1:]
    if route.use_native(terms.backend, x):
        return hssn_objective_native(x, terms.channels()[0], h, gamma=terms.gamma, node_weight=terms.w,
                                     tree_min_weight=tree_min_weight, ce_weights=ce_weights)
    return None
