"""hieraloss.metrics against a naive per-pixel oracle written here (tree walked through parents)."""

from __future__ import annotations

import contextlib
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hieraloss.metrics as metrics_module
from hieraloss import Hierarchy, LabelError, presets
from hieraloss.metrics import HierarchicalSegMetrics
from hieraloss.testing import hierarchies, label_maps

# ---------------------------------------------------------------------------- naive oracle


def ancestors(h, v):
    """A(v) as node ids, root-first, by walking parent pointers."""
    out, ch = [], int(h.channel_of[v])
    while ch >= 0:
        out.append(int(h.node_ids[ch]))
        ch = int(h.parent[ch])
    return out[::-1]


def classes_at_depth(h, d):
    """Nodes at depth d plus leaves shallower than d, in channel order."""
    nodes = [v for v in range(h.num_nodes)
             if len(ancestors(h, v)) == d or (v < h.num_leaves and len(ancestors(h, v)) < d)]
    return sorted(nodes, key=lambda v: int(h.channel_of[v]))


def label_at_depth(h, v, d):
    """Class of node v at depth d; None when v is a partial label shallower than d."""
    a = ancestors(h, v)
    if len(a) >= d:
        return a[d - 1]
    return v if v < h.num_leaves else None


class Oracle:
    def __init__(self, h, ignore_index=255):
        self.h, self.ignore = h, ignore_index
        self.L = h.max_depth
        self.conf = [dict() for _ in range(self.L)]
        self.valid = self.consistent = self.mistakes = self.severity = 0
        self.inter = self.pred_size = self.true_size = 0

    def update(self, pred, target):
        h, L = self.h, self.L
        pred, target = np.asarray(pred), np.asarray(target)
        per_depth = pred.ndim == target.ndim + 1
        for idx in np.ndindex(*target.shape):
            t = int(target[idx])
            if t == self.ignore:
                continue
            self.valid += 1
            if per_depth:
                pl = [int(pred[(idx[0], d, *idx[1:])]) for d in range(L)]
                leaf = pl[-1]
                ok = leaf < h.num_leaves and all(pl[d] == label_at_depth(h, leaf, d + 1) for d in range(L))
                pred_set = set(pl)
            else:
                leaf = int(pred[idx])
                pl = [label_at_depth(h, leaf, d + 1) for d in range(L)]
                ok = True
                pred_set = set(ancestors(h, leaf))
            self.consistent += ok
            for d in range(L):
                tl = label_at_depth(h, t, d + 1)
                if tl is not None:
                    self.conf[d][(tl, pl[d])] = self.conf[d].get((tl, pl[d]), 0) + 1
            at = ancestors(h, t)
            if t < h.num_leaves and leaf != t:
                ap = ancestors(h, leaf)
                common = 0
                while common < min(len(at), len(ap)) and at[common] == ap[common]:
                    common += 1
                self.mistakes += 1
                self.severity += len(at) - common
            known = L if t < h.num_leaves else len(at)
            pred_set = {u for u in pred_set if len(ancestors(h, u)) <= known}
            self.inter += len(pred_set & set(at))
            self.pred_size += len(pred_set)
            self.true_size += len(at)

    def confusion(self, d):
        cls = classes_at_depth(self.h, d)
        m = np.zeros((len(cls), len(cls)), dtype=np.int64)
        for (a, b), c in self.conf[d - 1].items():
            m[cls.index(a), cls.index(b)] += c
        return cls, m

    def results(self):
        h = self.h
        per_depth = []
        for d in range(1, self.L + 1):
            cls, m = self.confusion(d)
            ious = {}
            for i, v in enumerate(cls):
                tp = m[i, i]
                union = m[i, :].sum() + m[:, i].sum() - tp
                ious[h.node_names[h.channel_of[v]]] = tp / union if union else math.nan
            present = [x for x in ious.values() if not math.isnan(x)]
            total = m.sum()
            per_depth.append(dict(iou=ious, miou=sum(present) / len(present) if present else math.nan,
                                  pixel_accuracy=np.trace(m) / total if total else math.nan,
                                  num_pixels=int(total)))
        hp = self.inter / self.pred_size if self.pred_size else math.nan
        hr = self.inter / self.true_size if self.true_size else math.nan
        hf = 2 * hp * hr / (hp + hr) if (hp + hr) > 0 else math.nan
        return dict(per_depth=per_depth,
                    consistency_rate=self.consistent / self.valid if self.valid else math.nan,
                    mistake_severity=self.severity / self.mistakes if self.mistakes else math.nan,
                    num_mistakes=self.mistakes, hierarchical_precision=hp, hierarchical_recall=hr,
                    hierarchical_f1=hf, num_pixels=self.valid)


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def assert_matches(metric, oracle):
    h = metric.hierarchy
    for d in range(1, h.max_depth + 1):
        cls, m = oracle.confusion(d)
        assert metric.class_ids(d).tolist() == cls
        np.testing.assert_array_equal(metric.confusion_matrix(d), m)
    got, want = metric.compute(), oracle.results()
    for g, w in zip(got["per_depth"], want["per_depth"], strict=True):
        assert g["iou"].keys() == w["iou"].keys()
        for name in g["iou"]:
            assert same(g["iou"][name], w["iou"][name]), name
        for key in ("miou", "pixel_accuracy"):
            assert same(g[key], w[key]), key
        assert g["num_pixels"] == w["num_pixels"]
    for key in ("consistency_rate", "mistake_severity", "hierarchical_precision", "hierarchical_recall",
                "hierarchical_f1"):
        assert same(got[key], want[key]), key
    assert got["num_mistakes"] == want["num_mistakes"]
    assert got["num_pixels"] == want["num_pixels"]


@contextlib.contextmanager
def small_chunks(size):
    """Exercise the block loop of the update with tiny blocks."""
    old = metrics_module._CHUNK
    metrics_module._CHUNK = size
    try:
        yield
    finally:
        metrics_module._CHUNK = old


# ---------------------------------------------------------------------------- strategies

shapes = st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 6))
label_dtypes = st.sampled_from([np.int64, np.int32, np.uint8, np.int16])


@st.composite
def leaf_preds(draw, h, shape, dtype=np.int64):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, h.num_leaves, size=shape).astype(dtype)


@st.composite
def per_depth_preds(draw, h, shape, dtype=np.int64):
    """Per-depth node ids: each pixel is a random leaf's path or independent per-depth classes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L = h.max_depth
    out = np.empty((shape[0], L, *shape[1:]), dtype=np.int64)
    path_mix = draw(st.floats(0, 1))
    for idx in np.ndindex(*shape):
        if rng.random() < path_mix:
            leaf = int(rng.integers(h.num_leaves))
            labels = [label_at_depth(h, leaf, d + 1) for d in range(L)]
        else:
            labels = [int(rng.choice(classes_at_depth(h, d + 1))) for d in range(L)]
        for d in range(L):
            out[(idx[0], d, *idx[1:])] = labels[d]
    return out.astype(dtype)


# ---------------------------------------------------------------------------- oracle agreement


@given(data=st.data())
def test_leaf_predictions_match_oracle(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    dtype = data.draw(label_dtypes)
    m, oracle = HierarchicalSegMetrics(h), Oracle(h)
    with small_chunks(data.draw(st.sampled_from([7, 1 << 18]))):
        for _ in range(2):
            shape = data.draw(shapes)
            target = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None, dtype=dtype))
            pred = data.draw(leaf_preds(h, shape, dtype))
            m.update(pred, target)
            oracle.update(pred, target)
    assert_matches(m, oracle)
    assert m.compute()["consistency_rate"] == 1.0 or oracle.valid == 0


@given(data=st.data())
def test_per_depth_predictions_match_oracle(data):
    h = data.draw(hierarchies(max_depth=4, order=None))
    dtype = data.draw(label_dtypes)
    m, oracle = HierarchicalSegMetrics(h), Oracle(h)
    with small_chunks(data.draw(st.sampled_from([5, 1 << 18]))):
        for _ in range(2):
            shape = data.draw(shapes)
            target = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None, dtype=dtype))
            pred = data.draw(per_depth_preds(h, shape, dtype))
            m.update(pred, target)
            oracle.update(pred, target)
    assert_matches(m, oracle)


@given(data=st.data())
def test_unbalanced_trees_match_oracle(data):
    h = data.draw(hierarchies(max_depth=4, balanced=False, order=None))
    shape = data.draw(shapes)
    target = data.draw(label_maps(h, shape, ignore_fraction=0.2, partial_fraction=0.3))
    for pred in (data.draw(leaf_preds(h, shape)), data.draw(per_depth_preds(h, shape))):
        m, oracle = HierarchicalSegMetrics(h), Oracle(h)
        m.update(pred, target)
        oracle.update(pred, target)
        assert_matches(m, oracle)


@given(data=st.data())
def test_leaf_prediction_equals_its_per_depth_expansion(data):
    h = data.draw(hierarchies(max_depth=4, order=None))
    shape = data.draw(shapes)
    target = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    pred = data.draw(leaf_preds(h, shape))
    expanded = np.stack([h.labels_at_depth(pred, d + 1) for d in range(h.max_depth)], axis=1)
    a, b = HierarchicalSegMetrics(h), HierarchicalSegMetrics(h)
    a.update(pred, target)
    b.update(expanded, target)
    np.testing.assert_array_equal(a.state(), b.state())


@given(data=st.data())
def test_merging_halves_equals_whole(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    b = data.draw(st.integers(2, 4))
    shape = (b, 3, 4)
    target = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    per_depth = data.draw(st.booleans())
    pred = data.draw(per_depth_preds(h, shape) if per_depth else leaf_preds(h, shape))
    cut = data.draw(st.integers(1, b - 1))
    whole, first, second = (HierarchicalSegMetrics(h) for _ in range(3))
    whole.update(pred, target)
    first.update(pred[:cut], target[:cut])
    second.update(pred[cut:], target[cut:])
    assert first.merge(second) is first
    np.testing.assert_array_equal(first.state(), whole.state())
    assert first.to_dict() == whole.to_dict()
    # Sequential updates are the same as one update with the whole batch.
    seq = HierarchicalSegMetrics(h)
    seq.update(pred[:cut], target[:cut])
    seq.update(pred[cut:], target[cut:])
    np.testing.assert_array_equal(seq.state(), whole.state())


# ---------------------------------------------------------------------------- hand-made cases


def test_cityscapes_by_hand():
    h = presets.cityscapes()
    # road(0) flat, sidewalk(1) flat, car(13) vehicle, person(11) human, sky(10) sky.
    target = np.array([[0, 0, 1, 13, 255, 10]])
    pred = np.array([[0, 1, 1, 11, 5, 10]])
    m = HierarchicalSegMetrics(h)
    m.update(pred, target)
    r = m.compute()
    assert r["num_pixels"] == 5
    d1, d2 = r["per_depth"]
    # Depth 1: flat 3/3, vehicle -> human wrong, sky right.
    assert d1["pixel_accuracy"] == pytest.approx(4 / 5)
    assert d1["iou"]["flat"] == 1.0 and d1["iou"]["vehicle"] == 0.0 and d1["iou"]["human"] == 0.0
    assert math.isnan(d1["iou"]["construction"])
    assert d1["miou"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    # Depth 2: road 1/(2), sidewalk 1/2, car 0, person 0, sky 1.
    assert d2["pixel_accuracy"] == pytest.approx(3 / 5)
    assert d2["iou"]["road"] == pytest.approx(0.5) and d2["iou"]["sidewalk"] == pytest.approx(0.5)
    assert d2["miou"] == pytest.approx((0.5 + 0.5 + 0 + 0 + 1) / 5)
    # Mistakes: road->sidewalk (siblings, height 1), car->person (height 2).
    assert r["num_mistakes"] == 2 and r["mistake_severity"] == pytest.approx(1.5)
    # |A| = 2 everywhere; intersections 2, 1, 2, 0, 2.
    assert r["hierarchical_precision"] == pytest.approx(7 / 10)
    assert r["hierarchical_recall"] == pytest.approx(7 / 10)
    assert r["hierarchical_f1"] == pytest.approx(7 / 10)
    assert r["consistency_rate"] == 1.0


def test_partial_targets_and_inconsistent_per_depth_by_hand():
    h = presets.cityscapes()
    flat, vehicle, human = (h.node_ids[h.channel(n)] for n in ("flat", "vehicle", "human"))
    target = np.array([[flat, flat, 13]])
    # Per-depth: (flat, road) consistent; (vehicle, road) inconsistent; (human, car) inconsistent.
    pred = np.array([[[flat, vehicle, human], [0, 0, 13]]])
    m = HierarchicalSegMetrics(h)
    m.update(pred, target)
    r = m.compute()
    assert r["consistency_rate"] == pytest.approx(1 / 3)
    d1, d2 = r["per_depth"]
    assert d1["num_pixels"] == 3 and d2["num_pixels"] == 1  # partial labels unknown at depth 2
    assert d2["pixel_accuracy"] == 1.0
    assert r["num_mistakes"] == 0  # partial targets are not scored; the car pixel is right
    # Partial flat: only depth-1 nodes count. pixel 1: {flat} & {flat} = 1 of 1; pixel 2: {vehicle}
    # vs {flat}: 0 of 1; pixel 3: {human, car} & {vehicle, car} = 1 of 2.
    assert r["hierarchical_precision"] == pytest.approx(2 / 4)
    assert r["hierarchical_recall"] == pytest.approx(2 / 4)


def test_shallow_leaf_repeated_counts_once():
    h = Hierarchy.from_dict({"a": {"x": 0, "y": 1}, "s": 2})  # leaf s at depth 1
    m = HierarchicalSegMetrics(h)
    m.update(np.array([[[2], [2]]]), np.array([[2]]))
    r = m.compute()
    assert r["hierarchical_precision"] == 1.0 and r["hierarchical_recall"] == 1.0
    assert r["consistency_rate"] == 1.0
    assert [d["pixel_accuracy"] for d in r["per_depth"]] == [1.0, 1.0]
    assert r["per_depth"][1]["classes"] == ["x", "y", "s"]


def test_empty_state_is_nan_and_json_ready():
    h = presets.pascal_person_part()
    m = HierarchicalSegMetrics(h)
    m.update(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64))
    r = m.compute()
    assert math.isnan(r["per_depth"][0]["miou"]) and math.isnan(r["hierarchical_f1"])
    d = m.to_dict()
    assert d["per_depth"][0]["miou"] is None and d["mistake_severity"] is None
    json.dumps(d, allow_nan=False)
    assert "-" in m.format_table()


def test_report_formats():
    h = presets.cityscapes()
    m = HierarchicalSegMetrics(h)
    rng = np.random.default_rng(0)
    m.update(rng.integers(0, 19, (2, 16, 16)), rng.integers(0, 19, (2, 16, 16)))
    text = m.format_table(per_class=True)
    assert "road" in text and "vehicle" in text and "mIoU" in text
    assert str(m) == m.format_table()
    d = m.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert isinstance(d["per_depth"][1]["iou"]["road"], float)
    assert "num_pixels=512" in repr(m)


# ---------------------------------------------------------------------------- inputs and state


@pytest.mark.parametrize("ignore_index", [255, -1, 100_000])
def test_ignore_index_variants_and_dtypes_agree(ignore_index):
    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(1)
    target = rng.integers(0, h.num_nodes, (2, 9, 11))
    target[rng.random(target.shape) < 0.2] = ignore_index
    pred = rng.integers(0, h.num_leaves, target.shape)
    ref = Oracle(h, ignore_index)
    ref.update(pred, target)
    m = HierarchicalSegMetrics(h, ignore_index=ignore_index)
    m.update(pred, target)
    assert_matches(m, ref)
    if ignore_index == 255:
        m8 = HierarchicalSegMetrics(h)
        m8.update(pred.astype(np.uint8), target.astype(np.uint8))
        np.testing.assert_array_equal(m8.state(), m.state())
        mixed = HierarchicalSegMetrics(h)
        mixed.update(pred.astype(np.int32), target.astype(np.uint8))
        mixed.update(pred.astype(np.uint8), target.astype(np.int16))
        np.testing.assert_array_equal(mixed.state(), 2 * m.state())


def test_inputs_not_modified_and_non_contiguous():
    h = presets.lip()
    rng = np.random.default_rng(2)
    target = rng.integers(0, h.num_nodes, (3, 8, 10))
    target[0, 0] = 255
    pred = rng.integers(0, h.num_leaves, (3, 10, 8)).transpose(0, 2, 1)
    per_depth = np.stack([h.labels_at_depth(pred, d + 1) for d in range(3)], axis=1)[..., ::-1]
    t0, p0, q0 = target.copy(), pred.copy(), per_depth.copy()
    m, ref = HierarchicalSegMetrics(h), Oracle(h)
    m.update(pred, target)
    m.update(per_depth, target[..., ::-1])
    ref.update(pred, target)
    ref.update(per_depth, target[..., ::-1])
    assert_matches(m, ref)
    for a, b in ((target, t0), (pred, p0), (per_depth, q0)):
        np.testing.assert_array_equal(a, b)


def test_torch_input_equals_numpy():
    torch = pytest.importorskip("torch")
    h = presets.cityscapes()
    rng = np.random.default_rng(3)
    target = rng.integers(0, h.num_nodes, (2, 6, 7))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, h.num_leaves, (2, 6, 7))
    per_depth = np.stack([h.labels_at_depth(pred, d + 1) for d in range(2)], axis=1)
    a, b = HierarchicalSegMetrics(h), HierarchicalSegMetrics(h)
    a.update(pred, target)
    a.update(per_depth, target)
    tt = torch.from_numpy(target)
    b.update(torch.from_numpy(pred).requires_grad_(False), tt)
    b.update(torch.from_numpy(per_depth).to(torch.uint8), tt.to(torch.uint8))
    np.testing.assert_array_equal(a.state(), b.state())
    np.testing.assert_array_equal(tt.numpy(), target)


def test_paddle_input_equals_numpy():
    paddle = pytest.importorskip("paddle")
    h = presets.pascal_person_part()
    rng = np.random.default_rng(4)
    target = rng.integers(0, h.num_nodes, (2, 5, 4))
    pred = rng.integers(0, h.num_leaves, (2, 5, 4))
    a, b = HierarchicalSegMetrics(h), HierarchicalSegMetrics(h)
    a.update(pred, target)
    b.update(paddle.to_tensor(pred), paddle.to_tensor(target))
    np.testing.assert_array_equal(a.state(), b.state())


def test_module_does_not_import_frameworks():
    import subprocess

    code = ("import sys, hieraloss.metrics; "
            "assert 'torch' not in sys.modules and 'paddle' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_merge_reset_and_state_round_trip():
    h = presets.cityscapes()
    a, b = HierarchicalSegMetrics(h), HierarchicalSegMetrics(h)
    rng = np.random.default_rng(5)
    a.update(rng.integers(0, 19, (1, 4, 4)), rng.integers(0, 19, (1, 4, 4)))
    b.load_state(a.state())
    np.testing.assert_array_equal(a.state(), b.state())
    assert a.state().dtype == np.int64
    a.reset()
    assert not a.state().any()
    with pytest.raises(ValueError, match="different hierarchies"):
        a.merge(HierarchicalSegMetrics(presets.lip()))
    with pytest.raises(ValueError, match="different hierarchies"):
        a.merge(HierarchicalSegMetrics(h.with_order("coarse_to_fine")))
    with pytest.raises(TypeError):
        a.merge(object())
    with pytest.raises(ValueError, match="state must be"):
        b.load_state(np.zeros(3, np.int64))


def test_all_reduce_is_a_noop_without_a_process_group():
    h = presets.cityscapes()
    m = HierarchicalSegMetrics(h)
    m.update(np.array([[0, 1]]), np.array([[0, 0]]))
    before = m.state()
    assert m.all_reduce() is m
    np.testing.assert_array_equal(m.state(), before)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_bad_values_raise_and_leave_state_alone(dtype):
    h = presets.cityscapes()  # 26 nodes, 19 leaves
    m = HierarchicalSegMetrics(h)
    good = np.array([[0, 1, 2]], dtype=dtype)
    m.update(good, good)
    before = m.state()
    with pytest.raises(LabelError, match=r"target holds values .*: 30, 40"):
        m.update(good, np.array([[30, 40, 255]], dtype=dtype))
    with pytest.raises(LabelError, match=r"not leaf ids 0..18: 20"):
        m.update(np.array([[20, 0, 0]], dtype=dtype), good)
    with pytest.raises(LabelError, match=r"not leaf ids 0..18: 255"):
        m.update(np.array([[255, 0, 0]], dtype=dtype), good)
    bad_depth = np.array([[[0, 19, 19], [0, 0, 0]]], dtype=dtype)  # leaf 0 is no depth-1 class
    with pytest.raises(LabelError, match=r"pred\[:, 0\] .* not classes at depth 1 .*: 0"):
        m.update(bad_depth, good)
    # An internal node at the deepest depth, with a coarser label that a table padding could match.
    for bad_leaf in ([[[0], [19]]], [[[19], [19]]], [[[0], [255]]]):
        with pytest.raises(LabelError, match="not classes at depth|not node ids"):
            m.update(np.array(bad_leaf, dtype=dtype), np.array([[0]], dtype=dtype))
    np.testing.assert_array_equal(m.state(), before)


def test_bad_inputs_raise_clear_errors():
    h = presets.cityscapes()
    m = HierarchicalSegMetrics(h)
    t = np.zeros((2, 3, 4), np.int64)
    with pytest.raises(ValueError, match="shape\\[1\\]=3 != max_depth=2"):
        m.update(np.zeros((2, 3, 3, 4), np.int64), t)
    with pytest.raises(ValueError, match="matches neither"):
        m.update(np.zeros((2, 4, 3), np.int64), t)
    with pytest.raises(ValueError, match="matches neither"):
        m.update(np.zeros((2, 3, 4), np.int64), t[:, None])
    with pytest.raises(LabelError, match="integer"):
        m.update(np.zeros((2, 3, 4)), t)
    with pytest.raises(LabelError, match="integer"):
        m.update(t, t.astype(np.float32))
    with pytest.raises(LabelError, match="target holds values"):
        m.update(t, t - 1)
    with pytest.raises(ValueError, match="batch dimension"):
        m.update(np.int64(0), np.int64(0))
    with pytest.raises(LabelError, match="collides"):
        HierarchicalSegMetrics(h, ignore_index=3)
    with pytest.raises(TypeError, match="Hierarchy"):
        HierarchicalSegMetrics("cityscapes")
    with pytest.raises(ValueError, match="depth must be"):
        m.confusion_matrix(3)


# ---------------------------------------------------------------------------- calibration (ECE)


def ece_oracle(h, batches, bins, ignore_index=255):
    """Per depth: ``(count, confidence sum, correct)`` per bin and the ECE, by a loop over pixels."""
    L = h.max_depth
    hist = np.zeros((L, bins, 3))
    for pred, target, conf in batches:
        pred, target, conf = np.asarray(pred), np.asarray(target), np.asarray(conf, dtype=np.float64)
        per_depth = pred.ndim == target.ndim + 1
        for idx in np.ndindex(*target.shape):
            t = int(target[idx])
            if t == ignore_index:
                continue
            if per_depth:
                pl = [int(pred[(idx[0], d, *idx[1:])]) for d in range(L)]
            else:
                pl = [label_at_depth(h, int(pred[idx]), d + 1) for d in range(L)]
            for d in range(L):
                truth = label_at_depth(h, t, d + 1)
                if truth is None:
                    continue
                c = float(conf[(idx[0], d, *idx[1:])])
                b = min(int(c * bins), bins - 1)
                hist[d, b] += (1, c, pl[d] == truth)
    ece = [float(np.abs(hist[d, :, 2] - hist[d, :, 1]).sum() / hist[d, :, 0].sum()) if hist[d, :, 0].sum()
           else math.nan for d in range(L)]
    return hist, ece


@st.composite
def confidences(draw, h, shape):
    """[B, L, *spatial] floats in [0, 1], with exact 0, 1 and bin edges mixed in."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = rng.random((shape[0], h.max_depth, *shape[1:]))
    special = rng.random(out.shape) < 0.2
    out[special] = rng.choice([0.0, 1.0, 0.2, 0.4, 2 / 3], size=int(special.sum()))
    return out.astype(draw(st.sampled_from([np.float64, np.float32, np.float16])))


@settings(max_examples=30)
@given(data=st.data())
def test_ece_matches_oracle_and_leaves_the_label_counts_alone(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    shape = data.draw(shapes)
    bins = data.draw(st.sampled_from([1, 5, 15]))
    batches = []
    for _ in range(data.draw(st.integers(1, 2))):
        target = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None,
                                      dtype=data.draw(label_dtypes)))
        pred = data.draw(per_depth_preds(h, shape) if data.draw(st.booleans()) else leaf_preds(h, shape))
        batches.append((pred, target, data.draw(confidences(h, shape))))
    m, plain = HierarchicalSegMetrics(h, ece_bins=bins), HierarchicalSegMetrics(h, ece_bins=bins)
    with small_chunks(data.draw(st.sampled_from([3, 1 << 19]))):
        for pred, target, conf in batches:
            m.update(pred, target, confidence=conf)
            plain.update(pred, target)
    hist, ece = ece_oracle(h, batches, bins)
    for d in range(h.max_depth):
        cal = m.calibration(d + 1)
        np.testing.assert_array_equal(cal["count"], hist[d, :, 0])
        np.testing.assert_allclose(cal["count"] * np.nan_to_num(cal["accuracy"]), hist[d, :, 2], atol=1e-9)
        np.testing.assert_allclose(cal["count"] * np.nan_to_num(cal["confidence"]), hist[d, :, 1],
                                   atol=1e-6 * max(1, hist[d, :, 0].sum()))
        got = m.compute()["per_depth"][d]["ece"]
        assert (math.isnan(got) and math.isnan(ece[d])) or math.isclose(got, ece[d], abs_tol=1e-6)
        assert math.isnan(plain.compute()["per_depth"][d]["ece"])
    # The label counts are those of the label-only updates; the calibration part is extra.
    size = h.max_depth * bins * 3
    np.testing.assert_array_equal(m.state()[:-size], plain.state()[:-size])
    assert not plain.state()[-size:].any()


@settings(max_examples=20)
@given(data=st.data())
def test_ece_merging_halves_equals_one_pass(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    b = data.draw(st.integers(2, 4))
    shape = (b, 3, 4)
    target = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    pred = data.draw(per_depth_preds(h, shape) if data.draw(st.booleans()) else leaf_preds(h, shape))
    conf = data.draw(confidences(h, shape))
    cut = data.draw(st.integers(1, b - 1))
    whole, first, second = (HierarchicalSegMetrics(h, ece_bins=7) for _ in range(3))
    whole.update(pred, target, confidence=conf)
    first.update(pred[:cut], target[:cut], confidence=conf[:cut])
    second.update(pred[cut:], target[cut:], confidence=conf[cut:])
    first.merge(second)
    np.testing.assert_array_equal(first.state(), whole.state())
    assert first.to_dict() == whole.to_dict()
    restored = HierarchicalSegMetrics(h, ece_bins=7)
    restored.load_state(whole.state())
    assert restored.to_dict() == whole.to_dict()


def test_ece_by_hand_and_reporting():
    h = presets.cityscapes()  # depth 1: categories, depth 2: leaves
    m = HierarchicalSegMetrics(h, ece_bins=2)
    target = np.array([[0, 0, 13, 255]])
    pred = np.array([[0, 1, 14, 5]])  # depth 1 right, right, right; depth 2 right, wrong, wrong
    conf = np.array([[[0.9, 0.8, 0.2, 0.5], [0.7, 0.6, 0.4, 0.5]]])
    assert "ECE" not in m.format_table()
    m.update(pred, target)
    res = m.to_dict()
    assert res["per_depth"][0]["ece"] is None and math.isnan(m.compute()["per_depth"][1]["ece"])
    m.update(pred, target, confidence=conf)
    # depth 1: bin 1 holds 0.9, 0.8 (both right), bin 0 holds 0.2 (right):
    # (2 * |1 - 0.85| + 1 * |1 - 0.2|) / 3
    r = m.compute()["per_depth"]
    assert math.isclose(r[0]["ece"], (2 * 0.15 + 0.8) / 3, abs_tol=1e-6)
    # depth 2: bin 1 holds 0.7 (right), 0.6 (wrong); bin 0 holds 0.4 (wrong)
    assert math.isclose(r[1]["ece"], (2 * abs(0.5 - 0.65) + abs(0 - 0.4)) / 3, abs_tol=1e-6)
    cal = m.calibration(2)
    np.testing.assert_array_equal(cal["bin_edges"], [0.0, 0.5, 1.0])
    assert cal["count"].tolist() == [1, 2]
    np.testing.assert_allclose(cal["accuracy"], [0.0, 0.5])
    np.testing.assert_allclose(cal["confidence"], [0.4, 0.65], atol=1e-6)
    assert "ECE %" in m.format_table()
    json.dumps(m.to_dict(), allow_nan=False)
    empty = HierarchicalSegMetrics(h)
    assert np.isnan(empty.calibration(1)["accuracy"]).all() and empty.ece_bins == 15


def test_confidence_from_torch_and_bad_confidence_leaves_state_alone():
    h = presets.pascal_person_part()
    rng = np.random.default_rng(6)
    target = rng.integers(0, h.num_nodes, (2, 3, 4))
    pred = rng.integers(0, h.num_leaves, (2, 3, 4))
    conf = rng.random((2, h.max_depth, 3, 4)).astype(np.float32)
    m = HierarchicalSegMetrics(h)
    m.update(pred, target, confidence=conf)
    before = m.state()
    for bad, kind, needle in [
        (conf[:, :2], ValueError, "per-depth shape"),
        (conf.astype(np.int64), TypeError, "floats"),
        (np.where(conf > 0.5, np.nan, conf), ValueError, r"\[0, 1\]"),
        (conf + 1.0, ValueError, r"\[0, 1\]"),
        (conf - 1.0, ValueError, r"\[0, 1\]"),
    ]:
        with pytest.raises(kind, match=needle):
            m.update(pred, target, confidence=bad)
    with pytest.raises(LabelError, match="not leaf ids"):  # a bad pred: the confidences are dropped too
        m.update(pred + h.num_leaves, target, confidence=conf)
    np.testing.assert_array_equal(m.state(), before)
    torch = pytest.importorskip("torch")
    t = HierarchicalSegMetrics(h)
    t.update(torch.from_numpy(pred), torch.from_numpy(target), confidence=torch.from_numpy(conf))
    np.testing.assert_array_equal(t.state(), before)


def test_bool_target_and_ece_bins_are_checked():
    h = presets.cityscapes()
    m = HierarchicalSegMetrics(h)
    with pytest.raises(LabelError, match="target must hold integer node ids, got dtype bool"):
        m.update(np.zeros((1, 3), np.int64), np.zeros((1, 3), bool))
    assert not m.state().any()
    for bins in (0, -1, 2.5, True, "15"):
        with pytest.raises(ValueError, match="ece_bins"):
            HierarchicalSegMetrics(h, ece_bins=bins)
    with pytest.raises(ValueError, match="different ece_bins"):
        m.merge(HierarchicalSegMetrics(h, ece_bins=10))
