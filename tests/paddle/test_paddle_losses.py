"""hieraloss.paddle beyond the shared conformance suite (tests/conformance/test_conformance_backends.py
covers the values, gradients, tie rule, decoding and triplet loss against tests/oracle.py).

Here: paddle against torch on identical inputs, layers against functional, state_dict round trips,
what the PyLayer saves for backward, input immutability, dtypes, errors and the table cache.
Tests about the vectorized paddle op itself (chunking, what it saves) pass ``backend="paddle"``;
tests of the loss contract run on both CPU backends (``"paddle"`` and the compiled ``"native"``
kernel, which tests/paddle/test_paddle_native.py covers in depth).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

paddle = pytest.importorskip("paddle")

import hieraloss.numpy as hnp  # noqa: E402
import hieraloss.paddle as hp  # noqa: E402
from hieraloss import Hierarchy, LabelError, _native, presets  # noqa: E402
from hieraloss.paddle._tables import tables_for, vec  # noqa: E402
from hieraloss.paddle.ops import tree_min as pops  # noqa: E402
from hieraloss.paddle.ops.labels import label_channels  # noqa: E402
from hieraloss.testing import assert_consistent, hierarchies, label_maps, logits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helpers in tests/
import oracle  # noqa: E402

paddle.set_device("cpu")
HAS_TORCH = importlib.util.find_spec("torch") is not None
REDUCTIONS = ("mean", "sum", "none", "hssn")
CPU_BACKENDS = pytest.mark.parametrize(
    "backend",
    ["paddle", pytest.param("native", marks=pytest.mark.skipif(not _native.available(), reason="no native kernel"))],
)


def _case(h: Hierarchy, shape=(2, 3, 4), seed=0, ignore=0.2, partial=0.2, scale=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, size=(shape[0], h.num_nodes, *shape[1:]))
    labels = rng.integers(0, h.num_leaves, size=shape)
    if h.num_nodes > h.num_leaves:
        labels = np.where(
            rng.random(shape) < partial, rng.integers(h.num_leaves, h.num_nodes, size=shape), labels
        )
    labels = np.where(rng.random(shape) < ignore, 255, labels)
    return x, labels


def _value_and_grad(
    fn, x: np.ndarray, labels: np.ndarray, h: Hierarchy, upstream=None, dtype="float32", **kw
):
    xt = paddle.to_tensor(x).astype(dtype)
    xt.stop_gradient = False
    out = fn(xt, paddle.to_tensor(labels), h, **kw)
    up = paddle.ones_like(out) if upstream is None else paddle.to_tensor(upstream).astype(out.dtype)
    (out * up).sum().backward()
    return out, xt.grad


# ---------------------------------------------------------------------------- paddle vs torch
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


def _torch_value_and_grad(fn_name, x, labels, h, upstream=None, **kw):
    import torch

    import hieraloss.torch as ht

    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = getattr(ht, fn_name)(xt, torch.tensor(labels), h, backend="torch", **kw)
    up = torch.ones_like(out) if upstream is None else torch.tensor(upstream, dtype=out.dtype)
    (out * up).sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


@needs_torch
@CPU_BACKENDS
@given(data=st.data())
def test_torch_and_paddle_agree(backend, data):
    """Values and gradients within 1e-6 relative (to the largest entry) in float32."""
    h = data.draw(hierarchies(max_depth=3, order=None))
    shape = data.draw(st.sampled_from([(1, 5), (2, 3, 4), (1, 2, 2, 3)]))
    x = data.draw(logits(h, shape, ties=data.draw(st.booleans()))).astype(np.float32)
    labels = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    fn_name = data.draw(st.sampled_from(["tree_min_loss", "focal_tree_min_loss"]))
    kw = dict(reduction=reduction)
    if data.draw(st.booleans()):
        kw["node_weight"] = np.random.default_rng(1).uniform(0.5, 2.0, h.num_nodes)
    if fn_name == "focal_tree_min_loss":
        kw["gamma"] = data.draw(st.sampled_from([0.0, 1.0, 2.0]))
    upstream = np.random.default_rng(2).normal(size=x.shape) if reduction == "none" else None
    want_v, want_g = _torch_value_and_grad(fn_name, x, labels, h, upstream, **kw)
    got_v, got_g = _value_and_grad(getattr(hp, fn_name), x, labels, h, upstream, backend=backend, **kw)
    got_v, got_g = got_v.numpy(), got_g.numpy()
    assert got_v.dtype == want_v.dtype == np.float32
    assert got_g.dtype == want_g.dtype == np.float32
    v_scale = max(float(np.abs(want_v).max()), 1e-30)
    np.testing.assert_allclose(got_v, want_v, rtol=0, atol=1e-6 * v_scale)
    # torch's focal gradient forms 1 - sigmoid(z), which cancels for large z (~1e-6 of the largest
    # gradient); paddle uses sigmoid(-z). The plain loss is held to 1e-6.
    g_tol = 1e-6 if kw.get("gamma", 0.0) == 0 else 3e-6
    g_scale = max(float(np.abs(want_g).max()), 1e-30)
    np.testing.assert_allclose(got_g, want_g, rtol=0, atol=g_tol * g_scale)


@needs_torch
@given(data=st.data())
def test_torch_and_paddle_decode_and_cross_entropy_agree(data):
    import torch

    import hieraloss.torch as ht

    h = data.draw(hierarchies(max_depth=3, order=None))
    x = data.draw(logits(h, (2, 3, 4), ties=data.draw(st.booleans()))).astype(np.float32)
    labels = data.draw(label_maps(h, (2, 3, 4), ignore_fraction=0.2, partial_fraction=0.2))
    for method in ("path", "top_down", "independent"):
        leaf_p, depth_p = hp.decode(paddle.to_tensor(x), h, method, backend="paddle")
        leaf_t, depth_t = ht.decode(torch.tensor(x), h, method, backend="torch")
        np.testing.assert_array_equal(leaf_p.numpy(), leaf_t.numpy())
        np.testing.assert_array_equal(depth_p.numpy(), depth_t.numpy())
    targets_p, mask_p = hp.expand_targets(paddle.to_tensor(labels), h)
    targets_want, mask_want = h.expand_targets(labels)  # the reference (torch differs on partial labels)
    assert targets_p.dtype == paddle.uint8 and mask_p.dtype == paddle.bool
    np.testing.assert_array_equal(targets_p.numpy(), targets_want)
    np.testing.assert_array_equal(mask_p.numpy(), mask_want)
    for d in range(1, h.max_depth + 1):
        ce_p = hp.depth_cross_entropy(paddle.to_tensor(x), paddle.to_tensor(labels), h, d).numpy()
        ce_t = ht.depth_cross_entropy(torch.tensor(x), torch.tensor(labels), h, d).numpy()
        np.testing.assert_allclose(ce_p, ce_t, rtol=1e-6, atol=1e-7)


@needs_torch
def test_torch_and_paddle_hssn_loss_and_triplet_agree():
    import torch

    import hieraloss.torch as ht

    h = presets.cityscapes()
    x, labels = _case(h, shape=(2, 8, 8), seed=3, partial=0.0)
    labels = np.where(labels == 255, 255, labels)
    emb = np.random.default_rng(4).normal(size=(2, 5, 4, 4)).astype(np.float32)
    kw = dict(step=300, total_steps=1000, sampling="first", max_per_class=7, return_parts=True)
    xp = paddle.to_tensor(x.astype(np.float32), stop_gradient=False)
    ep = paddle.to_tensor(emb, stop_gradient=False)
    total_p, parts_p = hp.hssn_loss(xp, paddle.to_tensor(labels), h, embeddings=ep, backend="paddle", **kw)
    total_p.backward()
    xt = torch.tensor(x.astype(np.float32), requires_grad=True)
    et = torch.tensor(emb, requires_grad=True)
    total_t, parts_t = ht.hssn_loss(xt, torch.tensor(labels), h, embeddings=et, backend="torch", **kw)
    total_t.backward()
    assert set(parts_p) == set(parts_t)
    for name in parts_t:
        np.testing.assert_allclose(
            parts_p[name].numpy(), parts_t[name].detach().numpy(), rtol=1e-6, atol=1e-7
        )
    np.testing.assert_allclose(total_p.numpy(), total_t.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        xp.grad.numpy(), xt.grad.numpy(), rtol=0, atol=1e-6 * float(xt.grad.abs().max())
    )
    np.testing.assert_allclose(
        ep.grad.numpy(), et.grad.numpy(), rtol=0, atol=1e-6 * float(et.grad.abs().max())
    )


# ---------------------------------------------------------------------------- own references
@given(data=st.data())
def test_random_triplets_match_numpy_draws(data):
    """``sampling="random"`` with a seed draws exactly what hieraloss.numpy draws with that seed."""
    h = data.draw(hierarchies(max_depth=3, order=None))
    labels = data.draw(label_maps(h, (2, 6, 6), ignore_fraction=0.2, partial_fraction=0.1))
    emb = np.random.default_rng(5).normal(size=(2, 3, 3, 3))
    seed = data.draw(st.integers(0, 2**31))
    got = hp.hierarchy_triplet_loss(
        paddle.to_tensor(emb), paddle.to_tensor(labels), h, max_per_class=3, generator=seed
    )
    want = hnp.hierarchy_triplet_loss(emb, labels, h, max_per_class=3, generator=seed)
    assert got.dtype == paddle.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    gen = np.random.default_rng(seed)
    again = hp.hierarchy_triplet_loss(
        paddle.to_tensor(emb), paddle.to_tensor(labels), h, max_per_class=3, generator=gen
    )
    np.testing.assert_allclose(again.numpy(), want, rtol=1e-12, atol=1e-15)


def test_hssn_loss_parts_match_references():
    """TM part = numpy hssn reduction / 5; CE parts = a loop over pixels written here."""
    h = presets.pascal_person_part()
    x, labels = _case(h, shape=(2, 3, 4), seed=6)
    total, parts = hp.hssn_loss(
        paddle.to_tensor(x), paddle.to_tensor(labels), h, ce_weights=[1.0, 0.5, 0.0], return_parts=True
    )
    tm = hnp.tree_min_loss(x, labels, h, reduction="hssn") / 5
    np.testing.assert_allclose(parts["tree_min"].numpy(), tm, rtol=1e-12)
    assert "ce_depth3" not in parts
    for d in (1, 2):
        classes = h.depth_channels[d - 1]
        at_depth = h.labels_at_depth(labels, d)
        losses = []
        for b, i, j in np.ndindex(*labels.shape):
            if at_depth[b, i, j] == 255:
                continue
            z = x[b, classes, i, j]
            k = list(classes).index(h.channel_of[at_depth[b, i, j]])
            losses.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[k])
        np.testing.assert_allclose(parts[f"ce_depth{d}"].numpy(), np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(
        total.numpy(), 5 * tm + parts["ce_depth1"].numpy() + 0.5 * parts["ce_depth2"].numpy(), rtol=1e-12
    )


@pytest.mark.parametrize("method", ["path", "hssn", "top_down"])
def test_decode_is_consistent_on_an_unbalanced_tree(method):
    h = presets.mapillary_vistas_v2()
    x, _ = _case(h, shape=(2, 3, 5), seed=7)
    leaf, depth = hp.decode(paddle.to_tensor(x), h, method)
    assert leaf.dtype == depth.dtype == paddle.int64
    assert depth.shape == [2, h.max_depth, 3, 5]
    assert_consistent(depth.numpy(), h)
    np.testing.assert_array_equal(depth.numpy()[:, -1], leaf.numpy())
    want_leaf, want_depth = oracle.decode(x, h, method)
    np.testing.assert_array_equal(leaf.numpy(), want_leaf)


# ---------------------------------------------------------------------------- layers
def test_layers_equal_functional():
    h = presets.cityscapes()
    x, labels = _case(h, seed=8)
    xt, lt = paddle.to_tensor(x), paddle.to_tensor(labels)
    w = np.linspace(0.5, 1.5, h.num_nodes)
    pairs = [
        (
            hp.TreeMinLoss(h, reduction="sum", node_weight=w)(xt, lt),
            hp.tree_min_loss(xt, lt, h, reduction="sum", node_weight=w.astype(np.float32)),
        ),
        (
            hp.FocalTreeMinLoss(h, gamma=1.5, reduction="hssn")(xt, lt),
            hp.focal_tree_min_loss(xt, lt, h, gamma=1.5, reduction="hssn"),
        ),
        (hp.HSSNLoss(h, ce_weights=0.4)(xt, lt), hp.hssn_loss(xt, lt, h, ce_weights=0.4)),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
    for method in hp.DECODE_METHODS:
        for got, want in zip(hp.HierarchyDecoder(h, method)(xt), hp.decode(xt, h, method), strict=True):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    emb = paddle.to_tensor(np.random.default_rng(9).normal(size=(2, 4, 3, 4)))
    layer = hp.HierarchyTripletLoss(h, max_per_class=5, sampling="first")
    np.testing.assert_allclose(
        layer(emb, lt).numpy(),
        hp.hierarchy_triplet_loss(emb, lt, h, max_per_class=5, sampling="first").numpy(),
    )


def test_hssn_layer_schedule_and_state_dict_round_trip(tmp_path):
    h = presets.cityscapes()
    x, labels = _case(h, shape=(2, 8, 8), seed=10, partial=0.0)
    xt, lt = paddle.to_tensor(x), paddle.to_tensor(labels)
    emb = paddle.to_tensor(np.random.default_rng(11).normal(size=(2, 4, 4, 4)))
    w = np.linspace(1.0, 2.0, h.num_nodes)
    layer = hp.HSSNLoss(h, total_steps=10, node_weight=w, sampling="first")
    for step in range(3):
        _, parts = layer(xt, lt, emb, return_parts=True)
        assert float(parts["triplet_weight"]) == pytest.approx(hp.triplet_weight(step, 10))
    assert int(layer.step) == 3
    layer.eval()
    layer(xt, lt, emb)
    assert int(layer.step) == 3  # eval does not advance the schedule
    layer.train()
    layer(xt, lt, emb, step=7)
    assert int(layer.step) == 3  # an explicit step does not either

    state = layer.state_dict()
    assert set(state) == {"node_weight", "step"}
    path = str(tmp_path / "hssn.pdparams")
    paddle.save(state, path)
    fresh = hp.HSSNLoss(h, total_steps=10, node_weight=np.ones(h.num_nodes), sampling="first")
    fresh.set_state_dict(paddle.load(path))
    assert int(fresh.step) == 3
    np.testing.assert_allclose(fresh.node_weight.numpy(), w.astype(np.float32))
    np.testing.assert_allclose(fresh(xt, lt, emb).numpy(), layer(xt, lt, emb).numpy(), rtol=1e-12)
    assert int(fresh.step) == 4

    plain = hp.TreeMinLoss(h, node_weight=w)
    again = hp.TreeMinLoss(h, node_weight=np.ones(h.num_nodes))
    again.set_state_dict(plain.state_dict())
    np.testing.assert_allclose(again(xt, lt).numpy(), plain(xt, lt).numpy(), rtol=1e-12)
    assert "node_weight" not in hp.TreeMinLoss(h).state_dict()


def test_layer_errors():
    h = presets.cityscapes()
    with pytest.raises(ValueError, match="reduction"):
        hp.TreeMinLoss(h, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        hp.TreeMinLoss(h, backend="cuda")
    with pytest.raises(ValueError, match="gamma"):
        hp.FocalTreeMinLoss(h, gamma=-1)
    with pytest.raises(ValueError, match="method"):
        hp.HierarchyDecoder(h, "greedy")
    with pytest.raises(ValueError, match="total_steps"):
        hp.HSSNLoss(h, total_steps=0)
    with pytest.raises(ValueError, match="node_weight"):
        hp.TreeMinLoss(h, node_weight=np.ones(3))
    with pytest.raises(TypeError, match="Hierarchy"):
        hp.TreeMinLoss("cityscapes")


# ---------------------------------------------------------------------------- PyLayer memory
def test_pylayer_saves_only_logits_and_label_channels(monkeypatch):
    """Backward recomputes the sweeps: the context holds the logits (the caller's memory, no copy),
    the int64 label channels and nothing else of pixel size."""
    saved: list = []
    contexts: list = []
    real_save = paddle.autograd.PyLayerContext.save_for_backward

    def spy(ctx, *tensors):
        saved.append(tensors)
        contexts.append(ctx)
        return real_save(ctx, *tensors)

    monkeypatch.setattr(paddle.autograd.PyLayerContext, "save_for_backward", spy)
    h = presets.mapillary_vistas_v2()
    x, labels = _case(h, shape=(2, 4, 5), seed=12)
    xt = paddle.to_tensor(x.astype(np.float32), stop_gradient=False)
    for reduction in REDUCTIONS:
        saved.clear()
        contexts.clear()
        out = hp.focal_tree_min_loss(
            xt,
            paddle.to_tensor(labels),
            h,
            reduction=reduction,
            node_weight=np.ones(h.num_nodes),
            backend="paddle",
        )
        assert len(saved) == 1
        logits_saved, labels_saved = saved[0]
        assert logits_saved.data_ptr() == xt.data_ptr()  # a view of the caller's tensor
        assert logits_saved.dtype == paddle.float32 and int(logits_saved.numel()) == x.size
        assert labels_saved.dtype == paddle.int64 and labels_saved.shape == [2, 20]
        pixel_size = [
            v for v in vars(contexts[0]).values() if isinstance(v, paddle.Tensor) and v.numel() >= 20
        ]
        config_tensors = [t for t in contexts[0].config if isinstance(t, paddle.Tensor)]
        assert pixel_size == [] and all(int(t.numel()) == h.num_nodes for t in config_tensors)
        out.sum().backward()


# ---------------------------------------------------------------------------- immutability and dtypes
@CPU_BACKENDS
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_inputs_not_mutated_and_dtypes(dtype, backend):
    h = presets.pascal_person_part()
    x, labels = _case(h, seed=13)
    xt = paddle.to_tensor(x).astype(dtype)
    xt.stop_gradient = False
    lt = paddle.to_tensor(labels.astype(np.int32))
    wt = paddle.to_tensor(np.linspace(0.5, 1.5, h.num_nodes))
    before = [xt.astype("float64").numpy().copy(), lt.numpy().copy(), wt.numpy().copy()]
    out = hp.focal_tree_min_loss(xt, lt, h, node_weight=wt, reduction="mean", backend=backend)
    out.backward()
    assert out.dtype == (paddle.float64 if dtype == "float64" else paddle.float32)
    assert xt.grad.dtype == xt.dtype
    after = [xt.astype("float64").numpy(), lt.numpy(), wt.numpy()]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
    # Values: the float64 reference on the rounded inputs, accumulated in float32 for halves.
    want = hnp.focal_tree_min_loss(before[0], labels, h, node_weight=before[2])
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12 if dtype == "float64" else 1e-5)
    leaf, _ = hp.decode(xt, h, "path")
    np.testing.assert_array_equal(leaf.numpy(), hnp.decode(before[0], h, "path")[0])
    emb = paddle.to_tensor(np.random.default_rng(14).normal(size=(2, 3, 3, 4))).astype(dtype)
    emb.stop_gradient = False
    e_before = emb.astype("float64").numpy().copy()
    tt = hp.hierarchy_triplet_loss(emb, lt, h, sampling="first")
    tt.backward()
    assert emb.grad.dtype == emb.dtype
    np.testing.assert_array_equal(emb.astype("float64").numpy(), e_before)
    np.testing.assert_array_equal(lt.numpy(), before[1])


def test_no_valid_pixel_and_no_triplet_are_connected_zeros():
    h = presets.cityscapes()
    xt = paddle.to_tensor(np.ones((1, h.num_nodes, 2, 2), dtype=np.float32), stop_gradient=False)
    lt = paddle.full([1, 2, 2], 255, dtype="int64")
    for reduction in ("mean", "sum", "hssn"):
        out = hp.tree_min_loss(xt, lt, h, reduction=reduction)
        assert float(out) == 0.0 and not out.stop_gradient
        out.backward()
        assert float(paddle.abs(xt.grad).sum()) == 0.0
        xt.clear_gradient()
    emb = paddle.to_tensor(np.full((1, 3, 2, 2), np.inf), stop_gradient=False)  # even inf stays an exact 0
    out = hp.hierarchy_triplet_loss(emb, paddle.zeros([1, 2, 2], dtype="int64"), h)
    assert float(out) == 0.0 and not out.stop_gradient
    out.backward()


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    h = presets.cityscapes()
    x = paddle.zeros([2, h.num_nodes, 3, 4])
    lab = paddle.zeros([2, 3, 4], dtype="int64")
    with pytest.raises(TypeError, match="paddle.Tensor"):
        hp.tree_min_loss(np.zeros((2, h.num_nodes, 3, 4)), lab, h)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        hp.tree_min_loss(paddle.zeros([2, h.num_nodes, 3, 4], dtype="int32"), lab, h)
    with pytest.raises(LabelError, match="integers"):
        hp.tree_min_loss(x, paddle.zeros([2, 3, 4], dtype="bool"), h)
    with pytest.raises(LabelError, match="integers"):
        hp.tree_min_loss(x, paddle.zeros([2, 3, 4], dtype="float32"), h)
    with pytest.raises(TypeError, match="paddle.Tensor"):
        hp.tree_min_loss(x, [[0]], h)
    with pytest.raises(ValueError, match="backend"):
        hp.tree_min_loss(x, lab, h, backend="cuda")
    with pytest.raises(ValueError, match="2 non-finite"):
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        bad[1, 2, 1, 1] = float("inf")
        hp.tree_min_loss(bad, lab, h, check_finite=True)
    with pytest.raises(TypeError, match="ignore_index"):
        hp.tree_min_loss(x, lab, h, ignore_index=255.0)
    # empty logits are valid: an exact 0 (tests/conformance/test_conformance_inputs.py covers every backend)
    assert float(hp.tree_min_loss(paddle.zeros([0, h.num_nodes, 3]), paddle.zeros([0, 3], dtype="int64"), h)) == 0.0
    with pytest.raises(TypeError, match="generator"):
        hp.hierarchy_triplet_loss(paddle.zeros([2, 3, 3, 4]), lab, h, generator="seed")
    with pytest.raises(ValueError, match="max_per_class"):
        hp.hierarchy_triplet_loss(paddle.zeros([2, 3, 3, 4]), lab, h, max_per_class=0)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        hp.hierarchy_triplet_loss(paddle.zeros([2, 3, 12]), lab, h)
    with pytest.raises(ValueError, match="depth"):
        hp.depth_cross_entropy(x, lab, h, 3)
    with pytest.raises(ValueError, match="ce_weights"):
        hp.hssn_loss(x, lab, h, ce_weights=[1, 2, 3])
    with pytest.raises(ValueError, match="step"):
        hp.hssn_loss(x, lab, h, embeddings=paddle.zeros([2, 3, 3, 4]))
    with pytest.raises(LabelError, match="need a batch"):
        hp.expand_targets(paddle.to_tensor(np.int64(3)), h)


def test_tables_are_cached_per_hierarchy_and_place():
    h = presets.lip()
    a = tables_for(h, paddle.CPUPlace())
    assert tables_for(presets.lip(), paddle.CPUPlace()) is a  # equal hierarchies share the cache
    assert tables_for(h.with_order("coarse_to_fine"), paddle.CPUPlace()) is not a
    levels = vec(a, "levels", 0)
    assert vec(a, "levels", 0) is levels
    assert str(levels.place) == str(paddle.CPUPlace())


@CPU_BACKENDS
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_flat_hierarchy_is_binary_cross_entropy(reduction, backend):
    """A one-level tree: every node is its own path, so the loss is per-channel BCE with logits."""
    h = Hierarchy.from_parents([-1, -1, -1])
    x, labels = _case(h, shape=(2, 5), seed=15, partial=0.0)
    out, grad = _value_and_grad(
        hp.tree_min_loss, x, labels, h, dtype="float64", reduction=reduction, backend=backend
    )
    y = (labels[:, None, :] == np.arange(3)[None, :, None]).astype(float)
    valid = (labels != 255)[:, None, :]
    bce = np.where(valid, np.logaddexp(0, x) - y * x, 0)
    dbce = np.where(valid, 1 / (1 + np.exp(-x)) - y, 0)
    count = valid.sum() * 3
    if reduction == "none":
        want, dwant = bce, dbce
    elif reduction == "sum":
        want, dwant = bce.sum(), dbce
    else:
        scale = 1 / count if reduction == "mean" else 5 / count
        want, dwant = bce.sum() * scale, dbce * scale
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), dwant, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_pixel_chunks_change_nothing(monkeypatch, dtype):
    """Large inputs are processed in pixel chunks; forcing tiny chunks (ragged last one) must give the
    same values and gradients as one chunk, for every reduction."""
    h = presets.mapillary_vistas_v2()  # unbalanced: the gather path of _unblock
    x, labels = _case(h, shape=(2, 5, 7), seed=16)
    upstream = np.random.default_rng(17).normal(size=x.shape)
    results = {}
    for chunk in (1 << 20, 2 * h.num_nodes * 3):
        monkeypatch.setattr(pops, "_CHUNK_ELEMENTS", chunk)  # the sweeps live in hieraloss.paddle.ops.tree_min
        assert len(pops._spans(paddle.zeros([2, h.num_nodes, 35]))) == (1 if chunk > 1000 else 12)
        for reduction in REDUCTIONS:
            up = upstream if reduction == "none" else None
            out, grad = _value_and_grad(
                hp.focal_tree_min_loss, x, labels, h, up, dtype=dtype, reduction=reduction, backend="paddle"
            )
            results.setdefault(reduction, []).append(
                (out.astype("float64").numpy(), grad.astype("float64").numpy())
            )
            assert grad.dtype == out.dtype if dtype in ("float32", "float64") else grad.dtype != out.dtype
    for (v1, g1), (v2, g2) in results.values():
        np.testing.assert_allclose(v2, v1, rtol=1e-6 if dtype != "float64" else 1e-12)
        np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-7 * max(np.abs(g1).max(), 1))


@CPU_BACKENDS
def test_non_contiguous_logits(backend):
    """A channels-last model output viewed as [B, N, H, W] (a transpose, not contiguous)."""
    h = presets.cityscapes()
    x, labels = _case(h, seed=18)
    nhwc = paddle.to_tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), stop_gradient=False)
    view = nhwc.transpose([0, 3, 1, 2])
    assert not view.is_contiguous()
    out = hp.focal_tree_min_loss(view, paddle.to_tensor(labels), h, reduction="hssn", backend=backend)
    out.backward()
    want, grad = _value_and_grad(
        hp.focal_tree_min_loss, x, labels, h, dtype="float64", reduction="hssn", backend=backend
    )
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-12)
    np.testing.assert_allclose(nhwc.grad.numpy().transpose(0, 3, 1, 2), grad.numpy(), rtol=1e-12, atol=1e-15)


@given(data=st.data(), ignore_index=st.sampled_from([255, -1, 100_000, 40]))
def test_label_channels_match_numpy_for_every_ignore_index(data, ignore_index):
    """The lookup-table mapping (and the compare fallback for a huge ignore_index) against
    Hierarchy.label_channels: same channels, same partial flag, the same LabelError on bad values."""
    h = data.draw(hierarchies(max_depth=3, max_children=3, order=None))
    if 0 <= ignore_index < h.num_nodes:
        ignore_index = h.num_nodes + 1
    values = st.sampled_from(list(range(h.num_nodes)) + [ignore_index])
    bad = st.sampled_from([-5, -1, h.num_nodes, h.num_nodes + 7, 70_000, 200_000])
    raw = data.draw(st.lists(st.one_of(values, values, values, bad), min_size=1, max_size=30))
    labels = np.array(raw, dtype=np.int64).reshape(1, -1)
    dtype = data.draw(st.sampled_from(["int64", "int32"]))
    t = paddle.to_tensor(labels).astype(dtype)
    try:
        want = h.label_channels(labels, ignore_index=ignore_index)
    except LabelError:
        with pytest.raises(LabelError, match="neither node ids"):
            label_channels(t, h, ignore_index)
        return
    got, partial = label_channels(t, h, ignore_index)
    assert got.numpy().tolist() == want.tolist()
    assert partial == bool(((labels >= h.num_leaves) & (labels < h.num_nodes)).any())
    np.testing.assert_array_equal(t.numpy(), labels)  # not modified
    for v in range(h.num_nodes):  # every single node id: its channel, partial iff internal
        got, partial = label_channels(paddle.to_tensor([[v, ignore_index]]).astype(dtype), h, ignore_index)
        assert got.numpy().tolist() == [[int(h.channel_of[v]), -1]] and partial == (v >= h.num_leaves)


@pytest.mark.parametrize("backend", ["paddle", "auto"])
def test_check_labels_false_counts_bad_labels_as_ignored(backend):
    """check_labels=True (default) raises the LabelError; False reads nothing back and treats the bad
    value as ignore_index, in the functions and the layers (same rule as the torch backend)."""
    from hieraloss import LabelError
    from hieraloss.paddle import HSSNLoss, TreeMinLoss, depth_cross_entropy, hssn_loss, tree_min_loss

    h = presets.cityscapes()
    rng = np.random.default_rng(23)
    x = paddle.to_tensor(rng.normal(size=(2, h.num_nodes, 3, 4)).astype(np.float32))
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 4))
    bad = labels.copy()
    bad[1, 2, 3] = 77
    ignored = labels.copy()
    ignored[1, 2, 3] = 255
    calls = [
        lambda y, **kw: tree_min_loss(x, paddle.to_tensor(y), h, backend=backend, **kw),
        lambda y, **kw: hssn_loss(x, paddle.to_tensor(y), h, backend=backend, **kw),
        lambda y, **kw: depth_cross_entropy(x, paddle.to_tensor(y), h, 2, **kw),
        lambda y, **kw: TreeMinLoss(h, backend=backend, **kw)(x, paddle.to_tensor(y)),
        lambda y, **kw: HSSNLoss(h, backend=backend, **kw)(x, paddle.to_tensor(y)),
    ]
    for call in calls:
        with pytest.raises(LabelError, match="77"):
            call(bad)
        np.testing.assert_array_equal(call(bad, check_labels=False).numpy(), call(ignored).numpy())


def test_triplet_check_labels():
    """paddle hierarchy_triplet_loss / HierarchyTripletLoss: check_labels=True raises LabelError for a
    bad label value, False lets that pixel not take part (as if it held ignore_index), as in torch."""
    from hieraloss import LabelError
    from hieraloss.paddle import HierarchyTripletLoss, hierarchy_triplet_loss

    h = presets.cityscapes()
    rng = np.random.default_rng(3)
    emb = paddle.to_tensor(rng.normal(size=(2, 8, 6, 10)).astype("float32"))
    labels = rng.integers(0, h.num_nodes, size=(2, 12, 20))
    bad = labels.copy()
    bad[0, 2, 2] = 77
    as_ignored = bad.copy()
    as_ignored[0, 2, 2] = 255
    with pytest.raises(LabelError, match="77"):
        hierarchy_triplet_loss(emb, paddle.to_tensor(bad), h, sampling="first")
    with pytest.raises(LabelError, match="77"):
        HierarchyTripletLoss(h, sampling="first")(emb, paddle.to_tensor(bad))
    ref = float(hierarchy_triplet_loss(emb, paddle.to_tensor(as_ignored), h, sampling="first"))
    got = float(hierarchy_triplet_loss(emb, paddle.to_tensor(bad), h, sampling="first", check_labels=False))
    layer = float(HierarchyTripletLoss(h, sampling="first", check_labels=False)(emb, paddle.to_tensor(bad)))
    assert got == ref == layer and ref > 0
