"""The compiled kernel's host arithmetic (:mod:`hieraloss._native`: ``label_histogram``,
``reduction_scale``, ``hssn_scales``) against plain loops over pixels and nodes written here.

These are numpy only: they run whether or not the kernel is built. The loops count, for every
valid pixel with label channel c, the entries the tree-min loss keeps (every node but the strict
descendants of a partial label c), per depth, and the pixels each depth's cross-entropy scores
(leaves at every depth, partial labels down to their own). SPEC section 4 "Reductions": ``hssn``
divides each depth's sum by its kept entries and multiplies by 5.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hieraloss import _native
from hieraloss.core.plan import plan_for
from hieraloss.testing import hierarchies, label_maps


def _strict_descendant(h, v: int, c: int) -> bool:
    u = int(h.parent[v])
    while u >= 0:
        if u == c:
            return True
        u = int(h.parent[u])
    return False


def _kept_per_depth(h, channels: np.ndarray) -> np.ndarray:
    """``[L]``: the (pixel, node) entries the tree-min loss keeps, per depth, by a loop."""
    kept = np.zeros(h.max_depth)
    for c in channels.reshape(-1).tolist():
        if c < 0:
            continue
        for v in range(h.num_nodes):
            if not _strict_descendant(h, v, c):
                kept[int(h.depth[v]) - 1] += 1
    return kept


@settings(max_examples=40, deadline=None)
@given(data=st.data(), reduction=st.sampled_from(["sum", "mean", "hssn"]), weighted=st.booleans())
def test_reduction_scale_matches_a_loop(data, reduction, weighted):
    h = data.draw(hierarchies(max_depth=4))
    labels = data.draw(label_maps(h, (2, 3, 4), ignore_fraction=None, partial_fraction=None))
    channels = h.label_channels(labels, ignore_index=255)
    hist = _native.label_histogram(channels, h.num_nodes)
    assert hist.dtype == np.float64 and hist.shape == (h.num_nodes,)
    np.testing.assert_array_equal(hist, [(channels == c).sum() for c in range(h.num_nodes)])

    weight = np.random.default_rng(0).uniform(0.5, 2.0, h.num_nodes) if weighted else None
    got = _native.reduction_scale(plan_for(h), hist, reduction, weight)
    kept = _kept_per_depth(h, channels)
    want = np.empty(h.num_nodes)
    for v in range(h.num_nodes):
        if reduction == "sum":
            want[v] = 1.0
        elif reduction == "mean":
            want[v] = 1.0 / max(kept.sum(), 1.0)
        else:
            want[v] = 5.0 / max(kept[int(h.depth[v]) - 1], 1.0)
        if weight is not None:
            want[v] *= weight[v]
    assert got.dtype == np.float64 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), weighted=st.booleans())
def test_hssn_scales_match_a_loop(data, weighted):
    """The objective's normalisation: tree-min as ``hssn`` without its 5, and the cross-entropy of
    depth d over the pixels it scores: a leaf label at every depth (a shallow leaf is its own class
    below its depth), a partial label down to its own depth."""
    h = data.draw(hierarchies(max_depth=4))
    labels = data.draw(label_maps(h, (1, 4, 5), ignore_fraction=None, partial_fraction=None))
    channels = h.label_channels(labels, ignore_index=255)
    weight = np.random.default_rng(1).uniform(0.5, 2.0, h.num_nodes) if weighted else None
    tm_scale, ce_scale = _native.hssn_scales(plan_for(h), _native.label_histogram(channels, h.num_nodes), weight)
    kept = _kept_per_depth(h, channels)
    want_tm = np.array([1.0 / max(kept[int(h.depth[v]) - 1], 1.0) for v in range(h.num_nodes)])
    if weight is not None:
        want_tm *= weight
    np.testing.assert_allclose(tm_scale, want_tm, rtol=1e-15, atol=0)
    valid = channels[channels >= 0]
    reach = np.array([sum(bool(h.is_leaf[c]) or int(h.depth[c]) >= d for c in valid.tolist())
                      for d in range(1, h.max_depth + 1)])
    np.testing.assert_allclose(ce_scale, 1.0 / np.maximum(reach, 1.0), rtol=1e-15, atol=0)
