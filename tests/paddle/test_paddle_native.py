"""The compiled CPU tree-min kernel behind hieraloss.paddle (hieraloss.paddle.ops.native).

Values and gradients against the loop oracle (float64 exact to rounding, float32 within a few ulp)
over random hierarchies, tile-spanning shapes, ignore masks, partial labels, ties, reductions, node
weights and gammas; against the vectorized paddle op on presets; a float64 finite-difference check;
the fused-gradient bookkeeping (upstream scaling, retained graph); dispatch, dtypes, immutability and
the disabled-kernel error path. The kernel itself (instruction sets, threads) is tests/native/test_native_tree_min.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

paddle = pytest.importorskip("paddle")

import hieraloss  # noqa: E402
import hieraloss.paddle as hp  # noqa: E402
from hieraloss import _native  # noqa: E402
from hieraloss.paddle.ops import native as paddle_native  # noqa: E402
from hieraloss.testing import hierarchies, label_maps, logits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helpers in tests/
import oracle  # noqa: E402

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"native kernel unavailable: {_native.load_error()}")
paddle.set_device("cpu")
REDUCTIONS = ("mean", "sum", "none", "hssn")


def _loss(x, labels, h, *, gamma, backend="native", **kw):
    if gamma is None:
        return hp.tree_min_loss(x, labels, h, backend=backend, **kw)
    return hp.focal_tree_min_loss(x, labels, h, gamma=gamma, backend=backend, **kw)


def _value_and_grad(x, labels, h, *, gamma, reduction, weight=None, upstream=None, backend="native", dtype=None):
    """Value and d sum(value * upstream) / d logits, as numpy (bfloat16 results as float32)."""
    xt = paddle.to_tensor(np.asarray(x))
    if dtype is not None:
        xt = xt.astype(dtype)
    xt.stop_gradient = False
    value = _loss(xt, paddle.to_tensor(np.asarray(labels)), h, gamma=gamma, reduction=reduction,
                  node_weight=weight, backend=backend)
    up = paddle.ones_like(value) if upstream is None else paddle.to_tensor(upstream).astype(value.dtype)
    (grad,) = paddle.grad((value * up).sum(), xt)
    return value, grad


def _np(t):
    return (t.astype("float32") if t.dtype == paddle.bfloat16 else t).numpy()


# ---------------------------------------------------------------------------- against the loop oracle
@st.composite
def cases(draw, ties=True):
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    # one partial tile, exactly one tile (64 pixels), several tiles, 2-D and 3-D spatial ranks
    shape = draw(st.sampled_from([(1, 5), (2, 64), (1, 3, 47), (2, 150), (1, 2, 2, 33)]))
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = draw(logits(h, shape, ties=ties))
    return h, x, labels


def _upstream(x, reduction):
    return np.random.default_rng(1).normal(size=x.shape) if reduction == "none" else None


@settings(max_examples=25)
@given(data=st.data())
def test_matches_loop_oracle_float64(data):
    h, x, labels = data.draw(cases(ties=True))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([None, 2.0, 0.5]))
    w = np.random.default_rng(0).uniform(0.5, 2.0, h.num_nodes) if data.draw(st.booleans()) else None
    upstream = _upstream(x, reduction)
    value, grad = _value_and_grad(x, labels, h, gamma=gamma, reduction=reduction, weight=w, upstream=upstream)
    assert value.dtype == grad.dtype == paddle.float64
    want = oracle.tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction, node_weight=w)
    want_grad = oracle.tree_min_grad(x, labels, h, gamma=gamma, reduction=reduction, node_weight=w,
                                     upstream=upstream)
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)


@settings(max_examples=25)
@given(data=st.data())
def test_matches_loop_oracle_float32(data):
    """float32 runs the kernel's own exp/log1p polynomials: within a few ulp of the float64 truth."""
    h, x, labels = data.draw(cases(ties=True))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([None, 2.0, 0.5]))
    x32 = x.astype(np.float32)
    upstream = _upstream(x, reduction)
    value, grad = _value_and_grad(x32, labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
    assert value.dtype == grad.dtype == paddle.float32
    exact = x32.astype(np.float64)  # the same inputs, in float64
    want = oracle.tree_min_loss(exact, labels, h, gamma=gamma, reduction=reduction)
    want_grad = oracle.tree_min_grad(exact, labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
    np.testing.assert_allclose(value.numpy(), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=2e-6, atol=1e-7 * max(1.0, np.abs(want_grad).max()))


# ---------------------------------------------------------------------------- against the paddle op, larger
@pytest.mark.parametrize("preset,batch", [("cityscapes", 2), ("mapillary_vistas_v2", 1)])
@pytest.mark.parametrize("gamma", [None, 2.0])
def test_matches_vectorized_paddle_op_on_presets(preset, batch, gamma):
    h = hieraloss.presets.get(preset)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(batch, h.num_nodes, 19, 71)) * 3).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, (batch, 19, 71))  # leaves and partial labels
    labels[:, :2] = 255
    w = rng.uniform(0.5, 2.0, h.num_nodes)
    for reduction in REDUCTIONS:
        up = rng.normal(size=x.shape) if reduction == "none" else None
        value, grad = _value_and_grad(x, labels, h, gamma=gamma, reduction=reduction, weight=w, upstream=up)
        want, want_grad = _value_and_grad(x.astype(np.float64), labels, h, gamma=gamma, reduction=reduction,
                                          weight=w, upstream=up, backend="paddle")
        want_grad = want_grad.numpy()
        np.testing.assert_allclose(value.numpy(), want.numpy(), rtol=3e-6, atol=1e-7)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=3e-6, atol=1e-7 * np.abs(want_grad).max())


@settings(max_examples=8)
@given(data=st.data())
def test_gradient_matches_finite_differences_float64(data):
    """Central differences along random directions and coordinates (no ties: away from the kinks)."""
    h, x, labels = data.draw(cases(ties=False))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([0.0, 2.0, 1.5]))
    rng = np.random.default_rng(2)
    up = rng.normal(size=x.shape)
    lab = paddle.to_tensor(labels)

    def f(arr):
        v = hp.focal_tree_min_loss(paddle.to_tensor(arr), lab, h, gamma=gamma, reduction=reduction, backend="native")
        return float((v * paddle.to_tensor(up)).sum()) if reduction == "none" else float(v)

    _, grad = _value_and_grad(x, labels, h, gamma=gamma, reduction=reduction, upstream=up if reduction == "none"
                              else None)
    grad = grad.numpy()
    directions = [rng.normal(size=x.shape) for _ in range(3)]
    for flat in rng.choice(x.size, size=min(6, x.size), replace=False):
        e = np.zeros(x.size)
        e[flat] = 1.0
        directions.append(e.reshape(x.shape))
    eps = 1e-6
    for v in directions:
        numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
        analytic = float((grad * v).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


# ---------------------------------------------------------------------------- fused-gradient bookkeeping
def _setup(seed=0, shape=(2, 9, 13), dtype=np.float64):
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(shape[0], h.num_nodes, *shape[1:])).astype(dtype)
    labels = rng.integers(0, h.num_nodes, shape)
    return h, x, labels


def test_upstream_scaling_and_retained_graph_second_backward():
    """The forward pass writes the gradient; backward scales it (3x), a second backward through the
    retained graph recomputes it (0.5x). ``paddle.grad``: in paddle 3.3 a second ``Tensor.backward()``
    through any PyLayer (the vectorized op's too) crashes the process."""
    h, x, labels = _setup()
    xt = paddle.to_tensor(x, stop_gradient=False)
    loss = hp.tree_min_loss(xt, paddle.to_tensor(labels), h, backend="native")
    (first,) = paddle.grad(3.0 * loss, xt, retain_graph=True)
    (second,) = paddle.grad(0.5 * loss, xt)
    _, want = _value_and_grad(x, labels, h, gamma=None, reduction="mean", backend="paddle")
    np.testing.assert_allclose(first.numpy(), 3.0 * want.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(second.numpy(), 0.5 * want.numpy(), rtol=1e-10, atol=1e-15)
    # and through Tensor.backward, accumulating into .grad
    xt2 = paddle.to_tensor(x, stop_gradient=False)
    (2.5 * hp.tree_min_loss(xt2, paddle.to_tensor(labels), h, reduction="hssn", backend="native")).backward()
    _, want = _value_and_grad(x, labels, h, gamma=None, reduction="hssn", backend="paddle")
    np.testing.assert_allclose(xt2.grad.numpy(), 2.5 * want.numpy(), rtol=1e-10, atol=1e-15)


def test_inputs_are_not_modified_and_no_grad_mode_works():
    h, x, labels = _setup(1)
    xt = paddle.to_tensor(x, stop_gradient=False)
    lt = paddle.to_tensor(labels.astype(np.int32))
    wt = paddle.to_tensor(np.linspace(0.5, 1.5, h.num_nodes))
    for reduction in REDUCTIONS:
        out = hp.focal_tree_min_loss(xt, lt, h, reduction=reduction, node_weight=wt, backend="native")
        out.sum().backward()
    np.testing.assert_array_equal(xt.numpy(), x)
    np.testing.assert_array_equal(lt.numpy(), labels)
    np.testing.assert_array_equal(wt.numpy(), np.linspace(0.5, 1.5, h.num_nodes))
    with paddle.no_grad():
        value = hp.tree_min_loss(xt, lt, h, backend="native")
    assert value.stop_gradient
    want = hp.tree_min_loss(paddle.to_tensor(x), lt, h, backend="paddle")
    np.testing.assert_allclose(value.numpy(), want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_logits_compute_in_float32_and_keep_the_gradient_dtype(dtype, tol):
    h, x, labels = _setup(2, shape=(2, 6, 10))
    for reduction in ("mean", "none"):
        up = _upstream(x, reduction)
        value, grad = _value_and_grad(x, labels, h, gamma=2.0, reduction=reduction, upstream=up, dtype=dtype)
        assert value.dtype == paddle.float32 and grad.dtype == getattr(paddle, dtype)
        rounded = paddle.to_tensor(x).astype(dtype).astype("float64").numpy()  # the inputs the kernel saw
        want = oracle.tree_min_loss(rounded, labels, h, gamma=2.0, reduction=reduction)
        want_grad = oracle.tree_min_grad(rounded, labels, h, gamma=2.0, reduction=reduction, upstream=up)
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(_np(grad), want_grad, rtol=tol, atol=tol * np.abs(want_grad).max())


def test_non_contiguous_logits_and_spatial_ranks():
    h, x, labels = _setup(3, shape=(2, 4, 5))
    nhwc = paddle.to_tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), stop_gradient=False)
    view = nhwc.transpose([0, 3, 1, 2])
    assert not view.is_contiguous()
    out = hp.focal_tree_min_loss(view, paddle.to_tensor(labels), h, reduction="sum", backend="native")
    out.backward()
    want, want_grad = _value_and_grad(x, labels, h, gamma=2.0, reduction="sum", backend="paddle")
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-12)
    np.testing.assert_allclose(nhwc.grad.numpy().transpose(0, 3, 1, 2), want_grad.numpy(), rtol=1e-10, atol=1e-15)
    for spatial in [(), (7,), (2, 3, 4)]:
        xs = np.random.default_rng(4).normal(size=(2, h.num_nodes, *spatial))
        ls = np.random.default_rng(5).integers(0, h.num_nodes, (2, *spatial))
        for reduction in REDUCTIONS:
            got = hp.tree_min_loss(paddle.to_tensor(xs), paddle.to_tensor(ls), h, reduction=reduction,
                                   backend="native")
            np.testing.assert_allclose(got.numpy(), oracle.tree_min_loss(xs, ls, h, reduction=reduction),
                                       rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- dispatch and errors
def test_auto_dispatches_to_the_kernel_on_cpu_and_paddle_does_not(monkeypatch):
    calls = []
    real = paddle_native.tree_min_native

    def spy(*args, **kw):
        calls.append(kw["reduction"])
        return real(*args, **kw)

    real_objective = paddle_native.hssn_objective_native

    def spy_objective(*args, **kw):
        calls.append("objective")
        return real_objective(*args, **kw)

    monkeypatch.setattr(paddle_native, "tree_min_native", spy)
    monkeypatch.setattr(paddle_native, "hssn_objective_native", spy_objective)
    h, x, labels = _setup(6, shape=(1, 3, 3))
    xt, lt = paddle.to_tensor(x), paddle.to_tensor(labels)
    hp.tree_min_loss(xt, lt, h, backend="paddle")
    hp.hssn_loss(xt, lt, h, backend="paddle")
    assert calls == []
    hp.tree_min_loss(xt, lt, h)  # auto
    hp.focal_tree_min_loss(xt, lt, h, reduction="sum", backend="native")
    hp.TreeMinLoss(h, reduction="none", backend="native")(xt, lt)
    hp.hssn_loss(xt, lt, h)  # tree-min and every depth's cross-entropy in one kernel pass
    hp.hssn_loss(xt, lt, h, backend="native")
    assert calls == ["mean", "sum", "none", "objective", "objective"]
    assert "native" in hp.BACKENDS


def test_disabled_kernel_falls_back_and_native_backend_errors():
    code = (
        "import numpy as np, paddle, hieraloss, hieraloss.paddle as hp\n"
        "from hieraloss import _native\n"
        "assert not _native.available() and 'HIERALOSS_NATIVE=0' in _native.load_error()\n"
        "h = hieraloss.presets.cityscapes()\n"
        "x = paddle.to_tensor(np.random.default_rng(0).normal(size=(1, 26, 3, 3)).astype('float32'))\n"
        "y = paddle.zeros([1, 3, 3], dtype='int64')\n"
        "assert float(hp.tree_min_loss(x, y, h)) == float(hp.tree_min_loss(x, y, h, backend='paddle'))\n"
        "try:\n"
        "    hp.tree_min_loss(x, y, h, backend='native')\n"
        "except RuntimeError as exc:\n"
        "    assert 'compiled CPU kernel' in str(exc) and 'HIERALOSS_NATIVE=0' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, HIERALOSS_NATIVE="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_native_backend_error_names_the_reason(monkeypatch):
    h, x, labels = _setup(7, shape=(1, 2, 2))
    xt = paddle.to_tensor(x)
    monkeypatch.setattr(hieraloss._native, "available", lambda: False)
    monkeypatch.setattr(hieraloss._native, "load_error", lambda: "not built (test)")
    with pytest.raises(RuntimeError, match=r"backend='native'.*not built \(test\)"):
        hp.tree_min_loss(xt, paddle.to_tensor(labels), h, backend="native")


def test_thread_count_follows_omp_num_threads_and_changes_no_gradient(monkeypatch):
    h, x, labels = _setup(8, shape=(3, 17, 41), dtype=np.float32)
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        assert paddle_native.num_threads() == int(threads)
        results.append(_value_and_grad(x, labels, h, gamma=None, reduction="hssn"))
    np.testing.assert_array_equal(results[0][1].numpy(), results[1][1].numpy())  # per entry: no cross-pixel sums
    np.testing.assert_allclose(results[0][0].numpy(), results[1][0].numpy(), rtol=1e-6)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert paddle_native.num_threads() >= 1


def test_gradient_buffers_are_pooled_and_never_shared_while_in_use():
    """Large gradients come from hieraloss._native.BUFFERS through DLPack: a buffer is handed out
    again only after every tensor using it is gone, and the values stay right."""
    hieraloss.release_cpu_buffers()
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(6)
    x = rng.normal(0, 2, (1, h.num_nodes, 64, 640)).astype(np.float32)  # 4.3 MB: pooled
    labels = rng.integers(0, h.num_leaves, (1, 64, 640))

    def grad_of():
        xt = paddle.to_tensor(x, stop_gradient=False)
        hp.tree_min_loss(xt, paddle.to_tensor(labels), h, backend="native").backward()
        return xt.grad

    first = grad_of()
    pooled = {a.ctypes.data for a in _native.BUFFERS._arrays}
    assert first.data_ptr() in pooled  # paddle keeps the kernel's buffer as x.grad
    kept = first.numpy().copy()
    second = grad_of()  # first is still alive: a different buffer
    assert first.data_ptr() != second.data_ptr()
    np.testing.assert_array_equal(first.numpy(), kept)
    ptr = second.data_ptr()
    del second
    third = grad_of()
    assert third.data_ptr() == ptr  # the free one, not the one first still uses
    want = oracle.tree_min_grad(x.astype(np.float64), labels, h)
    np.testing.assert_allclose(third.numpy(), want, rtol=2e-6, atol=1e-9)
    np.testing.assert_array_equal(first.numpy(), kept)
    hieraloss.release_cpu_buffers()


# ---------------------------------------------------------------------------- the HSSN objective
# (tree-min and every depth's cross-entropy in one kernel pass: paddle_native.hssn_objective_native,
# behind hssn_loss; the kernel itself is covered by tests/native/test_native_objective.py)
from _objective_cases import cases as objective_cases  # noqa: E402
from oracle import objective_reference  # noqa: E402


def _objective(x, labels, h, *, gamma=0.0, node_weight=None, tree_min_weight=5.0, ce_weights=None):
    """(total, tm, ce, d total / d x) through the paddle twin, as numpy."""
    xt = paddle.to_tensor(np.asarray(x), stop_gradient=False)
    lc = paddle.to_tensor(h.label_channels(np.asarray(labels), 255).astype(np.int64))
    w = None if node_weight is None else paddle.to_tensor(np.asarray(node_weight, dtype=np.float64))
    ce_weights = [1.0] * h.max_depth if ce_weights is None else ce_weights
    total, tm, ce = paddle_native.hssn_objective_native(xt, lc, h, gamma=gamma, node_weight=w,
                                                        tree_min_weight=tree_min_weight, ce_weights=ce_weights)
    assert tm.stop_gradient and ce.stop_gradient and not total.stop_gradient
    (grad,) = paddle.grad(total, xt)
    return total.numpy(), tm.numpy(), ce.numpy(), grad.numpy(), total.dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@settings(max_examples=10)
@given(data=st.data())
def test_objective_matches_loop_reference(dtype, data):
    h, x, labels, kw = data.draw(objective_cases(ties=True))
    x = x.astype(dtype)
    total, tm, ce, grad, out_dtype = _objective(x, labels, h, **kw)
    assert out_dtype == (paddle.float64 if dtype == np.float64 else paddle.float32) and ce.shape == (h.max_depth,)
    want_total, want_tm, want_ce, want_grad = objective_reference(x.astype(np.float64), labels, h, **kw)
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (3e-6, 1e-6)
    np.testing.assert_allclose(total, want_total, rtol=rtol, atol=atol)
    np.testing.assert_allclose(tm, want_tm, rtol=rtol, atol=atol)
    np.testing.assert_allclose(ce, want_ce, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=atol * max(1.0, np.abs(want_grad).max()))


@pytest.mark.parametrize("preset,batch", [("cityscapes", 2), ("mapillary_vistas_v2", 1)])
def test_hssn_loss_native_matches_the_paddle_ops(preset, batch):
    """hssn_loss through the kernel (auto on the CPU) vs backend="paddle" (vectorized tree-min +
    per-depth cross-entropy ops): total, parts (detached here), gradient; inputs untouched."""
    h = hieraloss.presets.get(preset)
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(batch, h.num_nodes, 9, 23)) * 3).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, (batch, 9, 23))  # leaves and partial labels
    labels[:, :2] = 255
    w = rng.uniform(0.5, 2.0, h.num_nodes)
    ce_weights = [1.0, 0.0, 0.5, 2.0][: h.max_depth]
    kw = dict(focal_gamma=2.0, node_weight=w, ce_weights=ce_weights, return_parts=True)
    xt = paddle.to_tensor(x, stop_gradient=False)
    lt = paddle.to_tensor(labels)
    total, parts = hp.hssn_loss(xt, lt, h, **kw)
    total.backward()
    xr = paddle.to_tensor(x.astype(np.float64), stop_gradient=False)
    want, want_parts = hp.hssn_loss(xr, lt, h, backend="paddle", **kw)
    want.backward()
    assert total.dtype == paddle.float32 and set(parts) == set(want_parts)
    np.testing.assert_allclose(total.numpy(), want.numpy(), rtol=2e-6)
    for name in parts:
        assert parts[name].stop_gradient
        np.testing.assert_allclose(parts[name].numpy(), want_parts[name].numpy(), rtol=2e-6, atol=1e-7)
    g, gw = xt.grad.numpy(), xr.grad.numpy()
    np.testing.assert_allclose(g, gw, rtol=3e-6, atol=1e-6 * np.abs(gw).max())
    np.testing.assert_array_equal(xt.numpy(), x)
    np.testing.assert_array_equal(lt.numpy(), labels)


def test_objective_upstream_scaling_retained_graph_and_no_grad():
    h, x, labels = _setup(9)
    lc = paddle.to_tensor(h.label_channels(labels, 255).astype(np.int64))
    kw = dict(gamma=2.0, node_weight=None, tree_min_weight=5.0, ce_weights=[1.0, 0.5])
    xt = paddle.to_tensor(x, stop_gradient=False)
    total, tm, ce = paddle_native.hssn_objective_native(xt, lc, h, **kw)
    (first,) = paddle.grad(3.0 * total, xt, retain_graph=True)  # the gradient the forward pass wrote
    (second,) = paddle.grad(0.5 * total, xt)  # recomputed (gradient-only kernel pass)
    want = objective_reference(x, labels, h, **kw)
    np.testing.assert_allclose(first.numpy(), 3.0 * want[3], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(second.numpy(), 0.5 * want[3], rtol=1e-10, atol=1e-15)
    with paddle.no_grad():
        again, tm2, ce2 = paddle_native.hssn_objective_native(xt, lc, h, **kw)
    assert again.stop_gradient
    assert float(again) == float(total) and float(tm2) == float(tm)
    np.testing.assert_array_equal(ce2.numpy(), ce.numpy())
    for dtype in ("float16", "bfloat16"):
        xh = paddle.to_tensor(x).astype(dtype)
        xh.stop_gradient = False
        total_h, _, _ = paddle_native.hssn_objective_native(xh, lc, h, **kw)
        (gh,) = paddle.grad(total_h, xh)
        assert total_h.dtype == paddle.float32 and gh.dtype == getattr(paddle, dtype)
        rounded = xh.astype("float64").numpy()
        np.testing.assert_allclose(total_h.numpy(), objective_reference(rounded, labels, h, **kw)[0], rtol=1e-5)
