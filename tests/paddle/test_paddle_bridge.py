"""The DLPack bridge from hieraloss.paddle to the fused Triton kernels of hieraloss.torch.kernels.

Zero-copy views are checked without Triton. The fused path runs on the CPU under the Triton
interpreter (TRITON_INTERPRET=1, set by conftest.py) with tiny shapes, and must equal the
vectorized paddle op (values, gradients, decoding).
"""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
pytest.importorskip("torch")

from _kernel_marks import needs_kernels  # noqa: E402

import hieraloss.paddle as hp  # noqa: E402
from hieraloss import presets  # noqa: E402
from hieraloss.paddle import _bridge  # noqa: E402
from hieraloss.paddle.ops import route  # noqa: E402

paddle.set_device("cpu")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "int64"])
def test_dlpack_views_share_memory(dtype):
    x = paddle.arange(24).reshape([2, 3, 4]).astype(dtype)
    t = _bridge.to_torch(x)
    assert t.data_ptr() == x.data_ptr()
    assert tuple(t.shape) == (2, 3, 4) and str(t.dtype) == f"torch.{dtype}"
    back = _bridge.to_paddle(t)
    assert back.data_ptr() == x.data_ptr() and back.dtype == x.dtype
    # A view, not a copy: a write through torch shows in paddle (on a tensor of our own).
    t[0, 0, 0] = 7
    assert float(x[0, 0, 0].astype("float64")) == 7.0


def test_dlpack_of_a_tensor_that_requires_grad_is_a_view():
    x = paddle.ones([3, 2])
    x.stop_gradient = False
    assert _bridge.to_torch(x).data_ptr() == x.data_ptr()


def test_auto_stays_on_paddle_for_cpu_tensors():
    x = paddle.zeros([1, 26, 2])
    h = presets.cityscapes()
    assert not route.use_triton("auto", x, h)
    assert not route.use_triton("paddle", x, h)


def test_auto_leaves_trees_too_slow_to_compile_to_the_paddle_ops(monkeypatch):
    """As in torch: ``"auto"`` on a GPU gives the fused kernels trees of at most AUTO_FUSED_MAX_NODES
    nodes (the rule alone: a GPU and the kernels stood in)."""
    from types import SimpleNamespace

    from hieraloss.core.rules import AUTO_FUSED_MAX_NODES

    monkeypatch.setattr(route, "is_gpu", lambda x: True)
    monkeypatch.setattr(_bridge, "unavailable_reason", lambda x: None)
    monkeypatch.setattr(_bridge, "unsupported_reason", lambda x, hierarchy, op="objective": None)
    x = paddle.zeros([1, 3, 2])
    assert route.use_triton("auto", x, SimpleNamespace(num_nodes=AUTO_FUSED_MAX_NODES))
    assert not route.use_triton("auto", x, SimpleNamespace(num_nodes=AUTO_FUSED_MAX_NODES + 1))
    assert route.use_triton("triton", x, SimpleNamespace(num_nodes=AUTO_FUSED_MAX_NODES + 1))


def test_triton_backend_without_kernels_says_why(monkeypatch):
    monkeypatch.setattr(_bridge, "unavailable_reason", lambda x: "triton is not installed")
    h = presets.cityscapes()
    with pytest.raises(RuntimeError, match="backend='triton'.*triton is not installed"):
        hp.tree_min_loss(paddle.zeros([1, 26, 2]), paddle.zeros([1, 2], dtype="int64"), h, backend="triton")


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("reduction", ["mean", "none", "hssn"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_fused_equals_paddle_op(reduction, gamma):
    h = presets.pascal_person_part()
    rng = np.random.default_rng(int(gamma) * 10 + len(reduction))
    x = rng.normal(0, 3, size=(2, h.num_nodes, 3, 5)).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 5))
    labels[0, 0, :2] = 255
    weight = np.linspace(0.5, 1.5, h.num_nodes)
    up = rng.normal(size=x.shape).astype(np.float32) if reduction == "none" else np.float32(1.3)
    results = {}
    for backend in ("paddle", "triton"):
        xt = paddle.to_tensor(x, stop_gradient=False)
        out = hp.focal_tree_min_loss(
            xt,
            paddle.to_tensor(labels),
            h,
            gamma=gamma,
            reduction=reduction,
            node_weight=weight,
            backend=backend,
        )
        (out * paddle.to_tensor(up)).sum().backward()
        results[backend] = (out.numpy(), xt.grad.numpy(), out.dtype, xt.grad.dtype)
    (v_p, g_p, vd_p, gd_p), (v_t, g_t, vd_t, gd_t) = results["paddle"], results["triton"]
    assert vd_p == vd_t and gd_p == gd_t
    np.testing.assert_allclose(v_t, v_p, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(g_t, g_p, rtol=0, atol=4e-6 * np.abs(g_p).max())


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("focal_gamma", [None, 2.0])
def test_fused_hssn_objective_equals_paddle_ops(focal_gamma):
    """hssn_loss on backend='triton' (one fused pass through the bridge) equals the paddle ops:
    total and gradient, and the parts as detached values."""
    h = presets.pascal_person_part()
    rng = np.random.default_rng(17)
    x = rng.normal(0, 3, size=(2, h.num_nodes, 3, 5)).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 5))
    labels[1, 2, :3] = 255
    weight = np.linspace(0.5, 1.5, h.num_nodes)
    results = {}
    for backend in ("paddle", "triton"):
        xt = paddle.to_tensor(x, stop_gradient=False)
        total, parts = hp.hssn_loss(xt, paddle.to_tensor(labels), h, focal_gamma=focal_gamma,
                                    node_weight=weight if focal_gamma else None,
                                    ce_weights=[1.0, 0.5, 0.0], tree_min_weight=2.0, return_parts=True,
                                    backend=backend)
        (total * 1.7).backward()
        results[backend] = (float(total), xt.grad.numpy(), {k: float(v) for k, v in parts.items()}, parts)
    (t_p, g_p, p_p, _), (t_t, g_t, p_t, raw_t) = results["paddle"], results["triton"]
    np.testing.assert_allclose(t_t, t_p, rtol=2e-6)
    np.testing.assert_allclose(g_t, g_p, rtol=0, atol=4e-6 * np.abs(g_p).max())
    assert set(p_t) == set(p_p) == {"tree_min", "ce_depth1", "ce_depth2"}
    for k in p_t:
        np.testing.assert_allclose(p_t[k], p_p[k], rtol=2e-6)
        assert raw_t[k].stop_gradient


@needs_kernels
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_cross_entropy_triton_equals_paddle_op(depth):
    """depth_cross_entropy(backend='triton'): the fused kernel's cross-entropy alone, through the bridge,
    equals the paddle op (value and gradient); a bad backend name is rejected."""
    h = presets.pascal_person_part()
    rng = np.random.default_rng(depth)
    x = rng.normal(0, 3, size=(2, h.num_nodes, 3, 5)).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 5))
    labels[0, 1, :2] = 255
    out = {}
    for backend in ("paddle", "triton"):
        xt = paddle.to_tensor(x, stop_gradient=False)
        loss = hp.depth_cross_entropy(xt, paddle.to_tensor(labels), h, depth, backend=backend)
        (loss * 0.7).backward()
        out[backend] = (float(loss), xt.grad.numpy())
    np.testing.assert_allclose(out["triton"][0], out["paddle"][0], rtol=2e-6)
    np.testing.assert_allclose(out["triton"][1], out["paddle"][1], rtol=0, atol=4e-6 * np.abs(out["paddle"][1]).max())
    with pytest.raises(ValueError, match="backend"):
        hp.depth_cross_entropy(paddle.to_tensor(x), paddle.to_tensor(labels), h, depth, backend="cuda")


@needs_kernels
def test_fused_saves_views_and_returns_views(monkeypatch):
    """The logits reach the kernel as a zero-copy view, and the loss comes back as one."""
    from hieraloss.torch import kernels

    seen = {}
    real = kernels.fused_tree_min_loss

    def spy(logits, label_channels, hierarchy, **kw):
        seen["logits_ptr"] = logits.data_ptr()
        seen["labels_ptr"] = label_channels.data_ptr()
        out = real(logits, label_channels, hierarchy, **kw)
        seen["out_ptr"] = out.data_ptr()
        return out

    monkeypatch.setattr(kernels, "fused_tree_min_loss", spy)
    h = presets.pascal_person_part()
    x = paddle.to_tensor(
        np.random.default_rng(0).normal(size=(1, h.num_nodes, 2, 3)).astype(np.float32), stop_gradient=False
    )
    out = hp.tree_min_loss(x, paddle.zeros([1, 2, 3], dtype="int64"), h, reduction="none", backend="triton")
    assert seen["logits_ptr"] == x.data_ptr()
    assert out.data_ptr() == seen["out_ptr"]
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("method", ["path", "top_down"])
def test_fused_decode_equals_paddle_op(method):
    h = presets.mapillary_vistas_v2()
    x = paddle.to_tensor(
        np.random.default_rng(1).normal(0, 2, size=(2, h.num_nodes, 2, 3)).astype(np.float32)
    )
    leaf_t, depth_t = hp.decode(x, h, method, backend="triton")
    leaf_p, depth_p = hp.decode(x, h, method, backend="paddle")
    assert leaf_t.dtype == paddle.int64 and str(leaf_t.place) == str(x.place)
    np.testing.assert_array_equal(leaf_t.numpy(), leaf_p.numpy())
    np.testing.assert_array_equal(depth_t.numpy(), depth_p.numpy())


@pytest.mark.triton
@needs_kernels
def test_batch_limit_and_one_pixel_per_image_as_torch():
    """The fused kernels' grid limit is refused with torch's words (``backend="triton"``), and logits of
    one pixel per image, which the kernels take as the pixels of one image, give the paddle op's
    values and labels."""
    import torch

    from hieraloss.torch import tree_min_loss as torch_tree_min_loss

    h = presets.cityscapes()
    many = np.zeros((65536, h.num_nodes, 2), dtype=np.float32)
    labels = np.zeros((65536, 2), dtype=np.int64)
    with pytest.raises(ValueError) as paddle_error:
        hp.tree_min_loss(paddle.to_tensor(many), paddle.to_tensor(labels), h, backend="triton")
    with pytest.raises(ValueError) as torch_error:
        torch_tree_min_loss(torch.from_numpy(many), torch.from_numpy(labels), h, backend="triton")
    assert str(paddle_error.value) == str(torch_error.value) and "65536 images of 2 pixels" in str(paddle_error.value)
    # trees too big for the label codes, in the same words (the rule reads only the node count)
    from types import SimpleNamespace

    from hieraloss.core import CODE_NODE_LIMIT
    from hieraloss.torch.ops.route import use_triton as torch_use_triton

    big = SimpleNamespace(num_nodes=CODE_NODE_LIMIT)
    with pytest.raises(ValueError) as paddle_error:
        route.use_triton("triton", paddle.zeros([1, 3, 2]), big)
    with pytest.raises(ValueError) as torch_error:
        torch_use_triton("triton", torch.zeros(1, 3, 2), big)
    assert str(paddle_error.value) == str(torch_error.value) and f"below {CODE_NODE_LIMIT} nodes" in str(
        paddle_error.value)

    rng = np.random.default_rng(4)
    x = paddle.to_tensor(rng.normal(size=(21, h.num_nodes)).astype(np.float64))
    y = paddle.to_tensor(h.node_ids[rng.integers(0, h.num_nodes, size=21)])
    for reduction in ("hssn", "none"):
        fused = hp.tree_min_loss(x, y, h, reduction=reduction, backend="triton")
        plain = hp.tree_min_loss(x, y, h, reduction=reduction, backend="paddle")
        np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=1e-10, atol=1e-12)
    for method in ("path", "top_down"):
        for a, b in zip(hp.decode(x, h, method, backend="triton"), hp.decode(x, h, method, backend="paddle"),
                        strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
