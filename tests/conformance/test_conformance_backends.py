"""One conformance suite for every backend (numpy, torch, paddle), against the loop oracle.

Backends are reached through the adapters of tests/backends.py (numpy in, numpy out).
"""

from __future__ import annotations

import math

import numpy as np
import oracle
import pytest
from backends import BACKENDS, TOLERANCES, as_dtype
from hypothesis import given
from hypothesis import strategies as st

from hieraloss import presets
from hieraloss.testing import assert_consistent, hierarchies, label_maps, logits

pytestmark = pytest.mark.parametrize("adapter", BACKENDS)

LOSSES = ("tree_min_loss", "focal_tree_min_loss")
REDUCTIONS = ("mean", "sum", "none", "hssn")
METHODS = ("path", "hssn", "top_down", "independent")


# ---------------------------------------------------------------------------- strategies
@st.composite
def label_shapes(draw):
    """[B] (logits [B, N]), [B, H, W] with odd sizes, or [B, D, H, W]."""
    b = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["flat", "2d", "3d"]))
    if kind == "flat":
        return (b,)
    if kind == "2d":
        return (b, draw(st.integers(1, 5)), draw(st.integers(1, 3)))
    return (b, draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3)))


@st.composite
def trees(draw):
    balanced = draw(st.sampled_from([None, True, False]))
    return draw(hierarchies(max_depth=3, max_children=3, balanced=balanced, order=None))


@st.composite
def cases(draw, ties=False, partial=True):
    """(hierarchy, logits float64, labels) with random ignore and partial fractions."""
    h = draw(trees())
    shape = draw(label_shapes())
    labels = draw(
        label_maps(
            h,
            shape,
            ignore_fraction=None,
            partial_fraction=None if partial else 0.0,
            dtype=draw(st.sampled_from([np.int64, np.int32, np.uint8])),
        )
    )
    x = draw(logits(h, shape, scale=3.0, ties=ties))
    return h, x, labels


def loss_kwargs(draw, h, fn):
    kw = {"reduction": draw(st.sampled_from(REDUCTIONS))}
    if draw(st.booleans()):
        kw["node_weight"] = np.random.default_rng(draw(st.integers(0, 99))).uniform(0.0, 2.0, h.num_nodes)
    if fn == "focal_tree_min_loss":
        kw["gamma"] = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]))
    return kw


def oracle_loss(fn, x, labels, h, **kw):
    kw = dict(kw)
    gamma = kw.pop("gamma", 2.0) if fn == "focal_tree_min_loss" else None
    return oracle.tree_min_loss(x, labels, h, gamma=gamma, **kw)


def oracle_grad(fn, x, labels, h, upstream=None, **kw):
    kw = dict(kw)
    gamma = kw.pop("gamma", 2.0) if fn == "focal_tree_min_loss" else None
    return oracle.tree_min_grad(x, labels, h, gamma=gamma, upstream=upstream, **kw)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def close(actual, expected, dtype):
    np.testing.assert_allclose(f64(actual), f64(expected), **TOLERANCES[dtype])


def need_grad(adapter):
    if not adapter.supports_grad:
        pytest.skip(f"{adapter.name} has no gradients")


# ---------------------------------------------------------------------------- losses
@given(data=st.data())
def test_losses_match_oracle(adapter, data):
    h, x64, labels = data.draw(cases())
    dtype = data.draw(st.sampled_from(adapter.dtypes))
    fn = data.draw(st.sampled_from(LOSSES))
    kw = loss_kwargs(data.draw, h, fn)
    x = as_dtype(x64, dtype)
    got = getattr(adapter, fn)(x, labels, h, **kw)
    want = oracle_loss(fn, f64(x), labels, h, **kw)
    if kw["reduction"] == "none":
        assert np.shape(got) == x.shape
        _, mask = oracle.loss_map(f64(x), labels, h)
        assert np.all(f64(got)[~mask] == 0)
    else:
        assert np.size(got) == 1
    close(got, want, dtype)


@given(data=st.data())
def test_gamma_zero_equals_tree_min(adapter, data):
    h, x64, labels = data.draw(cases())
    dtype = data.draw(st.sampled_from([d for d in adapter.dtypes if d in ("float64", "float32")]))
    x = as_dtype(x64, dtype)
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    plain = adapter.tree_min_loss(x, labels, h, reduction=reduction)
    focal = adapter.focal_tree_min_loss(x, labels, h, reduction=reduction, gamma=0.0)
    np.testing.assert_array_equal(f64(focal), f64(plain))


@given(data=st.data())
def test_gradients_match_oracle(adapter, data):
    need_grad(adapter)
    ties = data.draw(st.booleans())
    h, x, labels = data.draw(cases(ties=ties))
    fn = data.draw(st.sampled_from(LOSSES))
    kw = loss_kwargs(data.draw, h, fn)
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    upstream = rng.normal(size=x.shape) if kw["reduction"] == "none" else None
    value, grad = adapter.value_and_grad(fn, x, labels, h, upstream=upstream, **kw)
    close(value, oracle_loss(fn, x, labels, h, **kw), "float64")
    assert np.shape(grad) == x.shape
    np.testing.assert_allclose(
        f64(grad), oracle_grad(fn, x, labels, h, upstream=upstream, **kw), rtol=1e-9, atol=1e-12
    )


@given(data=st.data())
def test_gradients_half_precision(adapter, data):
    need_grad(adapter)
    h, x64, labels = data.draw(cases())
    dtype = data.draw(st.sampled_from([d for d in adapter.dtypes if d != "float64"]))
    x = as_dtype(x64, dtype)
    fn = data.draw(st.sampled_from(LOSSES))
    reduction = data.draw(st.sampled_from(["mean", "sum", "hssn"]))
    value, grad = adapter.value_and_grad(fn, x, labels, h, reduction=reduction)
    want = oracle_grad(fn, f64(x), labels, h, reduction=reduction)
    close(value, oracle_loss(fn, f64(x), labels, h, reduction=reduction), dtype)
    # Gradients come back in the input dtype; compare relative to the largest entry.
    scale = max(float(np.abs(want).max()), 1e-6)
    tol = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 3e-2}[dtype]
    assert float(np.abs(f64(grad) - want).max()) <= tol * scale


def test_tie_rule_cityscapes(adapter):
    """All logits equal: every min/max is tied, so the rule alone decides where gradients go."""
    need_grad(adapter)
    h = presets.cityscapes()
    x = np.zeros((1, h.num_nodes, 2, 2))
    labels = np.array([[[0, 5], [18, 255]]])
    for fn in LOSSES:
        _, grad = adapter.value_and_grad(fn, x, labels, h, reduction="sum")
        np.testing.assert_allclose(f64(grad), oracle_grad(fn, x, labels, h, reduction="sum"), atol=1e-12)


# ---------------------------------------------------------------------------- targets
@given(data=st.data())
def test_expand_targets(adapter, data):
    h, _, labels = data.draw(cases())
    targets, mask = adapter.expand_targets(labels, h, 255)
    want_t, want_m = oracle.expand_targets(labels, h)
    np.testing.assert_array_equal(np.asarray(targets).astype(np.uint8), want_t)
    np.testing.assert_array_equal(np.asarray(mask).astype(bool), want_m)


# ---------------------------------------------------------------------------- decoding
def _check_decoder(adapter, h, x, method, exact):
    leaf, depth = adapter.decode(x, h, method)
    leaf, depth = np.asarray(leaf).astype(np.int64), np.asarray(depth).astype(np.int64)
    want_leaf, want_depth = oracle.decode(f64(x), h, method)
    assert leaf.shape == want_leaf.shape and depth.shape == want_depth.shape
    np.testing.assert_array_equal(depth[:, -1], leaf)
    if method != "independent":
        assert_consistent(depth, h)
        assert h.is_leaf[h.channel_of[leaf]].all()
    if exact:
        np.testing.assert_array_equal(leaf, want_leaf)
        np.testing.assert_array_equal(depth, want_depth)
    return leaf, depth


@given(data=st.data())
def test_decode_matches_brute_force(adapter, data):
    ties = data.draw(st.booleans())
    h, x, _ = data.draw(cases(ties=ties))
    method = data.draw(st.sampled_from(METHODS))
    # Integer-valued logits make path sums exact, so ties are real ties; hssn sums probabilities
    # (rounding may break a tie either way), so there the pick only has to be optimal.
    exact = method != "hssn" or not ties
    leaf, _ = _check_decoder(adapter, h, x, method, exact)
    if method == "hssn":
        for pix in oracle.pixels(leaf.shape):
            scores = oracle.leaf_scores(x, h, pix, "hssn")
            assert scores[int(h.channel_of[leaf[pix]])] >= max(scores.values()) - 1e-12


@given(data=st.data())
def test_decode_tie_rule(adapter, data):
    """Integer logits and a shuffled layout: ties are frequent and go to the lowest channel."""
    h, x, _ = data.draw(cases(ties=True))
    h = h.with_order(list(data.draw(st.permutations(range(h.num_nodes)))))
    method = data.draw(st.sampled_from(["path", "top_down", "independent"]))
    _check_decoder(adapter, h, x, method, exact=True)


@given(data=st.data())
def test_decode_low_precision_is_optimal(adapter, data):
    h, x64, _ = data.draw(cases())
    dtype = data.draw(st.sampled_from(adapter.dtypes))
    x = as_dtype(x64, dtype)
    method = data.draw(st.sampled_from(["path", "hssn"]))
    leaf, _ = _check_decoder(adapter, h, x, method, exact=False)
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}[dtype]
    for pix in oracle.pixels(leaf.shape):
        scores = oracle.leaf_scores(f64(x), h, pix, method)
        best = max(scores.values())
        assert scores[int(h.channel_of[leaf[pix]])] >= best - tol * max(1.0, abs(best))


def test_decode_path_beats_greedy_example(adapter):
    """A strong depth-1 node with weak children loses to a slightly weaker node with a strong child."""
    h = presets.pascal_person_part()
    x = np.full((1, h.num_nodes), -5.0)
    person, upper, lower = h.channel("person"), h.channel("upper body"), h.channel("lower body")
    bg_top, bg_mid, bg_leaf = (
        h.channel("background (person)"),
        h.channel("background (part)"),
        h.channel("background"),
    )
    x[0, [bg_top, bg_mid, bg_leaf]] = [2.0, 0.0, 0.0]
    x[0, [person, upper, h.channel("head")]] = [1.5, 3.0, 3.0]
    x[0, lower] = -1.0
    path_leaf, _ = adapter.decode(x, h, "path")
    greedy_leaf, _ = adapter.decode(x, h, "top_down")
    assert int(np.asarray(path_leaf)[0]) == 1  # head
    assert int(np.asarray(greedy_leaf)[0]) == 0  # background


# ---------------------------------------------------------------------------- triplet loss
@st.composite
def triplet_cases(draw):
    h = draw(trees())
    b = draw(st.integers(1, 2))
    hw = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    # label maps a little larger or smaller than the embeddings: nearest down- and upsampling
    big = tuple(max(1, s * draw(st.integers(1, 2)) + draw(st.integers(-1, 1))) for s in hw)
    labels = draw(label_maps(h, (b, *big), ignore_fraction=None, partial_fraction=None))
    emb = np.random.default_rng(draw(st.integers(0, 2**31))).normal(size=(b, draw(st.integers(1, 4)), *hw))
    return h, emb, labels


@given(data=st.data())
def test_triplet_first_matches_oracle(adapter, data):
    h, emb, labels = data.draw(triplet_cases())
    kw = dict(
        sampling="first",
        max_per_class=data.draw(st.sampled_from([1, 2, 200])),
        base_margin=data.draw(st.sampled_from([0.1, 0.3])),
    )
    got = adapter.hierarchy_triplet_loss(emb, labels, h, **kw)
    want = oracle.triplet_loss_first(
        emb, labels, h, max_per_class=kw["max_per_class"], base_margin=kw["base_margin"]
    )
    assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12)


@given(data=st.data())
def test_triplet_gradient_matches_finite_differences(adapter, data):
    need_grad(adapter)
    h, emb, labels = data.draw(triplet_cases())
    kw = dict(sampling="first", max_per_class=2, base_margin=0.1)
    value, grad = adapter.triplet_value_and_grad(emb, labels, h, **kw)
    assert np.shape(grad) == emb.shape
    want = np.zeros(emb.shape)
    eps = 1e-6
    for i in np.ndindex(*emb.shape):
        up, down = emb.copy(), emb.copy()
        up[i] += eps
        down[i] -= eps
        want[i] = (
            oracle.triplet_loss_first(up, labels, h, max_per_class=2)
            - oracle.triplet_loss_first(down, labels, h, max_per_class=2)
        ) / (2 * eps)
    assert math.isclose(
        float(value), oracle.triplet_loss_first(emb, labels, h, max_per_class=2), rel_tol=1e-9, abs_tol=1e-12
    )
    np.testing.assert_allclose(f64(grad), want, atol=1e-5)


def test_triplet_weight(adapter):
    for step, total in [(0, 10), (1, 10), (5, 10), (9, 10), (10, 10), (25, 10), (3, 7)]:
        assert math.isclose(
            adapter.triplet_weight(step, total), oracle.triplet_weight(step, total), abs_tol=1e-12
        )
    assert adapter.triplet_weight(0, 100) == pytest.approx(0.0, abs=1e-12)
    assert adapter.triplet_weight(50, 100) == pytest.approx(0.25)


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("fn", LOSSES)
def test_no_valid_pixel_gives_zero(adapter, fn):
    h = presets.pascal_person_part()
    x = np.random.default_rng(0).normal(size=(2, h.num_nodes, 3))
    labels = np.full((2, 3), 255)
    for reduction in ("mean", "sum", "hssn"):
        assert float(f64(getattr(adapter, fn)(x, labels, h, reduction=reduction))) == 0.0
        if adapter.supports_grad:
            value, grad = adapter.value_and_grad(fn, x, labels, h, reduction=reduction)
            assert float(f64(value)) == 0.0 and not np.any(f64(grad))
    assert not np.any(f64(getattr(adapter, fn)(x, labels, h, reduction="none")))


def test_no_triplet_gives_zero(adapter):
    h = presets.cityscapes()
    emb = np.random.default_rng(0).normal(size=(1, 4, 2, 2))
    for labels in (np.full((1, 2, 2), 255), np.zeros((1, 2, 2), dtype=np.int64), np.full((1, 2, 2), 20)):
        assert adapter.hierarchy_triplet_loss(emb, labels, h, sampling="first") == 0.0
        if adapter.supports_grad:
            value, grad = adapter.triplet_value_and_grad(emb, labels, h, sampling="first")
            assert value == 0.0 and not np.any(f64(grad))


def test_inputs_not_mutated(adapter):
    h = presets.cityscapes()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, h.num_nodes, 3, 3))
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 3))
    labels[0, 0] = 255
    weight = rng.uniform(size=h.num_nodes)
    emb = rng.normal(size=(2, 5, 3, 3))
    saved = [a.copy() for a in (x, labels, weight, emb)]
    for fn in LOSSES:
        for reduction in REDUCTIONS:
            getattr(adapter, fn)(x, labels, h, reduction=reduction, node_weight=weight)
            if adapter.supports_grad:
                adapter.value_and_grad(fn, x, labels, h, reduction=reduction, node_weight=weight)
    for method in METHODS:
        adapter.decode(x, h, method)
    adapter.expand_targets(labels, h, 255)
    leaf_labels = np.where(labels < h.num_leaves, labels, 255)
    saved[1] = labels.copy()
    adapter.hierarchy_triplet_loss(emb, leaf_labels, h, sampling="first")
    if adapter.supports_grad:
        adapter.triplet_value_and_grad(emb, leaf_labels, h, sampling="first")
    for before, after in zip(saved, (x, labels, weight, emb), strict=False):
        np.testing.assert_array_equal(before, after)
    assert (leaf_labels == 255).any()


def _raises(call, *needles, types=(ValueError, TypeError)):
    """Raises one of ``types`` naming every needle (tests/conformance/test_conformance_inputs.py checks that
    every backend raises the same type and message)."""
    with pytest.raises(types) as info:
        call()
    message = str(info.value).lower()
    for needle in needles:
        assert needle.lower() in message, f"{needle!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("fn", LOSSES)
def test_bad_input_raises(adapter, fn):
    h = presets.cityscapes()
    loss = getattr(adapter, fn)
    x = np.zeros((2, h.num_nodes, 3, 4))
    labels = np.zeros((2, 3, 4), dtype=np.int64)
    _raises(lambda: loss(np.zeros((2, h.num_nodes - 1, 3, 4)), labels, h), "channel")
    _raises(lambda: loss(x, np.zeros((2, 4, 3), dtype=np.int64), h), "shape")
    _raises(lambda: loss(x, np.zeros((2, 3, 4, 1), dtype=np.int64), h), "shape")
    bad = labels.copy()
    bad[0, 0, 0], bad[1, 2, 3] = 26, 300
    _raises(lambda: loss(x, bad, h), "26", "300")
    neg = labels.copy()
    neg[0, 1, 1] = -3
    _raises(lambda: loss(x, neg, h), "-3")
    _raises(lambda: loss(x, labels.astype(np.float32), h), "int")
    _raises(lambda: loss(x, labels.astype(bool), h), "int", "bool")
    _raises(lambda: loss(x, labels, h, reduction="average"), "average")
    _raises(lambda: loss(x, labels, h, node_weight=np.ones(5)), "node_weight")
    _raises(lambda: loss(x, labels, h, ignore_index=3), "ignore_index")
    if fn == "focal_tree_min_loss":
        _raises(lambda: loss(x, labels, h, gamma=-1.0), "gamma")
        _raises(lambda: loss(x, labels, h, gamma=math.inf), "gamma", "finite")


def test_bad_decode_input_raises(adapter):
    h = presets.cityscapes()
    _raises(lambda: adapter.decode(np.zeros((1, 25, 2, 2)), h, "path"), "channel")
    _raises(lambda: adapter.decode(np.zeros((1, 26, 2, 2)), h, "greedy"), "greedy")


def test_bad_triplet_input_raises(adapter):
    h = presets.cityscapes()
    emb = np.zeros((1, 4, 2, 2))
    _raises(lambda: adapter.hierarchy_triplet_loss(emb, np.full((1, 2, 2), 40), h), "40")
    _raises(lambda: adapter.hierarchy_triplet_loss(emb, np.zeros((1, 2, 2)), h), "int")
    _raises(
        lambda: adapter.hierarchy_triplet_loss(emb, np.zeros((1, 2, 2), dtype=np.int64), h, sampling="best"),
        "best",
    )
