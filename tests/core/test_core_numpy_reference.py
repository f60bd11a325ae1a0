"""numpy-specific tests: the oracle's gradient, published parity, dtypes, triplet sampling, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st

import hieraloss.numpy as hnp
from hieraloss import LabelError, presets
from hieraloss.core.plan import plan_for
from hieraloss.numpy.losses import zmin_zmax
from hieraloss.testing import hierarchies, label_maps, logits


@st.composite
def cases(draw, max_depth=3):
    h = draw(hierarchies(max_depth=max_depth, max_children=3, order=None))
    shape = draw(st.sampled_from([(2,), (1, 3), (2, 2, 3), (1, 1, 2, 3)]))
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = draw(logits(h, shape, scale=3.0))
    return h, x, labels


# ---------------------------------------------------------------------------- level sweeps
@given(data=st.data())
def test_level_sweeps_equal_padded_tables(data):
    h, x, _ = data.draw(cases())
    zmin, zmax = zmin_zmax(x, plan_for(h))
    np.testing.assert_array_equal(zmin, x[:, h.ancestor_table].min(axis=2))
    np.testing.assert_array_equal(zmax, x[:, h.descendant_table].max(axis=2))


# ---------------------------------------------------------------------------- the oracle's gradient
@given(data=st.data())
def test_oracle_gradient_matches_finite_differences(data):
    """The conformance suite trusts oracle.tree_min_grad; check it against the numpy forward."""
    h, x, labels = data.draw(cases())
    gamma = data.draw(st.sampled_from([None, 0.0, 0.5, 2.0]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "hssn", "none"]))
    weight = np.random.default_rng(data.draw(st.integers(0, 9))).uniform(0.5, 2.0, h.num_nodes)
    upstream = np.random.default_rng(1).normal(size=x.shape) if reduction == "none" else None

    def f(z):
        kw = dict(reduction=reduction, node_weight=weight)
        val = (
            hnp.tree_min_loss(z, labels, h, **kw)
            if gamma is None
            else hnp.focal_tree_min_loss(z, labels, h, gamma=gamma, **kw)
        )
        return float(np.sum(val * (1.0 if upstream is None else upstream)))

    grad = oracle.tree_min_grad(
        x, labels, h, gamma=gamma, reduction=reduction, node_weight=weight, upstream=upstream
    )
    eps = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        numeric[i] = (f(up) - f(down)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_oracle_tie_rule_by_hand():
    """Chain a -> b -> leaf with equal logits: positives route to a (shallowest), negatives of a to a."""
    h = hnp_chain()
    x = np.zeros((1, 3))
    # label = leaf 0 (channel 0), channels: 0 leaf, 1 middle, 2 top (default layout).
    grad = oracle.tree_min_grad(x, np.array([0]), h, reduction="sum")
    # All three nodes are positive; each min over A(v) is tied and goes to the top node.
    assert grad[0, 2] == pytest.approx(3 * -0.5) and grad[0, 0] == 0 and grad[0, 1] == 0
    # Label = the other top-level leaf: the chain is negative; every max goes to its first pre-order node.
    grad = oracle.tree_min_grad(np.zeros((1, 4)), np.array([1]), hnp_chain(extra_leaf=True), reduction="sum")
    assert (
        grad[0, 0] == pytest.approx(0.5)
        and grad[0, 2] == pytest.approx(0.5)
        and grad[0, 3] == pytest.approx(0.5)
    )
    assert grad[0, 1] == pytest.approx(-0.5)


def test_oracle_tie_rule_children_in_channel_order():
    """Leaves 0 and 1 under node 3, leaf 2 at depth 1; label 2 makes node 3 negative and its max
    over D(3) ties between the two children: the one with the lower channel takes it."""
    from hieraloss import Hierarchy

    x = np.array([[0.0, 0.0, 0.0, -1.0]])  # channels; the last is node 3 in both layouts
    for order, winner in (([0, 1, 2, 3], 0), ([1, 0, 2, 3], 0)):
        h = Hierarchy.from_parents([3, 3, -1, -1], order=order)
        grad = oracle.tree_min_grad(x, np.array([2]), h, reduction="sum")
        assert grad[0, winner] == pytest.approx(1.0) and grad[0, 1 - winner] == pytest.approx(0.5)
        assert grad[0, 3] == 0


def hnp_chain(extra_leaf=False):
    from hieraloss import Hierarchy

    if extra_leaf:  # leaf 0 under node 2 under node 3; leaf 1 at depth 1
        return Hierarchy.from_parents([2, -1, 3, -1], order=[0, 1, 3, 2])
    return Hierarchy.from_parents([1, 2, -1])


# ---------------------------------------------------------------------------- published parity
@pytest.mark.parametrize("batch", [1, 2])
def test_hssn_reduction_matches_published_formula(batch):
    h = presets.cityscapes()
    rng = np.random.default_rng(batch)
    x = rng.normal(0.0, 2.0, size=(batch, h.num_nodes, 6, 7))
    labels = rng.integers(0, 19, size=(batch, 6, 7))
    labels[rng.random(labels.shape) < 0.2] = 255
    saved = labels.copy()
    published = oracle.published_cityscapes_hssn(x, labels)
    ours = float(hnp.tree_min_loss(x, labels, h, reduction="hssn"))
    assert ours == pytest.approx(published, rel=1e-5)
    np.testing.assert_array_equal(labels, saved)


def test_mapillary_matches_oracle():
    """Depth-4, unbalanced, 149 channels."""
    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, size=(2, h.num_nodes, 2))
    labels = np.array([[0, 123], [130, 255]])
    for reduction in ("mean", "hssn", "none"):
        for gamma in (None, 2.0):
            want = oracle.tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction)
            got = (
                hnp.tree_min_loss(x, labels, h, reduction=reduction)
                if gamma is None
                else hnp.focal_tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction)
            )
            np.testing.assert_allclose(got, want, rtol=1e-12)
    for method in [m for m in hnp.DECODE_METHODS if m != "logic"]:  # logic: the conformance suite
        got = hnp.decode(x, h, method)
        want = oracle.decode(x, h, method)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# ---------------------------------------------------------------------------- dtypes, finiteness
@pytest.mark.parametrize(
    "dtype,out", [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)]
)
def test_result_dtypes(dtype, out):
    h = presets.pascal_person_part()
    x = np.random.default_rng(0).normal(size=(2, h.num_nodes, 3)).astype(dtype)
    labels = np.array([[0, 3, 9], [255, 6, 1]])
    for reduction in hnp.REDUCTIONS:
        assert np.asarray(hnp.tree_min_loss(x, labels, h, reduction=reduction)).dtype == out
    leaf, depth = hnp.decode(x, h)
    assert leaf.dtype == np.int64 and depth.dtype == np.int64 and depth.shape == (2, 3, 3)
    emb = np.random.default_rng(1).normal(size=(2, 4, 3, 1)).astype(dtype)
    assert np.asarray(hnp.hierarchy_triplet_loss(emb, labels[..., None], h, sampling="first")).dtype == out


def test_float16_is_accumulated_in_float32():
    h = presets.cityscapes()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h.num_nodes, 40, 40)).astype(np.float16)
    labels = rng.integers(0, 19, size=(2, 40, 40))
    got = hnp.tree_min_loss(x, labels, h, reduction="sum")
    want = hnp.tree_min_loss(x.astype(np.float64), labels, h, reduction="sum")
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value")
def test_check_finite():
    h = presets.pascal_person_part()
    x = np.zeros((1, h.num_nodes, 2))
    x[0, 3, 1] = np.nan
    x[0, 4, 0] = np.inf
    labels = np.array([[0, 1]])
    with pytest.raises(ValueError, match="2 non-finite"):
        hnp.tree_min_loss(x, labels, h, check_finite=True)
    with pytest.raises(ValueError, match="non-finite"):
        hnp.focal_tree_min_loss(x, labels, h, check_finite=True)
    assert np.isnan(hnp.tree_min_loss(x, labels, h))  # default: propagates, no check


def test_extreme_logits_stay_finite():
    h = presets.cityscapes()
    x = np.full((1, h.num_nodes, 2), 1e4)
    x[:, :, 1] = -1e4
    labels = np.array([[3, 3]])
    # pixel 0: 24 negatives at softplus(1e4); pixel 1: 2 positives at softplus(1e4); the rest 0.
    for fn in (hnp.tree_min_loss, hnp.focal_tree_min_loss):
        assert fn(x, labels, h, reduction="sum") == pytest.approx(26e4, rel=1e-12)


def test_expand_targets_is_the_hierarchy_method():
    h = presets.lip()
    labels = np.array([[0, 5, 20, 21, 255], [24, 1, 2, 22, 23]])
    got = hnp.expand_targets(labels, h)
    want = h.expand_targets(labels)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(TypeError, match="Hierarchy"):
        hnp.expand_targets(labels, "lip")


def test_bad_logits_dtype_and_rank():
    h = presets.cityscapes()
    with pytest.raises(TypeError, match="float"):
        hnp.tree_min_loss(np.zeros((1, 26), dtype=np.int64), np.zeros(1, dtype=np.int64), h)
    with pytest.raises(ValueError, match="shape"):
        hnp.tree_min_loss(np.zeros(26), np.zeros((), dtype=np.int64), h)
    with pytest.raises(TypeError, match="gamma"):
        hnp.focal_tree_min_loss(np.zeros((1, 26)), np.zeros(1, dtype=np.int64), h, gamma="two")


def test_peak_memory_is_linear_in_nodes():
    """No [B, N, N, ...] or [B, N, Dmax, ...] temporaries: peak extra memory is a few logits' worth."""
    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, h.num_nodes, 32, 32))
    labels = rng.integers(0, h.num_leaves, size=(1, 32, 32))
    hnp.tree_min_loss(x, labels, h)  # warm the level-plan cache
    tracemalloc.start()
    hnp.focal_tree_min_loss(x, labels, h, reduction="hssn")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 12 * x.nbytes, peak / x.nbytes  # an N x N temporary alone would be 149 logits


# ---------------------------------------------------------------------------- triplets
def test_margin_published_two_level_case():
    h = presets.cityscapes()
    # road (0) / sidewalk (1) are siblings, building (2) a cousin: m = 0.1 + (4 - 2) / 4.
    assert hnp.triplet_margin(h, [0], [1], [2]) == pytest.approx([0.6])
    p = presets.lip()
    # LIP depth 3: hat (1) and hair (2) siblings; background (0) is 6 edges from hat.
    assert hnp.triplet_margin(p, [1], [2], [0]) == pytest.approx([0.1 + (6 - 2) / 6])
    with pytest.raises(LabelError, match="19"):
        hnp.triplet_margin(h, [19], [1], [2])


@given(data=st.data())
def test_margin_matches_path_walking(data):
    h = data.draw(hierarchies(max_depth=4, order=None))
    k = h.num_leaves
    a, p, n = (np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=6))) for _ in range(3))
    m = min(a.size, p.size, n.size)
    got = hnp.triplet_margin(h, a[:m], p[:m], n[:m], base_margin=0.2)
    want = [oracle.margin(h, int(a[i]), int(p[i]), int(n[i]), 0.2) for i in range(m)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@st.composite
def small_label_maps(draw):
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return h, draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))


@given(data=st.data())
def test_sample_first_matches_oracle(data):
    h, labels = data.draw(small_label_maps())
    k = data.draw(st.sampled_from([1, 3, 200]))
    got = hnp.sample_triplets(labels, h, max_per_class=k, sampling="first")
    want = oracle.first_triplets(labels, h, k)
    trips = [t for _, ts in want for t in ts]
    assert [tuple(int(v) for v in t) for t in zip(*got[:3], strict=False)] == trips
    flat = labels.reshape(-1)
    for idx, cls in zip(got[:3], got[3:], strict=False):
        np.testing.assert_array_equal(flat[idx], cls)


@given(data=st.data())
def test_sample_random_is_valid_and_reproducible(data):
    h, labels = data.draw(small_label_maps())
    k = data.draw(st.sampled_from([1, 2, 200]))
    seed = data.draw(st.integers(0, 1000))
    got = hnp.sample_triplets(labels, h, max_per_class=k, sampling="random", generator=seed)
    again = hnp.sample_triplets(labels, h, max_per_class=k, generator=np.random.default_rng(seed))
    for a, b in zip(got, again, strict=False):
        np.testing.assert_array_equal(a, b)
    ai, pi, ni, ac, pc, nc = got
    flat = labels.reshape(-1)
    parent = h.parent[h.leaf_channels]
    np.testing.assert_array_equal(flat[ai], ac)
    np.testing.assert_array_equal(flat[pi], pc)
    np.testing.assert_array_equal(flat[ni], nc)
    assert (ac != pc).all() and (parent[ac] == parent[pc]).all() and (parent[ac] != parent[nc]).all()
    # Per class: the same counts as the first-K rule, no pixel drawn twice within a role.
    first = {c: len(ts) for c, ts in oracle.first_triplets(labels, h, k)}
    classes, counts = np.unique(ac, return_counts=True)
    assert dict(zip(classes.tolist(), counts.tolist(), strict=False)) == first
    for c in classes:
        for idx in (ai, pi, ni):
            chosen = idx[ac == c]
            assert np.unique(chosen).size == chosen.size


def test_sampling_random_differs_from_first_and_seeds_differ():
    h = presets.cityscapes()
    labels = np.repeat(np.arange(19), 20).reshape(1, 19, 20)
    first = hnp.sample_triplets(labels, h, max_per_class=5, sampling="first")
    r1 = hnp.sample_triplets(labels, h, max_per_class=5, generator=1)
    r2 = hnp.sample_triplets(labels, h, max_per_class=5, generator=2)
    assert not np.array_equal(first[0], r1[0]) and not np.array_equal(r1[0], r2[0])
    assert first[0].size == r1[0].size == 5 * 18  # sky (10) has no sibling


def test_sampling_arguments_are_checked():
    h = presets.cityscapes()
    labels = np.zeros((1, 2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="max_per_class"):
        hnp.sample_triplets(labels, h, max_per_class=0)
    with pytest.raises(ValueError, match="sampling"):
        hnp.sample_triplets(labels, h, sampling="last")
    with pytest.raises(TypeError, match="generator"):
        hnp.sample_triplets(labels, h, generator="seed")


@given(data=st.data())
def test_random_loss_with_everything_taken_matches_oracle(data):
    """When K exceeds every set, the random rule pairs a permutation; recompute it with the oracle."""
    h, labels = data.draw(small_label_maps())
    emb = np.random.default_rng(data.draw(st.integers(0, 99))).normal(
        size=(labels.shape[0], 3, *labels.shape[1:])
    )
    got = hnp.hierarchy_triplet_loss(emb, labels, h, generator=7)
    ai, pi, ni, ac, _, _ = hnp.sample_triplets(labels, h, generator=7)
    by_class = [
        (int(c), list(zip(ai[ac == c].tolist(), pi[ac == c].tolist(), ni[ac == c].tolist(), strict=False)))
        for c in np.unique(ac)
    ]
    assert float(got) == pytest.approx(
        oracle.triplet_loss_from(emb, labels, h, by_class), rel=1e-9, abs=1e-12
    )


@given(data=st.data())
def test_resize_matches_oracle(data):
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    size = (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    labels = np.random.default_rng(0).integers(0, 50, size=shape)
    np.testing.assert_array_equal(
        hnp.resize_labels_nearest(labels, size), oracle.resize_nearest(labels, size)
    )


def test_resize_matches_torch_where_exact_floor_does_not():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    labels = np.arange(2 * 62 * 26).reshape(2, 62, 26)
    for size in [(14, 22), (28, 22), (62, 26), (31, 13), (100, 40), (7, 3)]:
        want = F.interpolate(torch.from_numpy(labels)[:, None].double(), size=size, mode="nearest")[
            :, 0
        ].long()
        np.testing.assert_array_equal(hnp.resize_labels_nearest(labels, size), want.numpy())


def test_triplet_weight_bounds():
    assert hnp.triplet_weight(0, 10) == 0.0
    assert hnp.triplet_weight(10, 10) == 0.5
    ramp = [hnp.triplet_weight(t, 50) for t in range(51)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:], strict=False))
    with pytest.raises(ValueError, match="total_steps"):
        hnp.triplet_weight(1, 0)
    with pytest.raises(ValueError, match="step"):
        hnp.triplet_weight(-1, 10)


def test_triplet_inputs_checked():
    h = presets.cityscapes()
    with pytest.raises(ValueError, match="labels must be"):
        hnp.hierarchy_triplet_loss(np.zeros((1, 4, 2, 2)), np.zeros((1, 2), dtype=np.int64), h)
    with pytest.raises(ValueError, match="embeddings must be"):
        hnp.hierarchy_triplet_loss(np.zeros((1, 4, 2)), np.zeros((1, 2), dtype=np.int64), h)
    with pytest.raises(TypeError, match="float"):
        hnp.hierarchy_triplet_loss(
            np.zeros((1, 4, 2, 2), dtype=np.int32), np.zeros((1, 2, 2), dtype=np.int64), h
        )
