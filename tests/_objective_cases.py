"""The HSSN objective's property-test cases, shared by the compiled CPU kernel's tests in torch
(tests/native/test_native_objective.py) and in paddle (tests/paddle/test_paddle_native.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from hieraloss.testing import hierarchies, label_maps, logits

SHAPES = ((1, 5), (2, 64), (1, 3, 47), (1, 2, 2, 33), (1, 3, 200))  # tile width 256 here: the last spans 3


@st.composite
def cases(draw, ties=True, shapes=SHAPES):
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    shape = draw(st.sampled_from(shapes))
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = draw(logits(h, shape, ties=ties))
    gamma = draw(st.sampled_from([0.0, 2.0, 0.5]))
    weight = np.random.default_rng(0).uniform(0.5, 2.0, h.num_nodes) if draw(st.booleans()) else None
    ce_weights = draw(st.lists(st.sampled_from([0.0, 0.4, 1.0, 2.0]), min_size=h.max_depth, max_size=h.max_depth))
    tree_min_weight = draw(st.sampled_from([5.0, 1.0, 0.0]))
    kw = dict(gamma=gamma, node_weight=weight, tree_min_weight=tree_min_weight, ce_weights=ce_weights)
    return h, x, labels, kw
