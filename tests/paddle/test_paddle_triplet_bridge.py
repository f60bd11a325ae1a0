"""hieraloss.paddle's triplet loss on the fused Triton triplet kernels, through the DLPack bridge.

Runs on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) with CPU paddle
tensors and tiny shapes. The bridge path (``backend="triton"``) must choose the same triplets as the
paddle ops (``backend="paddle"``: triplets chosen on the host), for sampling "first" and "random" on
the same int seed, and give the same value and gradient within rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
pytest.importorskip("torch")

from _kernel_marks import needs_kernels  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hieraloss  # noqa: E402
import hieraloss.paddle as hp  # noqa: E402
from hieraloss import presets  # noqa: E402
from hieraloss.paddle import _bridge  # noqa: E402
from hieraloss.paddle.ops import collective, route  # noqa: E402
from hieraloss.paddle.ops.triplet import fused_triplet  # noqa: E402
from hieraloss.testing import hierarchies, label_maps  # noqa: E402

paddle.set_device("cpu")


# Both paths compute in float32 (float64 for float64 embeddings) and differ only in the order of
# additions (the kernels add the gradient with atomic adds); as in test_kernels_triplet.py.
VALUE_TOL = {"float64": dict(rtol=1e-12, atol=1e-14), "float32": dict(rtol=2e-5, atol=2e-6)}
GRAD_TOL = {"float64": dict(rtol=1e-10, atol=1e-13), "float32": dict(rtol=1e-4, atol=2e-6)}


def _run(emb, labels, h, backend, upstream=1.0, **kw):
    x = paddle.to_tensor(emb, stop_gradient=False)
    loss = hp.hierarchy_triplet_loss(x, paddle.to_tensor(labels), h, backend=backend, **kw)
    (loss * upstream).backward()
    return loss, x.grad


def _assert_same(emb, labels, h, dtype="float32", upstream=1.0, **kw):
    want, want_grad = _run(emb, labels, h, "paddle", upstream, **kw)
    got, got_grad = _run(emb, labels, h, "triton", upstream, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape == []
    assert got_grad.dtype == want_grad.dtype and got_grad.shape == want_grad.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), **VALUE_TOL[dtype])
    np.testing.assert_allclose(got_grad.numpy(), want_grad.numpy(), **GRAD_TOL[dtype])
    return got, got_grad


@st.composite
def triplet_cases(draw):
    """A hierarchy, embeddings [B, C, h, w] (odd C and sizes) and labels at a larger size (nearest
    resampling with a non-integer ratio) with ignored and partial labels, in some integer dtype."""
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    B, hh, ww = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    C = draw(st.sampled_from([1, 3, 8, 17]))
    H, W = hh + draw(st.integers(0, 5)), ww + draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(["int64", "int32", "uint8"]))
    labels = draw(label_maps(h, (B, H, W), ignore_fraction=None, partial_fraction=None)).astype(dtype)
    emb = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((B, C, hh, ww))
    return h, emb, labels, draw(st.sampled_from([1, 2, 5, 200]))


@pytest.mark.triton
@needs_kernels
@settings(max_examples=12, deadline=None)
@given(case=triplet_cases(), dtype=st.sampled_from(["float32", "float64"]),
       sampling=st.sampled_from(["first", "random"]), seed=st.integers(0, 2**16))
def test_bridge_equals_the_paddle_ops(case, dtype, sampling, seed):
    h, emb, labels, max_per_class = case
    _assert_same(emb.astype(dtype), labels, h, dtype, upstream=1.7, sampling=sampling, generator=seed,
                 max_per_class=max_per_class)


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("preset", ["pascal_person_part", "cityscapes"])
@pytest.mark.parametrize("sampling", ["first", "random"])
def test_bridge_on_presets_with_ignored_and_partial_labels(preset, sampling):
    h = getattr(presets, preset)()
    rng = np.random.default_rng(len(preset))
    emb = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, size=(2, 7, 9))  # partial labels included
    labels[0, :2] = 255
    got, _ = _assert_same(emb, labels, h, sampling=sampling, generator=11, max_per_class=3)
    assert float(got) > 0


@pytest.mark.triton
@needs_kernels
def test_a_numpy_generator_advances_as_on_the_paddle_ops():
    """The bridge draws the key order from the numpy Generator exactly as the paddle ops do: after the
    same calls, both generators are in the same state."""
    h = presets.pascal_person_part()
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    labels = rng.integers(0, h.num_leaves, size=(1, 4, 4))
    gens = {b: np.random.default_rng(9) for b in ("paddle", "triton")}
    values = {b: [float(hp.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), h,
                                                  generator=gens[b], backend=b, max_per_class=2))
                  for _ in range(2)] for b in gens}
    np.testing.assert_allclose(values["triton"], values["paddle"], rtol=2e-5)
    assert gens["triton"].integers(2**62) == gens["paddle"].integers(2**62)


@pytest.mark.triton
@needs_kernels
def test_non_contiguous_inputs():
    h = presets.pascal_person_part()
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((2, 4, 3, 5)).astype(np.float64)
    labels = rng.integers(0, h.num_leaves, size=(2, 6, 5))
    res = {}
    for backend in ("paddle", "triton"):
        base = paddle.to_tensor(emb.transpose(0, 1, 3, 2).copy(), stop_gradient=False)
        x = base.transpose([0, 1, 3, 2])  # a strided view of [2, 4, 3, 5]
        y = paddle.to_tensor(labels.transpose(0, 2, 1).copy()).transpose([0, 2, 1])
        loss = hp.hierarchy_triplet_loss(x, y, h, sampling="random", generator=2, backend=backend)
        loss.backward()
        res[backend] = (float(loss), base.grad.numpy())
    np.testing.assert_allclose(res["triton"][0], res["paddle"][0], rtol=1e-12)
    np.testing.assert_allclose(res["triton"][1], res["paddle"][1], rtol=1e-10, atol=1e-13)


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("sampling", ["first", "random"])
@pytest.mark.parametrize("case", ["ignored", "partial", "one_leaf", "empty"])
def test_no_taking_part_pixel_gives_an_exact_zero(case, sampling):
    h = presets.pascal_person_part()
    shape = (0 if case == "empty" else 2, 3, 2, 3)
    labels = np.full((shape[0], 4, 5), 255)
    if case == "partial":
        labels[:] = h.num_leaves  # an internal node
    elif case == "one_leaf":
        labels[:] = 1  # one class: no positive or negative
    emb = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x = paddle.to_tensor(emb, stop_gradient=False)
    loss = hp.hierarchy_triplet_loss(x, paddle.to_tensor(labels), h, sampling=sampling, generator=1,
                                     backend="triton")
    assert loss.dtype == paddle.float32 and float(loss) == 0.0 and not loss.stop_gradient
    loss.backward()
    assert x.grad.shape == x.shape and not np.any(x.grad.numpy())


@pytest.mark.triton
@needs_kernels
def test_bridge_hands_views_to_the_kernel(monkeypatch):
    """The embeddings reach the kernel as a zero-copy view and the loss comes back as one; without a
    gradient wanted, the kernel writes none."""
    from hieraloss.torch import kernels

    seen = {}
    real = kernels.fused_triplet_loss

    def spy(embeddings, codes, hierarchy, **kw):
        seen["ptr"], seen["grad"] = embeddings.data_ptr(), embeddings.requires_grad
        out = real(embeddings, codes, hierarchy, **kw)
        seen["out_ptr"] = out.data_ptr()
        return out

    monkeypatch.setattr(kernels, "fused_triplet_loss", spy)
    h = presets.pascal_person_part()
    rng = np.random.default_rng(3)
    labels = paddle.to_tensor(rng.integers(0, h.num_leaves, size=(1, 3, 3)))
    x = paddle.to_tensor(rng.standard_normal((1, 3, 3, 3)).astype(np.float32), stop_gradient=False)
    loss = hp.hierarchy_triplet_loss(x, labels, h, backend="triton", sampling="first")
    assert seen == {"ptr": x.data_ptr(), "grad": True, "out_ptr": loss.data_ptr()}
    loss.backward()
    assert x.grad.shape == x.shape
    frozen = paddle.to_tensor(x.numpy())
    value = hp.hierarchy_triplet_loss(frozen, labels, h, backend="triton", sampling="first")
    assert not seen["grad"] and value.stop_gradient
    with paddle.no_grad():
        hp.hierarchy_triplet_loss(x, labels, h, backend="triton", sampling="first")
    assert not seen["grad"]
    np.testing.assert_allclose(float(value), float(loss), rtol=1e-6)


@pytest.mark.triton
@needs_kernels
def test_check_labels_on_the_bridge():
    h = presets.pascal_person_part()
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
    labels = rng.integers(0, h.num_leaves, size=(1, 3, 4))
    labels[0, 0, 0] = 200  # neither a node id nor ignore_index
    with pytest.raises(hieraloss.LabelError):
        hp.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), h, backend="triton")
    with pytest.raises(ValueError, match="ignore_index"):
        hp.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), h, backend="triton",
                                  ignore_index=1)
    labels[0, 1, 1] = -3
    _assert_same(emb, labels, h, check_labels=False, sampling="random", generator=0)


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("sampling", ["first", "random"])
def test_hssn_loss_with_embeddings_through_the_bridge(sampling):
    """hssn_loss(backend="triton") runs its triplet term on the bridge too, and equals the paddle ops:
    total, both gradients and the parts."""
    h = presets.pascal_person_part()
    rng = np.random.default_rng(8)
    x = rng.normal(0, 3, size=(2, h.num_nodes, 4, 5)).astype(np.float32)
    emb = rng.standard_normal((2, 5, 2, 3)).astype(np.float32)
    labels = rng.integers(0, h.num_nodes, size=(2, 4, 5))
    labels[1, 0] = 255
    res = {}
    for backend in ("paddle", "triton"):
        xt = paddle.to_tensor(x, stop_gradient=False)
        et = paddle.to_tensor(emb, stop_gradient=False)
        total, parts = hp.hssn_loss(xt, paddle.to_tensor(labels), h, embeddings=et, triplet_weight=0.7,
                                    sampling=sampling, generator=5, max_per_class=3, return_parts=True,
                                    backend=backend)
        (total * 1.3).backward()
        res[backend] = (float(total), xt.grad.numpy(), et.grad.numpy(), {k: float(v) for k, v in parts.items()})
    (t_p, gx_p, ge_p, p_p), (t_t, gx_t, ge_t, p_t) = res["paddle"], res["triton"]
    np.testing.assert_allclose(t_t, t_p, rtol=2e-6)
    np.testing.assert_allclose(gx_t, gx_p, rtol=0, atol=4e-6 * np.abs(gx_p).max())
    np.testing.assert_allclose(ge_t, ge_p, **GRAD_TOL["float32"])
    assert set(p_t) == set(p_p) and p_t["triplet"] > 0
    for k in p_t:
        np.testing.assert_allclose(p_t[k], p_p[k], rtol=2e-6)


def _hssn_inputs(dtype):
    h = presets.pascal_person_part()
    rng = np.random.default_rng(8)
    x = rng.normal(0, 3, size=(2, h.num_nodes, 4, 5)).astype(dtype)
    emb = rng.standard_normal((2, 5, 3, 4)).astype(dtype)
    labels = rng.integers(0, h.num_nodes, size=(2, 4, 5))
    labels[1, 0] = 255
    return h, x, emb, labels


def _hssn_run(h, x, emb, labels, backend, **kw):
    xt = paddle.to_tensor(x, stop_gradient=False)
    et = paddle.to_tensor(emb, stop_gradient=False)
    out = hp.hssn_loss(xt, paddle.to_tensor(labels), h, embeddings=et, sampling="random", generator=5,
                       max_per_class=3, backend=backend, **kw)
    total, parts = out if kw.get("return_parts") else (out, {})
    (total * 1.3).backward()
    return total.numpy(), xt.grad.numpy(), et.grad.numpy(), parts


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("return_parts", [False, True])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 2.5])
def test_hssn_loss_triplet_weight_through_the_bridge_equals_the_paddle_ops(weight, return_parts, dtype):
    """hssn_loss hands its triplet weight to the fused kernels (value and gradient come out weighted):
    the total, both gradients and the unweighted parts are the paddle ops'."""
    h, x, emb, labels = _hssn_inputs(dtype)
    kw = dict(triplet_weight=weight, return_parts=return_parts)
    want = _hssn_run(h, x, emb, labels, "paddle", **kw)
    got = _hssn_run(h, x, emb, labels, "triton", **kw)
    value_tol = VALUE_TOL[dtype] if dtype == "float64" else dict(rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(got[0], want[0], **value_tol)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=(1e-12 if dtype == "float64" else 4e-6)
                               * np.abs(want[1]).max())
    np.testing.assert_allclose(got[2], want[2], **GRAD_TOL[dtype])
    if weight == 0:
        assert not np.any(got[2])
    assert set(got[3]) == set(want[3])
    for k in want[3]:
        assert got[3][k].stop_gradient
        np.testing.assert_allclose(got[3][k].numpy(), want[3][k].numpy(), **value_tol)
    if return_parts:
        alone = hp.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), h, sampling="random",
                                          generator=5, max_per_class=3, backend="triton")
        assert float(alone) > 0 and float(got[3]["triplet_weight"]) == weight
        np.testing.assert_allclose(got[3]["triplet"].numpy(), alone.numpy(), **value_tol)


@pytest.mark.triton
@needs_kernels
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 2.5])
def test_hssn_loss_hands_the_triplet_weight_to_the_kernels(monkeypatch, weight):
    """The kernels get the weight as their scale and the torch backward an upstream gradient of 1 (the
    gradient buffer takes no pass of its own); weight 0 keeps the unweighted loss and the multiply."""
    from hieraloss.torch import kernels
    from hieraloss.torch.kernels import _grad_buffer

    scales, upstreams = [], []
    inputs = _hssn_inputs("float32")
    real_loss, real_grad = kernels.fused_triplet_loss, _grad_buffer.scaled_gradient

    def spy(ctx, g, up):
        if tuple(g.shape) == inputs[2].shape:  # the triplet term's buffer (the objective's has the logits' shape)
            upstreams.append(float(up))
        return real_grad(ctx, g, up)
    monkeypatch.setattr(kernels, "fused_triplet_loss", lambda *a, **k: scales.append(k["scale"]) or real_loss(*a, **k))
    monkeypatch.setattr(_grad_buffer, "scaled_gradient", spy)  # the op's backward and the eager path's
    _hssn_run(*inputs, "triton", triplet_weight=weight)
    assert scales == [weight or 1.0]
    np.testing.assert_allclose(upstreams, [1.3 if weight else 0.0], rtol=1e-6)


@needs_kernels
def test_hssn_loss_gathered_triplets_keep_the_multiply(monkeypatch):
    """Across ranks the triplet term runs on the paddle ops (which do not take the scale): hssn_loss
    multiplies it by the weight itself."""
    from hieraloss.paddle.ops import collective as _collective
    from hieraloss.paddle.ops import triplet as _ops

    monkeypatch.setattr(_collective, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(_collective, "gathered_triplet_op",
                        lambda emb, leaf, hh, process_group=None, **k: _ops.triplet_op(emb, leaf, hh, **k))
    h, x, emb, labels = _hssn_inputs("float64")
    kw = dict(triplet_weight=2.5, return_parts=True)
    want = _hssn_run(h, x, emb, labels, "paddle", **kw)
    xt = paddle.to_tensor(x, stop_gradient=False)
    et = paddle.to_tensor(emb, stop_gradient=False)
    y = paddle.to_tensor(labels)
    total = hp.hssn_loss(xt, y, h, backend="paddle") + 2.5 * hp.hierarchy_triplet_loss(
        et, y, h, sampling="random", generator=5, max_per_class=3, backend="paddle")
    (total * 1.3).backward()
    for a, b in zip(want[:3], (total.numpy(), xt.grad.numpy(), et.grad.numpy()), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for backend in ("triton", "auto"):
        got = _hssn_run(h, x, emb, labels, backend, gather_across_ranks=True, **kw)
        for a, b in zip(got[:3], want[:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(got[3]["triplet"].numpy(), want[3]["triplet"].numpy(), rtol=1e-12)


@pytest.mark.triton
@needs_kernels
def test_the_layer_takes_a_backend():
    h = presets.pascal_person_part()
    rng = np.random.default_rng(2)
    emb = paddle.to_tensor(rng.standard_normal((1, 3, 3, 3)).astype(np.float32))
    labels = paddle.to_tensor(rng.integers(0, h.num_leaves, size=(1, 3, 3)))
    values = [float(hp.HierarchyTripletLoss(h, backend=b)(emb, labels, generator=3)) for b in ("paddle", "triton")]
    np.testing.assert_allclose(values[1], values[0], rtol=2e-5)
    with pytest.raises(ValueError, match="backend"):
        hp.HierarchyTripletLoss(h, backend="cuda")


# ---------------------------------------------------------------------------- choosing the path
def _spy_bridge(monkeypatch):
    calls = []
    real = _bridge.fused_triplet_loss

    def spy(*args, **kw):
        calls.append(kw["sampling"])
        return real(*args, **kw)

    monkeypatch.setattr(_bridge, "fused_triplet_loss", spy)
    return calls


def _inputs():
    h = presets.pascal_person_part()
    rng = np.random.default_rng(1)
    return (paddle.to_tensor(rng.standard_normal((1, 3, 2, 2)).astype(np.float32)),
            paddle.to_tensor(rng.integers(0, h.num_leaves, size=(1, 2, 2))), h)


def test_auto_keeps_the_paddle_ops_on_the_cpu(monkeypatch):
    calls = _spy_bridge(monkeypatch)
    x, y, h = _inputs()
    for backend in ("auto", "paddle", "native"):
        hp.hierarchy_triplet_loss(x, y, h, backend=backend)
    hp.hssn_loss(paddle.zeros([1, h.num_nodes, 2, 2]), y, h, embeddings=x, triplet_weight=1.0)
    assert calls == []
    with pytest.raises(ValueError, match="backend"):
        hp.hierarchy_triplet_loss(x, y, h, backend="torch")


@needs_kernels
def test_auto_takes_the_bridge_on_a_gpu_unless_gathered(monkeypatch):
    calls = _spy_bridge(monkeypatch)
    monkeypatch.setattr(route, "is_gpu", lambda x: True)  # CPU tensors stand in for GPU ones (interpreter)
    x, y, h = _inputs()
    hp.hierarchy_triplet_loss(x, y, h, sampling="first")
    hp.hssn_loss(paddle.zeros([1, h.num_nodes, 2, 2]), y, h, embeddings=x, triplet_weight=1.0, backend="auto")
    assert calls == ["first", "random"]
    hp.hierarchy_triplet_loss(x, y, h, backend="paddle")
    monkeypatch.setattr(_bridge, "triplet_unsupported_reason", lambda x, h: "too many channels")
    hp.hierarchy_triplet_loss(x, y, h)
    with pytest.raises(ValueError, match="backend='triton': too many channels"):
        hp.hierarchy_triplet_loss(x, y, h, backend="triton")
    monkeypatch.setattr(collective, "is_distributed", lambda group: True)
    monkeypatch.setattr(collective, "gathered_triplet_op", lambda *a, **kw: "gathered")
    assert hp.hierarchy_triplet_loss(x, y, h, gather_across_ranks=True) == "gathered"
    with pytest.raises(ValueError, match="does not gather triplets across ranks"):
        hp.hierarchy_triplet_loss(x, y, h, gather_across_ranks=True, backend="triton")
    assert calls == ["first", "random"]


def test_triton_backend_without_kernels_says_why(monkeypatch):
    monkeypatch.setattr(_bridge, "unavailable_reason", lambda x: "triton is not installed")
    x, y, h = _inputs()
    with pytest.raises(RuntimeError, match="backend='triton'.*triton is not installed"):
        hp.hierarchy_triplet_loss(x, y, h, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton'.*triton is not installed"):
        hp.HierarchyTripletLoss(h, backend="triton")(x, y)
    hp.hierarchy_triplet_loss(x, y, h)  # auto falls back


@needs_kernels
def test_unsupported_sizes_are_named():
    x, _, h = _inputs()
    assert _bridge.triplet_unsupported_reason(x, h) is None
    from hieraloss.torch.kernels import triplet

    wide = paddle.zeros([1, triplet.MAX_CHANNELS + 1, 1, 1])
    assert f"at most {triplet.MAX_CHANNELS} channels" in _bridge.triplet_unsupported_reason(wide, h)


@needs_kernels
def test_hssn_loss_triton_backend_gathers_triplets_on_the_paddle_ops(monkeypatch):
    """hssn_loss(backend="triton", gather_across_ranks=True) across ranks: the triplet term on the
    paddle ops (the fused kernels do not gather), where the triplet loss alone raises."""
    from hieraloss.paddle.ops import collective as _collective

    h = presets.cityscapes()
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((1, h.num_nodes, 4, 6)).astype("float32"), stop_gradient=False)
    e = paddle.to_tensor(rng.standard_normal((1, 3, 2, 3)).astype("float32"), stop_gradient=False)
    y = paddle.to_tensor(rng.integers(0, h.num_leaves, (1, 4, 6)))
    calls = []
    monkeypatch.setattr(_collective, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(_collective, "gathered_triplet_op",
                        lambda emb, *a, **k: calls.append(k["sampling"]) or emb.sum() * 0)
    total = hp.hssn_loss(x, y, h, embeddings=e, triplet_weight=1.0, backend="triton", gather_across_ranks=True,
                         sampling="first")
    assert calls == ["first"] and bool(paddle.isfinite(total))
    with pytest.raises(ValueError, match="across ranks"):
        hp.hierarchy_triplet_loss(e, y, h, backend="triton", gather_across_ranks=True)


def test_auto_keeps_the_paddle_ops_when_deterministic_kernels_are_asked_for(monkeypatch):
    """On a GPU "auto" takes the kernels, except under FLAGS_cudnn_deterministic (their gradient is
    added with atomic adds); a CPU build has no such flag and reads as not deterministic."""
    h = presets.cityscapes()
    x = paddle.zeros([1, 3, 2, 2])
    assert route.deterministic() in (False, True)  # never raises, whatever the build
    monkeypatch.setattr(route, "is_gpu", lambda t: True)
    monkeypatch.setattr(_bridge, "unavailable_reason", lambda t: None)
    monkeypatch.setattr(route, "deterministic", lambda: False)
    assert fused_triplet("auto", x, h, gathered=False)
    monkeypatch.setattr(route, "deterministic", lambda: True)
    assert not fused_triplet("auto", x, h, gathered=False)
    assert fused_triplet("triton", x, h, gathered=False)
