"""The HSSN objective's fused step in paddle: tree-min and every depth's cross-entropy in one pass
over the logits, on the fused Triton kernel (through the DLPack bridge) or the compiled CPU kernel as
:mod:`.route` picks; elsewhere there is none, and :func:`hieraloss.core.objective.compose_hssn` adds
the terms of the paddle ops one by one."""

from __future__ import annotations

from ...core.rules import HSSN_SCALE
from .. import _bridge
from . import native, route


def fused_step(terms, tree_min_weight: float, ce_weights: list[float], return_parts: bool):
    """``(total, tree_min, ce per depth)`` of a :class:`hieraloss.core.objective.HSSNTermsBase`
    (checked inputs), or None where neither fused kernel runs."""
    x, h = terms.x, terms.h
    if route.use_triton(terms.backend, x, h):
        total, values = _bridge.fused_objective(x, terms.channels()[0], h, gamma=terms.gamma,
                                                tm_weight=tree_min_weight / HSSN_SCALE, ce_weights=ce_weights,
                                                node_weight=terms.w)
        return total, values[0] / HSSN_SCALE, values[1:]
    if route.use_native(terms.backend, x):
        return native.hssn_objective_native(x, terms.channels()[0], h, gamma=terms.gamma, node_weight=terms.w,
                                            tree_min_weight=tree_min_weight, ce_weights=ce_weights)
    return None
