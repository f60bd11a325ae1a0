"""The fused triplet kernels (hieraloss.torch.kernels.triplet) against the loop oracle and the torch ops.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest.py), on CUDA where there is one. The torch
ops (``backend="torch"``) are themselves checked against the oracle's triplets in
test_torch_triplet.py; here the kernels must choose the same triplets (sampling "first" and
"random" on the same generator) and give the same value and gradient, per dtype and layout.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from _sync_counter import CountSyncs  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hieraloss  # noqa: E402
from hieraloss.testing import hierarchies, label_maps  # noqa: E402
from hieraloss.torch import hierarchy_triplet_loss, hssn_loss, kernels  # noqa: E402
from hieraloss.torch.kernels import _common  # noqa: E402
from hieraloss.torch.ops.triplet import triplet_op  # noqa: E402

pytestmark = pytest.mark.triton

if not kernels.triton_available():
    pytest.skip("triton kernels unavailable (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not _common.interpreting() else "cpu"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Value and gradient against the torch ops on the same (rounded) embeddings: both compute in float32
# (float64 for float64) and differ only in the order of additions; half-precision gradients are
# rounded to the input dtype at the end.
VALUE_TOL = {"float64": dict(rtol=1e-12, atol=1e-14), "float32": dict(rtol=2e-5, atol=2e-6),
             "float16": dict(rtol=2e-5, atol=2e-6), "bfloat16": dict(rtol=2e-5, atol=2e-6)}
GRAD_TOL = {"float64": dict(rtol=1e-10, atol=1e-13), "float32": dict(rtol=1e-4, atol=2e-6),
            "float16": dict(rtol=2e-3, atol=2e-5), "bfloat16": dict(rtol=1.6e-2, atol=2e-4)}


def _loss_and_grad(emb, labels, h, backend, **kw):
    e = emb.detach().clone().requires_grad_(True)
    loss = hierarchy_triplet_loss(e, labels, h, backend=backend, **kw)
    loss.backward()
    return loss.detach(), e.grad


@st.composite
def triplet_cases(draw):
    """A hierarchy, embeddings [B, C, h, w] (odd C and sizes, maybe channels-last), and labels at a
    larger size (nearest resampling with a non-integer ratio) with ignored and partial labels."""
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    B, hh, ww = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 7))
    C = draw(st.sampled_from([1, 3, 8, 17]))
    H, W = hh + draw(st.integers(0, 5)), ww + draw(st.integers(0, 4))
    labels = draw(label_maps(h, (B, H, W), ignore_fraction=None, partial_fraction=None))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    emb = rng.standard_normal((B, C, hh, ww))
    return h, emb, labels, draw(st.booleans()), draw(st.sampled_from([1, 2, 5, 200]))


def _tensors(emb, labels, dtype, channels_last):
    e = torch.tensor(emb, device=DEVICE).to(DTYPES[dtype])
    if channels_last:
        e = e.to(memory_format=torch.channels_last)
    return e, torch.tensor(labels, device=DEVICE)


@settings(max_examples=25, deadline=None)
@given(case=triplet_cases(), dtype=st.sampled_from(list(DTYPES)), sampling=st.sampled_from(["first", "random"]))
def test_value_and_gradient_match_the_torch_ops(case, dtype, sampling):
    h, emb, labels, channels_last, max_per_class = case
    e, y = _tensors(emb, labels, dtype, channels_last)
    kw = dict(sampling=sampling, max_per_class=max_per_class)
    want, want_grad = _loss_and_grad(e, y, h, "torch", generator=torch.Generator().manual_seed(5), **kw)
    got, got_grad = _loss_and_grad(e, y, h, "triton", generator=torch.Generator().manual_seed(5), **kw)
    assert got.dtype == want.dtype and got_grad.dtype == e.dtype and got_grad.stride() == e.stride()
    torch.testing.assert_close(got, want, **VALUE_TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **GRAD_TOL[dtype])


@settings(max_examples=25, deadline=None)
@given(case=triplet_cases())
def test_value_is_the_oracles(case):
    h, emb, labels, _, max_per_class = case
    e, y = _tensors(emb, labels, "float64", False)
    got = hierarchy_triplet_loss(e, y, h, sampling="first", max_per_class=max_per_class, backend="triton",
                                 base_margin=0.25)
    want = oracle.triplet_loss_first(emb, labels, h, max_per_class=max_per_class, base_margin=0.25)
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_int_seed_gives_the_core_triplets():
    """An int seed draws the core's permutation (the numpy and paddle backends' triplets) here too."""
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(0)
    e = torch.tensor(rng.standard_normal((2, 8, 6, 10)), device=DEVICE)
    y = torch.tensor(rng.integers(0, h.num_nodes, (2, 12, 20)), device=DEVICE)
    want = hierarchy_triplet_loss(e, y, h, generator=11, max_per_class=3, backend="torch")
    got = hierarchy_triplet_loss(e, y, h, generator=11, max_per_class=3, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_gradcheck_float64():
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(1)
    e = torch.tensor(rng.standard_normal((1, 3, 3, 5)), device=DEVICE, requires_grad=True)
    y = torch.tensor(rng.integers(0, h.num_leaves, (1, 3, 5)), device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda t: hierarchy_triplet_loss(t, y, h, sampling="first", max_per_class=2, backend="triton"), (e,),
        fast_mode=True)


def test_upstream_scale_and_second_backward():
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(2)
    e = torch.tensor(rng.standard_normal((2, 4, 5, 6)), device=DEVICE, dtype=torch.float32, requires_grad=True)
    y = torch.tensor(rng.integers(0, h.num_leaves, (2, 5, 6)), device=DEVICE)
    want, want_grad = _loss_and_grad(e, y, h, "torch", sampling="first")
    loss = hierarchy_triplet_loss(e, y, h, sampling="first", backend="triton")
    (2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(e.grad, 2.5 * want_grad, rtol=1e-5, atol=1e-7)
    first = e.grad.clone()
    e.grad = None
    (-1.0 * loss).backward()  # the buffer went to the first .grad: it must not change
    torch.testing.assert_close(first, 2.5 * want_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e.grad, -want_grad, rtol=1e-5, atol=1e-7)


def test_no_taking_part_pixel_is_a_connected_zero():
    h = hieraloss.presets.cityscapes()
    e = torch.randn(2, 4, 3, 5, device=DEVICE, requires_grad=True)
    y = torch.full((2, 3, 5), 255, device=DEVICE)
    y[0, 0, 0] = h.num_leaves  # an internal node: does not take part either
    loss = hierarchy_triplet_loss(e, y, h, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


def test_reads_nothing_back_but_an_int_seeds_count():
    h = hieraloss.presets.cityscapes()
    e = torch.randn(2, 4, 6, 8, device=DEVICE, requires_grad=True)
    y = torch.randint(0, h.num_leaves, (2, 12, 16), device=DEVICE)
    kw = dict(backend="triton", check_labels=False)
    hierarchy_triplet_loss(e, y, h, sampling="first", **kw).backward()
    with CountSyncs() as counter:
        hierarchy_triplet_loss(e, y, h, sampling="first", **kw).backward()
    assert counter.events == []
    with CountSyncs() as counter:
        hierarchy_triplet_loss(e, y, h, sampling="random", generator=torch.Generator().manual_seed(0), **kw).backward()
    assert counter.events == []
    with CountSyncs() as counter:  # an int seed: the core's permutation of the n taking-part pixels
        hierarchy_triplet_loss(e, y, h, sampling="random", generator=3, **kw)
    assert counter.events == ["__int__", "_local_scalar_dense"]


def test_labels_of_any_integer_dtype_and_layout():
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(3)
    e = torch.tensor(rng.standard_normal((2, 6, 5, 7)), device=DEVICE)
    y = torch.tensor(rng.integers(0, h.num_nodes, (2, 16, 9)), device=DEVICE)
    want = hierarchy_triplet_loss(e, y, h, sampling="first", backend="torch")
    for labels in (y.to(torch.uint8), y.to(torch.int32), y.transpose(1, 2).contiguous().transpose(1, 2)):
        got = hierarchy_triplet_loss(e, labels, h, sampling="first", backend="triton")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_hssn_loss_with_embeddings_matches_the_torch_backend():
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.standard_normal((2, h.num_nodes, 8, 12)), device=DEVICE, requires_grad=True)
    e = torch.tensor(rng.standard_normal((2, 6, 4, 6)), device=DEVICE, requires_grad=True)
    y = torch.tensor(rng.integers(0, h.num_nodes, (2, 8, 12)), device=DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        total = hssn_loss(x, y, h, embeddings=e, triplet_weight=0.7, sampling="first", backend=backend)
        grads.append((total.detach(), *torch.autograd.grad(total, (x, e))))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [0.1, -2.5, 0.0, 1e-12])
def test_scale_multiplies_the_value_and_the_gradient(dtype, scale):
    """The kernels' ``scale`` (hssn_loss's triplet weight) times the value and the gradient they write,
    to float64 precision for float64 embeddings (the scale reaches the kernel as two float32 parts)."""
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(9)
    e = torch.tensor(rng.standard_normal((2, 5, 4, 6)), device=DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    y = torch.tensor(rng.integers(0, h.num_leaves, (2, 8, 12)), device=DEVICE)
    codes = kernels.triplet_codes(y, h, ignore_index=255, size=(4, 6))
    kw = dict(max_per_class=7, base_margin=0.1)
    want = kernels.fused_triplet_loss(e, codes, h, **kw)
    (want_grad,) = torch.autograd.grad(want, e)
    got = kernels.fused_triplet_loss(e, codes, h, scale=scale, **kw)
    (got_grad,) = torch.autograd.grad(got, e)
    assert float(want.detach()) > 0 and got.dtype == want.dtype
    # The gradient's entries are sums (atomic adds) with cancellation: relative to the largest entry.
    big = float(want_grad.abs().max()) * abs(scale)
    if dtype == "float64":
        value_tol, grad_tol = dict(rtol=1e-14, atol=0), dict(rtol=1e-12, atol=1e-14 * big)
    else:
        value_tol, grad_tol = dict(rtol=1e-6, atol=0), dict(rtol=1e-5, atol=1e-6 * big)
    torch.testing.assert_close(got, scale * want, **value_tol)
    torch.testing.assert_close(got_grad, scale * want_grad, **grad_tol)


def _hssn_inputs(dtype):
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(10)
    x = torch.tensor(rng.standard_normal((2, h.num_nodes, 8, 12)), device=DEVICE, dtype=DTYPES[dtype])
    e = torch.tensor(rng.standard_normal((2, 6, 4, 6)), device=DEVICE, dtype=DTYPES[dtype])
    y = torch.tensor(rng.integers(0, h.num_nodes, (2, 8, 12)), device=DEVICE)
    y[1, :2] = 255
    return h, x, e, y


def _hssn_run(h, x, e, y, backend, **kw):
    xt, et = x.detach().clone().requires_grad_(True), e.detach().clone().requires_grad_(True)
    out = hssn_loss(xt, y, h, embeddings=et, sampling="random", generator=3, max_per_class=5, backend=backend, **kw)
    total, parts = out if kw.get("return_parts") else (out, {})
    (1.5 * total).backward()
    return total.detach(), xt.grad, et.grad, parts


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("return_parts", [False, True])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 2.5])
def test_hssn_loss_triplet_weight_on_the_kernels_equals_the_torch_ops(weight, return_parts, dtype):
    """hssn_loss hands its triplet weight to the fused kernels (the value and the gradient they write
    come out weighted): the total, both gradients and the unweighted parts are the torch ops'."""
    h, x, e, y = _hssn_inputs(dtype)
    kw = dict(triplet_weight=weight, return_parts=return_parts)
    want = _hssn_run(h, x, e, y, "torch", **kw)
    got = _hssn_run(h, x, e, y, "triton", **kw)
    value_tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=2e-6, atol=2e-6)
    grad_tol = dict(rtol=1e-10, atol=1e-13) if dtype == "float64" else GRAD_TOL["float32"]
    torch.testing.assert_close(got[0], want[0], **value_tol)
    torch.testing.assert_close(got[1], want[1], **grad_tol)
    torch.testing.assert_close(got[2], want[2], **grad_tol)
    if weight == 0:
        assert not got[2].any()
    assert set(got[3]) == set(want[3])
    for k in want[3]:
        assert not got[3][k].requires_grad
        torch.testing.assert_close(got[3][k], want[3][k], **value_tol)
    if return_parts:
        alone = hierarchy_triplet_loss(e, y, h, sampling="random", generator=3, max_per_class=5, backend="triton",
                                       check_labels=False)
        assert float(alone) > 0 and float(got[3]["triplet_weight"]) == weight
        torch.testing.assert_close(got[3]["triplet"], alone, **value_tol)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 2.5])
def test_hssn_loss_folds_the_triplet_weight_into_the_kernels(monkeypatch, weight):
    """The kernels get the weight as their scale and the backward an upstream gradient of 1, so the
    gradient buffer takes no pass of its own; weight 0 keeps the unweighted loss and the multiply."""
    from hieraloss.torch.kernels import _grad_buffer

    scales, upstreams = [], []
    h, x, e, y = _hssn_inputs("float32")
    real_loss, real_grad = kernels.fused_triplet_loss, _grad_buffer.scaled_gradient

    def spy(ctx, g, up):
        if g.shape == e.shape:  # the triplet term's buffer (the objective's has the logits' shape)
            upstreams.append(float(up))
        return real_grad(ctx, g, up)
    monkeypatch.setattr(kernels, "fused_triplet_loss", lambda *a, **k: scales.append(k["scale"]) or real_loss(*a, **k))
    monkeypatch.setattr(_grad_buffer, "scaled_gradient", spy)  # the op's backward and the eager path's
    _hssn_run(h, x, e, y, "triton", triplet_weight=weight)
    assert scales == [weight or 1.0]
    assert upstreams == [1.5 if weight else 0.0]


def test_hssn_loss_gathered_triplets_keep_the_multiply(monkeypatch):
    """Across ranks the triplet term runs on the torch ops (which do not take the scale): hssn_loss
    multiplies it by the weight itself, as before."""
    from hieraloss.torch.ops import triplet as distributed  # the op file routes to the cross-rank op

    monkeypatch.setattr(distributed, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(distributed, "gathered_triplet_op",
                        lambda emb, leaf, hh, process_group=None, **k: triplet_op(emb, leaf, hh, **k))
    h, x, e, y = _hssn_inputs("float64")
    kw = dict(triplet_weight=2.5, return_parts=True)
    want = _hssn_run(h, x, e, y, "torch", **kw)
    # The same sum built by hand: the objective alone plus 2.5 times the triplet loss.
    xt, et = x.clone().requires_grad_(True), e.clone().requires_grad_(True)
    total = hssn_loss(xt, y, h, backend="torch") + 2.5 * hierarchy_triplet_loss(
        et, y, h, sampling="random", generator=3, max_per_class=5, backend="torch")
    (1.5 * total).backward()
    for a, b in zip(want[:3], (total, xt.grad, et.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for backend in ("triton", "auto"):
        got = _hssn_run(h, x, e, y, backend, gather_across_ranks=True, **kw)
        for a, b in zip(got[:3], want[:3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got[3]["triplet"], want[3]["triplet"], rtol=1e-12, atol=1e-14)


def test_hssn_loss_compiles_with_the_weight_folded():
    """torch.compile(fullgraph=True) of a training step with the weight handed to the kernels, for
    several weights (recompiled or traced as a symbolic float)."""
    h, x, e, y = _hssn_inputs("float32")

    def step(xt, et, weight):
        return hssn_loss(xt, y, h, embeddings=et, triplet_weight=weight, sampling="first", backend="triton",
                         check_labels=False, return_parts=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for weight in (2.5, 0.5, 0.0, 1.0):
        xt, et = x.clone().requires_grad_(True), e.clone().requires_grad_(True)
        total, parts = compiled(xt, et, weight)
        got = (total, *torch.autograd.grad(total, (xt, et)), parts["triplet"])
        xt, et = x.clone().requires_grad_(True), e.clone().requires_grad_(True)
        total, parts = hssn_loss(xt, y, h, embeddings=et, triplet_weight=weight, sampling="first", backend="torch",
                                 return_parts=True)
        want = (total, *torch.autograd.grad(total, (xt, et)), parts["triplet"])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)


def test_opcheck():
    h = hieraloss.presets.cityscapes()
    e = torch.randn(2, 4, 3, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, h.num_nodes, (2, 6, 10), device=DEVICE)
    torch.library.opcheck(torch.ops.hieraloss.triplet_codes.default, (y, h.fingerprint, 255, 3, 5),
                          test_utils=("test_schema", "test_faketensor"))
    codes = kernels.triplet_codes(y, h, ignore_index=255, size=(3, 5))
    for scale in (1.0, 2.5):
        torch.library.opcheck(torch.ops.hieraloss.triplet.default, (e, codes, None, h.fingerprint, 4, 0.1, scale, True),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # The fake's gradient strides agree with the real one's for channels_last and non-dense embeddings.
    wide = torch.randn(2, 6, 3, 5, device=DEVICE, dtype=torch.float64)
    for view in (e.detach().contiguous(memory_format=torch.channels_last), wide[:, :4]):
        torch.library.opcheck(torch.ops.hieraloss.triplet.default,
                              (view.requires_grad_(True), codes, None, h.fingerprint, 4, 0.1, 1.0, True),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    h = hieraloss.presets.cityscapes()
    e = torch.randn(2, 4, 3, 5, device=DEVICE, requires_grad=True)
    y = torch.randint(0, h.num_leaves, (2, 6, 10), device=DEVICE)

    def step(t):
        return hierarchy_triplet_loss(t, y, h, sampling="first", backend="triton", check_labels=False)

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(e)
    (g,) = torch.autograd.grad(got, e)
    want, want_grad = _loss_and_grad(e, y, h, "torch", sampling="first")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g, want_grad, rtol=1e-4, atol=2e-6)


def test_auto_picks_the_torch_ops_when_deterministic(monkeypatch):
    h = hieraloss.presets.cityscapes()
    e = torch.randn(1, 4, 3, 5, device=DEVICE)
    from hieraloss.torch.ops import route, triplet

    monkeypatch.setattr(route, "use_triton", lambda backend, x: True)
    assert triplet.fused_triplet("auto", e, h, gathered=False)
    assert not triplet.fused_triplet("auto", e, h, gathered=True)
    assert not triplet.fused_triplet("torch", e, h, gathered=False)
    with pytest.raises(ValueError, match="across ranks"):
        triplet.fused_triplet("triton", e, h, gathered=True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not triplet.fused_triplet("auto", e, h, gathered=False)
    assert triplet.fused_triplet("triton", e, h, gathered=False)


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 0, 3, 5), (1, 3, 1, 1)])
@pytest.mark.parametrize("sampling,generator", [("first", None), ("random", 3), ("random", "torch")])
def test_empty_and_degenerate_shapes_match_the_torch_ops(shape, sampling, generator):
    """No pixel (B=0), zero-width embeddings (rows at distance 1 from everything: the loss is the mean
    margin) and a single pixel, with every kind of generator."""
    h = hieraloss.presets.pascal_person_part()
    e = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    y = torch.randint(0, h.num_leaves, (shape[0], 2 * shape[2], 2 * shape[3]), device=DEVICE)
    y[..., 0, :] = h.num_leaves - 1 if shape[0] else 0
    values = []
    for backend in ("torch", "triton"):
        gen = torch.Generator().manual_seed(0) if generator == "torch" else generator
        values.append(_loss_and_grad(e, y, h, backend, sampling=sampling, generator=gen))
    torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(values[1][1], values[0][1], rtol=1e-12, atol=1e-14)


def test_triton_backend_names_its_limits():
    h = hieraloss.presets.cityscapes()
    e = torch.randn(1, 4097, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"at most 4096 channels, .* got 19 leaves and embeddings of shape "
                                         r"\[1, 4097, 1, 1\]"):
        hierarchy_triplet_loss(e, torch.zeros(1, 1, 1, dtype=torch.int64, device=DEVICE), h, backend="triton")
    # the code kernel launches a grid row per image: CUDA allows 65535
    many = torch.randn(65536, 2, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"at most 65535 images; got 19 leaves and embeddings of shape "
                                         r"\[65536, 2, 1, 1\]"):
        hierarchy_triplet_loss(many, torch.zeros(65536, 1, 1, dtype=torch.int64, device=DEVICE), h, backend="triton")


def test_classes_counted_in_chunks(monkeypatch):
    """More leaves than the scoring kernel reads at a time when it counts the classes with triplets
    (1024 in production; 16 here, so that the interpreter stays fast)."""
    from hieraloss.torch.kernels import triplet

    monkeypatch.setattr(triplet, "_class_chunk", lambda K: 16)
    h = hieraloss.Hierarchy([40] * 20 + [41] * 20 + [-1, -1])  # 40 leaves under two roots
    rng = np.random.default_rng(6)
    e = torch.tensor(rng.standard_normal((1, 3, 12, 12)), device=DEVICE)
    y = torch.tensor(rng.integers(0, h.num_leaves, (1, 12, 12)), device=DEVICE)
    kw = dict(sampling="first", max_per_class=2)
    want = _loss_and_grad(e, y, h, "torch", **kw)
    got = _loss_and_grad(e, y, h, "triton", **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-13)


def test_hssn_loss_triton_backend_gathers_triplets_on_the_torch_ops(monkeypatch):
    """hssn_loss(backend="triton", gather_across_ranks=True) across ranks: the objective on the
    kernels, the triplet term on the torch ops (the fused kernels do not gather); the triplet loss
    alone with backend="triton" says why it cannot."""
    from hieraloss.torch.ops import triplet as distributed  # the op file routes to the cross-rank op

    h = hieraloss.presets.cityscapes()
    x = torch.randn(1, h.num_nodes, 4, 6, device=DEVICE, requires_grad=True)
    e = torch.randn(1, 3, 2, 3, device=DEVICE, requires_grad=True)
    y = torch.randint(0, h.num_leaves, (1, 4, 6), device=DEVICE)
    calls = []
    monkeypatch.setattr(distributed, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(distributed, "gathered_triplet_op",
                        lambda emb, *a, **k: calls.append(k["sampling"]) or emb.sum() * 0)
    total = hssn_loss(x, y, h, embeddings=e, triplet_weight=1.0, backend="triton", gather_across_ranks=True,
                      sampling="first")
    assert calls == ["first"] and torch.isfinite(total)
    with pytest.raises(ValueError, match="does not gather triplets across ranks"):
        hierarchy_triplet_loss(e, y, h, backend="triton", gather_across_ranks=True)


def test_nan_embeddings_show_in_the_loss_as_with_the_torch_ops():
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(8)
    e = torch.tensor(rng.standard_normal((1, 4, 4, 6)), device=DEVICE)
    e[0, :, 0, 0] = float("nan")  # the first pixel: an anchor, positive or negative of every class
    y = torch.tensor(rng.integers(0, h.num_leaves, (1, 4, 6)), device=DEVICE)
    for backend in ("torch", "triton"):
        loss, grad = _loss_and_grad(e, y, h, backend, sampling="first")
        assert torch.isnan(loss), backend
        assert torch.isnan(grad[0, :, 0, 0]).all(), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_path_equals_the_registered_op(monkeypatch, dtype):
    """Eager calls skip torch.library's dispatcher (EagerFusedLoss); the registered op gives the same
    loss, gradient and second backward, and is what runs when the eager path is off."""
    from hieraloss.torch.kernels import triplet

    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(5)
    e0 = rng.standard_normal((2, 6, 5, 7))
    y = torch.tensor(rng.integers(0, h.num_leaves, (2, 9, 13)), device=DEVICE)

    def run():
        e = torch.tensor(e0, device=DEVICE, dtype=dtype, requires_grad=True)
        loss = hierarchy_triplet_loss(e, y, h, sampling="first", backend="triton", check_labels=False)
        (2.0 * loss).backward(retain_graph=True)
        first = e.grad.clone()
        e.grad = None
        (0.5 * loss).backward()
        return loss.detach(), first, e.grad, type(loss.grad_fn).__name__

    loss, g1, g2, node = run()
    assert "EagerFusedLoss" in node, node
    monkeypatch.setattr(triplet, "eager", lambda t: False)
    op_loss, op_g1, op_g2, op_node = run()
    assert "EagerFusedLoss" not in op_node, op_node
    torch.testing.assert_close(loss, op_loss, rtol=0, atol=0)
    # On a GPU the gradient is added with atomics, so its last bits depend on the order of the adds
    # (H100: 1.5e-8 apart in float32, 1.4e-17 in float64); the interpreter is exact.
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g1, op_g1, **tol)
    torch.testing.assert_close(g2, op_g2, **tol)
    torch.testing.assert_close(g2, g1 / 4, **tol)
