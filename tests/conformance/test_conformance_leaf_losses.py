"""Leaf-logit objectives (Bertinetto et al., CVPR 2020) in every backend, against the loop oracle.

``hierarchical_cross_entropy``, ``soft_label_cross_entropy`` and ``decode_leaf_logits`` of
``hieraloss.numpy`` / ``hieraloss.torch`` / ``hieraloss.paddle``, written once and parametrized over
small numpy-in / numpy-out adapters defined here (the framework adapters of tests/backends.py cover
the node-logit API). Plus the module/layer forms and the mmseg / PaddleSeg registrations.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import numpy as np
import oracle
import pytest
from backends import as_dtype, dtype_name
from hypothesis import given, settings
from hypothesis import strategies as st

import hieraloss.numpy as hnp
from hieraloss import Hierarchy, LabelError, presets
from hieraloss.testing import assert_consistent, hierarchies, label_maps

LOSSES = ("hierarchical_cross_entropy", "soft_label_cross_entropy")
PARAM = {"hierarchical_cross_entropy": "alpha", "soft_label_cross_entropy": "beta"}
REDUCTIONS = ("mean", "sum", "none")
METHODS = ("argmax", "top_down")
# Loss values: halves are rounded on input and then computed in float32. The absolute part covers
# the cancellation of log-sum-exps of size ~10 (float32 ulp ~1e-6) in one small per-pixel value.
TOL = {
    "float64": dict(rtol=1e-9, atol=1e-10),
    "float32": dict(rtol=2e-5, atol=2e-5),
    "float16": dict(rtol=2e-5, atol=2e-5),
    "bfloat16": dict(rtol=2e-5, atol=2e-5),
}


# ---------------------------------------------------------------------------- adapters
class NumpyLeaf:
    name = "numpy"
    supports_grad = False
    dtypes = ("float64", "float32", "float16")

    def call(self, fn, *args, **kw):
        out = getattr(hnp, fn)(*args, **kw)
        return tuple(np.asarray(o) for o in out) if isinstance(out, tuple) else np.asarray(out)

    def value_and_grad(self, fn, x, labels, h, upstream=None, **kw):
        raise NotImplementedError

    def inputs_unchanged(self, fn, x, labels, h, **kw):
        x0, l0 = x.copy(), labels.copy()
        self.call(fn, x, labels, h, **kw)
        return np.array_equal(x, x0) and np.array_equal(labels, l0)


class TorchLeaf:
    name = "torch"
    supports_grad = True
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def __init__(self):
        import torch

        import hieraloss.torch as ht

        self.torch, self.lib = torch, ht

    def tensor(self, a, grad=False):
        torch = self.torch
        if not isinstance(a, np.ndarray):
            return a
        if dtype_name(a) == "bfloat16":
            return torch.from_numpy(np.array(a, dtype=np.float32)).to(torch.bfloat16).requires_grad_(grad)
        t = torch.from_numpy(np.array(a))
        return t.requires_grad_(grad) if grad else t

    def numpy(self, t):
        t = t.detach()
        return (t.float() if t.dtype == self.torch.bfloat16 else t).numpy()

    def call(self, fn, *args, **kw):
        out = getattr(self.lib, fn)(*(self.tensor(a) for a in args), **kw)
        return tuple(self.numpy(o) for o in out) if isinstance(out, tuple) else self.numpy(out)

    def value_and_grad(self, fn, x, labels, h, upstream=None, **kw):
        xt = self.tensor(x, grad=True)
        value = getattr(self.lib, fn)(xt, self.tensor(labels), h, **kw)
        up = self.torch.ones_like(value) if upstream is None else self.torch.as_tensor(upstream).to(value)
        (grad,) = self.torch.autograd.grad((value * up).sum(), xt)
        assert grad.dtype == xt.dtype
        return self.numpy(value), self.numpy(grad)

    def inputs_unchanged(self, fn, x, labels, h, **kw):
        xt, lt = self.tensor(x, grad=True), self.tensor(labels)
        x0, l0 = xt.detach().clone(), lt.clone()
        out = getattr(self.lib, fn)(xt, lt, h, **kw)
        if fn in LOSSES:
            out.sum().backward()
        return bool(self.torch.equal(xt.detach(), x0)) and bool(self.torch.equal(lt, l0))


class PaddleLeaf:
    name = "paddle"
    supports_grad = True
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def __init__(self):
        import paddle

        import hieraloss.paddle as hp

        paddle.set_device("cpu")
        self.paddle, self.lib = paddle, hp

    def tensor(self, a, grad=False):
        if not isinstance(a, np.ndarray):
            return a
        if dtype_name(a) == "bfloat16":
            t = self.paddle.to_tensor(np.array(a, dtype=np.float32)).astype("bfloat16")
        else:
            t = self.paddle.to_tensor(np.array(a))
        t.stop_gradient = not grad
        return t

    def numpy(self, t):
        return (t.astype("float32") if t.dtype == self.paddle.bfloat16 else t).numpy()

    def call(self, fn, *args, **kw):
        out = getattr(self.lib, fn)(*(self.tensor(a) for a in args), **kw)
        return tuple(self.numpy(o) for o in out) if isinstance(out, tuple) else self.numpy(out)

    def value_and_grad(self, fn, x, labels, h, upstream=None, **kw):
        paddle = self.paddle
        xt = self.tensor(x, grad=True)
        value = getattr(self.lib, fn)(xt, self.tensor(labels), h, **kw)
        up = paddle.ones_like(value) if upstream is None else paddle.to_tensor(upstream).astype(value.dtype)
        (value * up).sum().backward()
        grad = xt.grad if xt.grad is not None else paddle.zeros_like(xt)
        assert grad.dtype == xt.dtype
        return self.numpy(value), self.numpy(grad)

    def inputs_unchanged(self, fn, x, labels, h, **kw):
        xt, lt = self.tensor(x, grad=True), self.tensor(labels)
        x0, l0 = xt.numpy().copy(), lt.numpy().copy()
        out = getattr(self.lib, fn)(xt, lt, h, **kw)
        if fn in LOSSES:
            out.sum().backward()
        return np.array_equal(xt.numpy(), x0) and np.array_equal(lt.numpy(), l0)


def _adapter(cls, module):
    if importlib.util.find_spec(module) is None:
        return pytest.param(None, id=cls.name, marks=pytest.mark.skip(reason=f"{module} is not installed"))
    return pytest.param(cls(), id=cls.name)


ADAPTERS = [pytest.param(NumpyLeaf(), id="numpy"), _adapter(TorchLeaf, "torch"), _adapter(PaddleLeaf, "paddle")]
each_backend = pytest.mark.parametrize("adapter", ADAPTERS)


def need_grad(adapter):
    if not adapter.supports_grad:
        pytest.skip(f"{adapter.name} has no gradients")


# ---------------------------------------------------------------------------- strategies
@st.composite
def label_shapes(draw):
    b = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["flat", "2d", "3d"]))
    if kind == "flat":
        return (b,)
    if kind == "2d":
        return (b, draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    return (b, draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2)))


@st.composite
def cases(draw, partial=True, ignore=True):
    """(hierarchy, leaf logits float64 [B, K, *spatial], labels)."""
    h = draw(hierarchies(max_depth=3, max_children=3, balanced=draw(st.sampled_from([None, True, False])),
                         order=None))
    shape = draw(label_shapes())
    labels = draw(label_maps(h, shape, ignore_fraction=None if ignore else 0.0,
                             partial_fraction=None if partial else 0.0,
                             dtype=draw(st.sampled_from([np.int64, np.int32, np.uint8]))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(0.0, 3.0, size=(shape[0], h.num_leaves, *shape[1:]))
    return h, x, labels


def param_values(fn):
    return [0.0, 0.1, 0.5, 2.0] if fn == "hierarchical_cross_entropy" else [0.0, 0.3, 1.0, 5.0]


def f64(a):
    return np.asarray(a, dtype=np.float64)


def oracle_loss(fn, x, labels, h, **kw):
    return getattr(oracle, fn)(f64(x), labels, h, **kw)


def flat_cross_entropy(x, labels):
    """Per-pixel flat CE ``logsumexp(x) - x_y`` in float64 (leaf labels only)."""
    x = f64(x)
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    return lse - np.take_along_axis(x, labels[:, None].astype(np.int64), axis=1)[:, 0]


# ---------------------------------------------------------------------------- values
@each_backend
@settings(max_examples=40)
@given(data=st.data())
def test_losses_match_oracle(adapter, data):
    h, x64, labels = data.draw(cases())
    dtype = data.draw(st.sampled_from(adapter.dtypes))
    fn = data.draw(st.sampled_from(LOSSES))
    kw = {"reduction": data.draw(st.sampled_from(REDUCTIONS)), PARAM[fn]: data.draw(st.sampled_from(param_values(fn)))}
    if fn == "hierarchical_cross_entropy":
        kw["weighting"] = data.draw(st.sampled_from(["depth", "height"]))
        kw["normalize"] = data.draw(st.booleans())
    x = as_dtype(x64, dtype)
    got = adapter.call(fn, x, labels, h, **kw)
    want = oracle_loss(fn, x, labels, h, **kw)
    assert got.dtype == (np.float64 if dtype == "float64" else np.float32)
    if kw["reduction"] == "none":
        assert got.shape == labels.shape
        assert np.all(got[labels == 255] == 0)
    else:
        assert got.shape == ()
    np.testing.assert_allclose(f64(got), want, **TOL[dtype])


@each_backend
@settings(max_examples=25)
@given(data=st.data())
def test_alpha_zero_is_flat_cross_entropy_and_large_beta_tends_to_it(adapter, data):
    h, x, labels = data.draw(cases(partial=False))
    dtype = data.draw(st.sampled_from([d for d in adapter.dtypes if d in ("float64", "float32")]))
    x = as_dtype(x, dtype)
    hxe = adapter.call("hierarchical_cross_entropy", x, labels, h, alpha=0.0, reduction="none")
    valid = labels != 255
    flat = np.where(valid, flat_cross_entropy(x, np.where(valid, labels, 0)), 0.0)
    np.testing.assert_allclose(f64(hxe), flat, **TOL[dtype])
    # Both reduce to LSE(root) - x_label by exact zeros (their LSE(root) may round differently).
    soft = adapter.call("soft_label_cross_entropy", x, labels, h, beta=1e4, reduction="none")
    tight = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(f64(hxe), f64(soft), **tight)
    # |soft - flat| = |sum_l q(l) (x_label - x_l)| <= (1 - q(label)) * max_l |x_label - x_l|, and
    # 1 - q(label) <= (K - 1) exp(-2 beta) (every other leaf is at distance >= 2).
    spread = np.ptp(f64(x), axis=1)
    for beta in (0.5, 2.0, 8.0, 40.0):
        soft = f64(adapter.call("soft_label_cross_entropy", x, labels, h, beta=beta, reduction="none"))
        bound = (h.num_leaves - 1) * math.exp(-2 * beta) * spread
        assert np.all(np.abs(soft - flat) <= bound + TOL[dtype]["atol"] + TOL[dtype]["rtol"] * np.abs(flat))


def test_partial_labels_by_hand():
    """HXE of a partial label is -log p(node) at alpha=0; the soft target of a partial label in a
    balanced subtree tends to the uniform distribution over its leaves."""
    h = presets.cityscapes()
    vehicle = h.node_names.index("vehicle")
    node = int(h.node_ids[vehicle])
    under = [k for k in range(h.num_leaves) if h.is_ancestor[vehicle, h.leaf_channels[k]]]
    x = np.random.default_rng(3).normal(0, 2, size=(1, h.num_leaves, 2))
    labels = np.array([[node, 255]])
    logp = x[0, :, 0] - np.log(np.exp(x[0, :, 0]).sum())
    want_hxe = -np.log(np.exp(logp[under]).sum())
    assert math.isclose(float(hnp.hierarchical_cross_entropy(x, labels, h, alpha=0.0)), want_hxe, rel_tol=1e-12)
    # alpha > 0 weighs the single edge root -> vehicle by exp(-alpha * depth(vehicle)) = exp(-alpha)
    # (and by exp(-alpha * height(vehicle)), the same here).
    for weighting in ("depth", "height"):
        assert math.isclose(float(hnp.hierarchical_cross_entropy(x, labels, h, alpha=0.7, weighting=weighting)),
                            math.exp(-0.7) * want_hxe, rel_tol=1e-12)
    soft = float(hnp.soft_label_cross_entropy(x, labels, h, beta=60.0))
    assert math.isclose(soft, -logp[under].mean(), rel_tol=1e-12)
    # A leaf label: HXE with alpha is sum of the two weighted edge terms.
    leaf = under[0]
    lp_vehicle = np.log(np.exp(logp[under]).sum())
    # Published (depth): the leaf edge (depth 2) weighs exp(-1.4), the category edge exp(-0.7).
    want = -(math.exp(-0.7) * lp_vehicle + math.exp(-1.4) * (logp[leaf] - lp_vehicle))
    got = float(hnp.hierarchical_cross_entropy(x, np.array([[leaf, 255]]), h, alpha=0.7))
    assert math.isclose(got, want, rel_tol=1e-12)
    # Height: the leaf edge (height 0) weighs 1, the category edge (height 1) exp(-0.7).
    want_height = -(math.exp(-0.7) * lp_vehicle + (logp[leaf] - lp_vehicle))
    got = float(hnp.hierarchical_cross_entropy(x, np.array([[leaf, 255]]), h, alpha=0.7, weighting="height"))
    assert math.isclose(got, want_height, rel_tol=1e-12)
    # normalize=True divides by the sum over the 26 nodes and the root: 7 exp(-0.7) + 19 exp(-1.4) + 1.
    total = 7 * math.exp(-0.7) + 19 * math.exp(-1.4) + 1
    got = float(hnp.hierarchical_cross_entropy(x, np.array([[leaf, 255]]), h, alpha=0.7, normalize=True))
    assert math.isclose(got, want / total, rel_tol=1e-12)


@each_backend
def test_reductions_and_nothing_counted(adapter):
    h = presets.pascal_person_part()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h.num_leaves, 3))
    labels = np.array([[0, 255, 9], [3, 11, 255]])
    for fn in LOSSES:
        none = f64(adapter.call(fn, x, labels, h, reduction="none"))
        assert math.isclose(float(adapter.call(fn, x, labels, h, reduction="sum")), none.sum(), rel_tol=1e-12)
        assert math.isclose(float(adapter.call(fn, x, labels, h)), none.sum() / 4, rel_tol=1e-12)
        ignored = np.full((2, 3), 255)
        for reduction in ("mean", "sum"):
            assert float(adapter.call(fn, x, ignored, h, reduction=reduction)) == 0.0
            if adapter.supports_grad:
                value, grad = adapter.value_and_grad(fn, x, ignored, h, reduction=reduction)
                assert float(value) == 0.0 and not np.any(grad)
        assert not np.any(adapter.call(fn, x, ignored, h, reduction="none"))
        # B = 0: an exact 0, an empty map.
        empty_x, empty_l = np.zeros((0, h.num_leaves, 4, 5)), np.zeros((0, 4, 5), dtype=np.int64)
        assert float(adapter.call(fn, empty_x, empty_l, h)) == 0.0
        assert adapter.call(fn, empty_x, empty_l, h, reduction="none").shape == (0, 4, 5)
        if adapter.supports_grad:
            value, grad = adapter.value_and_grad(fn, empty_x, empty_l, h, reduction="sum")
            assert float(value) == 0.0 and grad.shape == empty_x.shape
    for method in METHODS:
        leaf, depth = adapter.call("decode_leaf_logits", np.zeros((0, h.num_leaves, 4)), h, method=method)
        assert leaf.shape == (0, 4) and depth.shape == (0, h.max_depth, 4)


@each_backend
@pytest.mark.parametrize("dtype, gap", [("float32", 75.0), ("float32", 200.0), ("float64", 800.0)])
def test_far_below_subtrees_stay_finite(adapter, dtype, gap):
    """A labelled subtree whose leaves are all far below the pixel's best leaf: its probability
    underflows in a plain softmax; the loss must still be exact and its gradient finite."""
    if dtype not in adapter.dtypes:
        pytest.skip(f"{adapter.name} has no {dtype}")
    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, size=(2, h.num_leaves, 3))
    marking = [k for k in range(h.num_leaves) if h.leaf_names[k].startswith("marking--discrete")]
    x[:, marking] -= gap
    labels = np.array([[marking[0], int(h.node_ids[h.channel("marking--discrete")]), 255],
                       [marking[3], marking[-1], int(h.node_ids[h.channel("marking")])]])
    x = x.astype(dtype)
    for fn in LOSSES:
        kw = {PARAM[fn]: 0.3, "reduction": "none"}
        got = adapter.call(fn, x, labels, h, **kw)
        want = oracle_loss(fn, x, labels, h, **kw)
        assert np.isfinite(got).all() and got.max() > gap / 4
        np.testing.assert_allclose(f64(got), want, rtol=1e-5 if dtype == "float32" else 1e-10)
        if adapter.supports_grad:
            _, grad = adapter.value_and_grad(fn, x, labels, h, **{PARAM[fn]: 0.3})
            assert np.isfinite(grad).all()
            if dtype == "float64":
                np.testing.assert_allclose(grad, _numeric_grad(fn, x, labels, h, **{PARAM[fn]: 0.3}),
                                           rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- gradients
def _numeric_grad(fn, x, labels, h, eps=1e-6, **kw):
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        loss = getattr(hnp, fn)
        grad[i] = (float(loss(up, labels, h, **kw)) - float(loss(down, labels, h, **kw))) / (2 * eps)
    return grad


@each_backend
@settings(max_examples=15)
@given(data=st.data())
def test_gradients_match_finite_differences(adapter, data):
    need_grad(adapter)
    h = data.draw(hierarchies(max_depth=3, max_children=3, order=None))
    labels = data.draw(label_maps(h, (1, 3), ignore_fraction=0.2, partial_fraction=0.3))
    x = np.random.default_rng(data.draw(st.integers(0, 99))).normal(0, 2, size=(1, h.num_leaves, 3))
    fn = data.draw(st.sampled_from(LOSSES))
    kw = {"reduction": data.draw(st.sampled_from(("mean", "sum"))),
          PARAM[fn]: data.draw(st.sampled_from([0.0, 0.4, 3.0]))}
    value, grad = adapter.value_and_grad(fn, x, labels, h, **kw)
    np.testing.assert_allclose(f64(value), oracle_loss(fn, x, labels, h, **kw), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f64(grad), _numeric_grad(fn, x, labels, h, **kw), rtol=1e-5, atol=1e-7)


@each_backend
@pytest.mark.parametrize("fn", LOSSES)
def test_half_precision_gradients(adapter, fn):
    need_grad(adapter)
    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(5)
    x64 = rng.normal(0, 2, size=(2, h.num_leaves, 3))
    labels = rng.integers(0, h.num_nodes, size=(2, 3))
    _, want = adapter.value_and_grad(fn, x64, labels, h)
    for dtype, tol in (("float32", 1e-5), ("float16", 2e-2), ("bfloat16", 3e-2)):
        value, grad = adapter.value_and_grad(fn, as_dtype(x64, dtype), labels, h)
        assert value.dtype == np.float32
        assert float(np.abs(f64(grad) - want).max()) <= tol * float(np.abs(want).max())


def test_torch_gradcheck_float64():
    torch = pytest.importorskip("torch")
    import hieraloss.torch as ht

    for h in (presets.pascal_person_part(), Hierarchy.from_parents([4, 4, 5, -1, 3, 3]), Hierarchy.from_parents([-1])):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, h.num_leaves, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, h.num_nodes, (2, 3), generator=gen)
        labels[0, 0] = 255
        for reduction in REDUCTIONS:
            def hxe(z, r=reduction, y=labels, t=h):
                return ht.hierarchical_cross_entropy(z, y, t, alpha=0.3, reduction=r)

            def soft(z, r=reduction, y=labels, t=h):
                return ht.soft_label_cross_entropy(z, y, t, beta=0.8, reduction=r)

            assert torch.autograd.gradcheck(hxe, (x,))
            assert torch.autograd.gradcheck(soft, (x,))


def test_torch_matches_cross_entropy_at_alpha_zero():
    torch = pytest.importorskip("torch")
    import hieraloss.torch as ht

    h = presets.cityscapes()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 19, (2, 5, 6), generator=gen)
    labels[1, :2] = 255
    ours = ht.hierarchical_cross_entropy(x, labels, h, alpha=0.0)
    ref = torch.nn.functional.cross_entropy(x, labels, ignore_index=255)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- decoding
@each_backend
@settings(max_examples=30)
@given(data=st.data())
def test_decode_matches_oracle(adapter, data):
    h, x, _ = data.draw(cases())
    method = data.draw(st.sampled_from(METHODS))
    leaf, depth = adapter.call("decode_leaf_logits", x, h, method=method)
    want_leaf, want_depth = oracle.decode_leaf_logits(x, h, method)
    assert leaf.dtype == np.int64 and depth.dtype == np.int64
    np.testing.assert_array_equal(leaf, want_leaf)
    np.testing.assert_array_equal(depth, want_depth)
    assert_consistent(depth, h)


@each_backend
def test_decode_ties_and_top_down_by_hand(adapter):
    h = Hierarchy.from_dict({"a": {"a1": 0, "a2": 1, "a3": 2}, "b": {"b1": 3}})
    x = np.array([1.0, 1.0, 1.0, 1.5]).reshape(1, 4, 1)
    a, b = (int(h.node_ids[h.channel(n)]) for n in ("a", "b"))
    leaf, depth = adapter.call("decode_leaf_logits", x, h, method="argmax")
    assert leaf.ravel().tolist() == [3] and depth[0, :, 0].tolist() == [b, 3]
    # "a" holds more probability (3e vs e^1.5); its children tie: the lowest leaf wins.
    leaf, depth = adapter.call("decode_leaf_logits", x, h, method="top_down")
    assert leaf.ravel().tolist() == [0] and depth[0, :, 0].tolist() == [a, 0]
    tie = np.array([2.0, 0.0, 2.0, 2.0]).reshape(1, 4, 1)
    assert adapter.call("decode_leaf_logits", tie, h, method="argmax")[0].ravel().tolist() == [0]
    # A shallow leaf stops the descent and repeats below its depth.
    u = presets.mapillary_vistas_v2()
    sky = int(u.node_ids[u.channel("nature--sky")])
    x = np.full((1, u.num_leaves, 1), -5.0)
    x[0, sky] = 5.0
    for method in METHODS:
        leaf, depth = adapter.call("decode_leaf_logits", x, u, method=method)
        assert leaf.ravel().tolist() == [sky]
        assert depth[0, :, 0].tolist() == [int(u.node_ids[u.channel("nature")])] + [sky] * 3


# ---------------------------------------------------------------------------- inputs and errors
@each_backend
def test_inputs_not_mutated(adapter):
    h = presets.cityscapes()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, h.num_leaves, 3, 3))
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 3))
    labels[0, 0] = 255
    for fn in LOSSES:
        for reduction in REDUCTIONS:
            assert adapter.inputs_unchanged(fn, x, labels, h, reduction=reduction)
    before = x.copy()
    for method in METHODS:
        adapter.call("decode_leaf_logits", x, h, method=method)
    np.testing.assert_array_equal(x, before)


def _bad_calls(h):
    """(label, fn, args, kwargs, expected type, shared message?) for bad inputs."""
    x = np.zeros((2, h.num_leaves, 3))
    labels = np.zeros((2, 3), dtype=np.int64)
    bad = labels.copy()
    bad[0, 0], bad[1, 2] = 26, 300
    calls = []
    for fn in LOSSES:
        p = PARAM[fn]
        calls += [
            (f"{fn}: node logits", fn, (np.zeros((2, h.num_nodes, 3)), labels, h), {}, ValueError, True),
            (f"{fn}: no batch", fn, (np.zeros((h.num_leaves,)), labels, h), {}, ValueError, True),
            (f"{fn}: int logits", fn, (np.zeros((2, h.num_leaves, 3), dtype=np.int64), labels, h), {}, TypeError, True),
            (f"{fn}: not a hierarchy", fn, (x, labels, "cityscapes"), {}, TypeError, True),
            (f"{fn}: bad values", fn, (x, bad, h), {}, LabelError, True),
            (f"{fn}: ignore collides", fn, (x, labels, h), {"ignore_index": 3}, LabelError, True),
            (f"{fn}: reduction", fn, (x, labels, h), {"reduction": "hssn"}, ValueError, True),
            (f"{fn}: negative {p}", fn, (x, labels, h), {p: -1.0}, ValueError, True),
            (f"{fn}: infinite {p}", fn, (x, labels, h), {p: math.inf}, ValueError, True),
            (f"{fn}: text {p}", fn, (x, labels, h), {p: "big"}, TypeError, True),
            (f"{fn}: label shape", fn, (x, np.zeros((2, 4), dtype=np.int64), h), {}, ValueError, False),
            (f"{fn}: float labels", fn, (x, labels.astype(np.float32), h), {}, LabelError, False),
            (f"{fn}: bool labels", fn, (x, labels.astype(bool), h), {}, LabelError, False),
        ]
    calls += [
        ("decode: method", "decode_leaf_logits", (x, h), {"method": "path"}, ValueError, True),
        ("decode: node logits", "decode_leaf_logits", (np.zeros((2, h.num_nodes, 3)), h), {}, ValueError, True),
    ]
    return calls


def test_bad_inputs_raise_the_same_errors_in_every_backend():
    """Same exception type everywhere; the same message wherever the check is shared (logits layout
    and dtype, arguments, label values, ignore_index). The label dtype/shape checks are each
    backend's own (their wording names the framework's dtypes)."""
    h = presets.cityscapes()
    adapters = [p.values[0] for p in ADAPTERS if p.values[0] is not None]
    assert adapters[0].name == "numpy"
    for label, fn, args, kw, kind, shared in _bad_calls(h):
        messages = []
        for adapter in adapters:
            with pytest.raises(kind) as info:
                adapter.call(fn, *args, **kw)
            messages.append(str(info.value))
        if shared:
            assert len(set(messages)) == 1, (label, messages)
        for needle in {"node logits": "leaves", "bad values": "300", "reduction": "hssn", "label shape": "shape",
                       "float labels": "integer", "bool labels": "bool", "method": "path"}.items():
            if label.endswith(needle[0]):
                assert all(needle[1] in m for m in messages), (label, messages)


def test_framework_type_errors():
    h = presets.cityscapes()
    for adapter in [p.values[0] for p in ADAPTERS[1:] if p.values[0] is not None]:
        with pytest.raises(TypeError, match=f"leaf_logits must be a {adapter.name}.Tensor, got list"):
            adapter.lib.hierarchical_cross_entropy([[0.0]], np.zeros(1, np.int64), h)
        with pytest.raises(TypeError, match="leaf_logits must be"):
            adapter.lib.decode_leaf_logits(np.zeros((1, 19)), h)


# ---------------------------------------------------------------------------- modules and layers
def test_torch_modules():
    torch = pytest.importorskip("torch")
    import hieraloss.torch as ht

    h = presets.lip()
    x = torch.randn(2, h.num_leaves, 4, 3, requires_grad=True)
    labels = torch.randint(0, h.num_nodes, (2, 4, 3))
    m = ht.HierarchicalCrossEntropyLoss(h, alpha=0.25, reduction="sum")
    assert torch.equal(m(x, labels), ht.hierarchical_cross_entropy(x, labels, h, alpha=0.25, reduction="sum"))
    s = ht.SoftLabelCrossEntropyLoss(h, beta=2.0, ignore_index=-1)
    assert torch.equal(s(x, labels), ht.soft_label_cross_entropy(x, labels, h, beta=2.0, ignore_index=-1))
    assert "alpha=0.25" in repr(m) and "beta=2.0" in repr(s)
    assert not m.state_dict()
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        ht.HierarchicalCrossEntropyLoss(h, alpha=-1)
    with pytest.raises(ValueError, match="reduction"):
        ht.SoftLabelCrossEntropyLoss(h, reduction="hssn")
    with pytest.raises(LabelError, match="collides"):
        ht.SoftLabelCrossEntropyLoss(h, ignore_index=0)


def test_paddle_layers():
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hp

    paddle.set_device("cpu")
    h = presets.lip()
    x = paddle.randn([2, h.num_leaves, 4, 3])
    labels = paddle.randint(0, h.num_nodes, [2, 4, 3])
    m = hp.HierarchicalCrossEntropyLoss(h, alpha=0.25, reduction="sum")
    np.testing.assert_array_equal(m(x, labels).numpy(),
                                  hp.hierarchical_cross_entropy(x, labels, h, alpha=0.25, reduction="sum").numpy())
    s = hp.SoftLabelCrossEntropyLoss(h, beta=2.0)
    np.testing.assert_array_equal(s(x, labels).numpy(), hp.soft_label_cross_entropy(x, labels, h, beta=2.0).numpy())
    assert "alpha=0.25" in repr(m)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        hp.SoftLabelCrossEntropyLoss(h, beta=float("nan"))


# ---------------------------------------------------------------------------- integrations
@pytest.fixture
def mmseg_models(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("mmseg")
    registry = pytest.importorskip("mmseg.registry")
    try:
        importlib.import_module("mmseg.models")
    except Exception:  # mmcv-lite: no compiled ops, so mmseg's own models cannot load
        monkeypatch.setattr(registry.MODELS, "_imported", True)
    import hieraloss.integrations.mmseg as hmm

    hmm.register()
    return registry.MODELS


def test_mmseg_builds_the_leaf_losses(mmseg_models):
    import torch

    import hieraloss.integrations.mmseg as hmm
    import hieraloss.torch as ht

    h = presets.cityscapes()
    assert {"HieraHierarchicalCELoss", "HieraSoftLabelCELoss"} <= set(hmm.LOSS_NAMES)
    torch.manual_seed(0)
    x = torch.randn(2, 19, 6, 5, requires_grad=True)
    y = torch.randint(0, 19, (2, 6, 5))
    y[:, :2] = 255
    hxe = mmseg_models.build(dict(type="HieraHierarchicalCELoss", hierarchy="cityscapes", alpha=0.5, loss_weight=2.0))
    assert hxe.loss_name == "loss_hxe"
    torch.testing.assert_close(hxe(x, y, weight=None, ignore_index=255),
                               2.0 * ht.hierarchical_cross_entropy(x, y, h, alpha=0.5))
    soft = mmseg_models.build(dict(type="HieraSoftLabelCELoss", hierarchy="cityscapes", beta=3.0,
                                   loss_name="loss_soft"))
    got = soft(x, y)
    torch.testing.assert_close(got, ht.soft_label_cross_entropy(x, y, h, beta=3.0))
    got.backward()
    assert torch.isfinite(x.grad).all()
    # Pixel weights (e.g. from a sampler) scale each pixel; the mean still divides by counted pixels.
    w = torch.rand(2, 6, 5)
    per_pixel = ht.soft_label_cross_entropy(x, y, h, beta=3.0, reduction="none")
    torch.testing.assert_close(soft(x, y, weight=w), (per_pixel * w).sum() / (y != 255).sum())
    torch.testing.assert_close(soft(x, y, weight=w, reduction_override="sum"), (per_pixel * w).sum())
    with pytest.raises(ValueError, match="alpha"):
        hmm.HieraHierarchicalCELoss("cityscapes", alpha=-1.0)


def test_paddleseg_builds_the_leaf_losses():
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hp
    from hieraloss.integrations import paddleseg as hps

    class Manager:  # the part of PaddleSeg's ComponentManager that registration and building use
        def __init__(self):
            self.components_dict = {}

        def add_component(self, cls):
            self.components_dict[cls.__name__] = cls

        def __getitem__(self, name):
            return self.components_dict[name]

    paddle.set_device("cpu")
    manager = hps.register(Manager())
    h = presets.cityscapes()
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(2, 19, 4, 4)).astype(np.float32))
    y = paddle.to_tensor(rng.integers(0, 26, size=(2, 1, 4, 4)))  # PaddleSeg may hand [B, 1, H, W]
    hxe = manager["HieraHierarchicalCELoss"](hierarchy="cityscapes", alpha=0.5)
    np.testing.assert_allclose(hxe(x, y).numpy(), hp.hierarchical_cross_entropy(x, y.squeeze(1), h, alpha=0.5).numpy())
    soft = manager["HieraSoftLabelCELoss"](hierarchy="cityscapes", beta=2.0, ignore_index=255)
    np.testing.assert_allclose(soft(x, y).numpy(), hp.soft_label_cross_entropy(x, y.squeeze(1), h, beta=2.0).numpy())
