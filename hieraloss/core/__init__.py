"""The framework-free core every backend builds on (numpy only; imports no backend).

* :mod:`hieraloss.core.plan`: :func:`plan_for`, the one :class:`Plan` per hierarchy holding every
  integer table an op or kernel reads (cached by fingerprint). Nothing outside the core walks the tree.
* :mod:`hieraloss.core.blocks`: :func:`depth_blocks`, the plan reshaped into depth blocks and the
  node-at-a-time sweep that the paddle and torch ops read.
* :mod:`hieraloss.core.rules`: the shared loss rules (``REDUCTIONS``, ``HSSN_SCALE``,
  ``DECODE_METHODS``, ``LEAF_REDUCTIONS``, ``LEAF_DECODE_METHODS``, the triplet-weight schedule
  ``triplet_weight`` and ``hssn_weights``).
* :mod:`hieraloss.core.checks`: the argument checks and their messages, one per rule, that every
  backend's door calls with framework-free facts (shapes, dtype names), the leaf losses' included.
* :mod:`hieraloss.core.leaf`: the leaf losses' tables (the bottom-up log-sum-exp ``LeafPlan``, the
  hierarchical cross-entropy coefficients, the soft targets).
* :mod:`hieraloss.core.triplets`: the triplet selection rule (key order, the seeded permutation that
  makes an int seed draw the same triplets in every backend, selection, margins).
"""

from __future__ import annotations

from .plan import (
    CODE_NODE_LIMIT,
    LabelCodes,
    Plan,
    ce_counted_per_depth,
    code_node_limit_reason,
    counted_entries_per_depth,
    plan_for,
)
from .rules import HSSN_SCALE, REDUCTIONS

__all__ = ["Plan", "LabelCodes", "plan_for", "counted_entries_per_depth", "ce_counted_per_depth", "CODE_NODE_LIMIT",
           "code_node_limit_reason", "REDUCTIONS", "HSSN_SCALE"]
