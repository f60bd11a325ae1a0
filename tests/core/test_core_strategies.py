"""hieraloss.testing: the strategies produce what they promise; assert_consistent catches bad maps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hieraloss import Hierarchy, presets
from hieraloss.testing import assert_consistent, hierarchies, label_maps, logits


def leaf_depths(h):
    return {int(h.depth[c]) for c in h.leaf_channels}


@given(hierarchies(max_depth=4, balanced=True))
def test_balanced_trees(h):
    assert len(leaf_depths(h)) == 1 and h.max_depth <= 4


@given(hierarchies(max_depth=3, balanced=False))
def test_unbalanced_trees(h):
    assert len(leaf_depths(h)) >= 2 and 2 <= h.max_depth <= 3


@given(hierarchies(max_depth=3, min_depth=3, max_children=2))
def test_depth_bounds_and_fan_out(h):
    assert h.max_depth == 3
    assert max(len(c) for c in h.children) <= 2


@given(hierarchies(order="coarse_to_fine"))
def test_fixed_order(h):
    assert (np.diff(h.depth) >= 0).all()


@given(hierarchies(order="default"))
def test_default_order(h):
    # Leaves in id order, then internal nodes deepest first (by id within a depth). Internal ids are
    # drawn in tree order, so channel == node id is not promised for internal nodes.
    k = h.num_leaves
    np.testing.assert_array_equal(h.node_ids[:k], np.arange(k))
    internal = h.node_ids[k:]
    assert sorted(internal.tolist(), key=lambda i: (-h.depth[h.channel_of[i]], i)) == internal.tolist()


def test_random_orders_cover_all_layouts():
    seen = set()

    @given(hierarchies(max_depth=3, min_depth=2, order=None))
    def collect(h):
        default = np.array_equal(h.node_ids, np.arange(h.num_nodes))
        seen.add("default" if default else ("c2f" if (np.diff(h.depth) >= 0).all() else "other"))

    collect()
    assert {"default", "other"} <= seen


def test_unbalanced_needs_depth_two():
    @given(hierarchies(max_depth=1, balanced=False))
    def draw(h):
        pass

    with pytest.raises(ValueError, match="max_depth >= 2"):
        draw()


@given(st.data())
def test_label_maps_values_shape_dtype(data):
    h = data.draw(hierarchies(max_depth=3))
    shape = data.draw(st.sampled_from([(2,), (1, 3, 4), (2, 2, 2, 3)]))
    dtype = data.draw(st.sampled_from([np.int64, np.int32, np.uint8]))
    labels = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None, dtype=dtype))
    assert labels.shape == shape and labels.dtype == dtype
    values = set(np.unique(labels).tolist())
    assert values <= set(range(h.num_nodes)) | {255}
    plain = data.draw(label_maps(h, shape))
    assert set(np.unique(plain).tolist()) <= set(range(h.num_leaves))
    via_strategy = data.draw(label_maps(h, st.just(shape)))
    assert via_strategy.shape == shape


def test_label_map_fractions_are_roughly_right():
    h = presets.cityscapes()

    @given(label_maps(h, (4, 50, 50), ignore_fraction=0.3, partial_fraction=0.4, ignore_index=250))
    def check(labels):
        ignored = (labels == 250).mean()
        partial = (labels >= h.num_leaves).mean() - ignored
        assert abs(ignored - 0.3) < 0.03
        assert abs(partial - 0.7 * 0.4) < 0.03  # partial labels are drawn among the non-ignored pixels

    check()


@given(st.data())
def test_logits_shape_dtype_and_ties(data):
    h = data.draw(hierarchies(max_depth=3))
    dtype = data.draw(st.sampled_from([np.float64, np.float32, np.float16]))
    x = data.draw(logits(h, (2, 3, 5), dtype=dtype))
    assert x.shape == (2, h.num_nodes, 3, 5) and x.dtype == dtype
    tied = data.draw(logits(h, (2, 40), ties=True))
    assert np.array_equal(tied, np.round(tied))
    assert np.unique(tied).size < tied.size // 4  # many repeats


def test_assert_consistent():
    h = presets.pascal_person_part()
    leaves = np.array([[0, 1, 5, 6]])
    good = np.stack([h.labels_at_depth(leaves, d) for d in (1, 2, 3)], axis=1)
    assert_consistent(good, h)
    ignored = good.copy()
    ignored[0, :, 1] = 255
    assert_consistent(ignored, h)
    bad = good.copy()
    bad[0, 1, 2] = h.node_ids[h.channel("upper body")]  # upper leg under "upper body": not a path
    with pytest.raises(AssertionError, match="1 of 4 pixels"):
        assert_consistent(bad, h)
    partly_ignored = good.copy()
    partly_ignored[0, 0, 3] = 255
    with pytest.raises(AssertionError, match="not a path"):
        assert_consistent(partly_ignored, h)
    internal_leaf = good.copy()
    internal_leaf[0, 2, 0] = h.node_ids[h.channel("background (part)")]
    with pytest.raises(AssertionError):
        assert_consistent(internal_leaf, h)


def test_assert_consistent_unbalanced():
    h = Hierarchy.from_dict({"a": {"x": 0, "y": 1}, "z": 2})
    assert_consistent(np.array([[[3, 2], [0, 2]]]), h)  # [B, L, W]: a/x, and the shallow leaf z repeated
    with pytest.raises(AssertionError):
        assert_consistent(np.array([[[3, 2], [2, 2]]]), h)


def test_assert_consistent_never_converts_a_device_tensor_with_numpy():
    """A CUDA tensor cannot be turned into numpy directly (the H100 run failed there): tensors go
    through .detach().cpu() first."""
    torch = pytest.importorskip("torch")
    h = presets.cityscapes()
    paths = torch.tensor(h.ancestor_table[h.channel_of[[0, 5, 18]]].T.reshape(1, 2, 3))

    class DeviceTensor:  # behaves like a CUDA tensor: __array__ raises, .detach().cpu() works
        def __array__(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def detach(self):
            return paths

    assert_consistent(DeviceTensor(), h)
    bad = paths.clone()
    bad[0, 0, 0] = 21  # road's depth-1 class is flat (19), not object (21)
    with pytest.raises(AssertionError, match="not a path"):
        assert_consistent(bad, h)
