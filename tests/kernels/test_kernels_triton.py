"""Fused Triton kernels (hieraloss.torch.kernels) against the loop oracle and the other backends.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest.py). The interpreter is slow, so shapes are
small, and BLOCK_P is forced to 16 so that every case spans several programs and a ragged last tile.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import oracle  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hieraloss.numpy as hnp  # noqa: E402
from hieraloss import presets  # noqa: E402
from hieraloss.testing import assert_consistent, hierarchies, label_maps, logits  # noqa: E402
from hieraloss.torch import kernels  # noqa: E402
from hieraloss.torch.kernels import _common, fused_decode, fused_objective, fused_tree_min_loss  # noqa: E402

pytestmark = pytest.mark.triton

if not kernels.triton_available():
    _why = (f"the kernels failed to import: {kernels.import_error()!r}" if kernels.import_error() is not None
            else "no CUDA device and TRITON_INTERPRET is not 1")
    pytest.skip(f"triton kernels unavailable: {_why}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from hieraloss.torch.kernels._reduce import finalize_sums, shared_depth_scales, shared_depth_scales_apart  # noqa: E402,E501
from hieraloss.torch.ops.cross_entropy import depth_cross_entropy_op  # noqa: E402
from hieraloss.torch.ops.decode import decode_op  # noqa: E402
from hieraloss.torch.ops.tree_min import tree_min_op  # noqa: E402

REDUCTIONS = ("mean", "sum", "none", "hssn")
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# Loss values are compared with the float64 oracle run on the same (already rounded) logits.
VALUE_TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=2e-6),
             "float16": dict(rtol=2e-5, atol=2e-6), "bfloat16": dict(rtol=2e-5, atol=2e-6)}
# Gradients come back in the input dtype, so half precision adds its own rounding.
GRAD_TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=1e-6),
            "float16": dict(rtol=2e-3, atol=1e-5), "bfloat16": dict(rtol=1.6e-2, atol=1e-4)}
DEVICE = "cuda" if torch.cuda.is_available() and not _common.interpreting() else "cpu"
small_settings = settings(max_examples=8)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setenv(_common.BLOCK_P_ENV, "16")
    monkeypatch.setenv(_common.LABEL_CHUNK_ENV, "8")


def _run(x_np, labels, h, dtype="float32", *, gamma=None, reduction="mean", node_weight=None,
         upstream=None):
    """Kernel value and gradient (of sum(value * upstream)) as float64 numpy arrays."""
    x = torch.tensor(np.asarray(x_np, dtype=np.float64), device=DEVICE).to(TORCH_DTYPES[dtype])
    x.requires_grad_(True)
    lc = torch.tensor(h.label_channels(labels), device=DEVICE)
    w = None if node_weight is None else torch.tensor(node_weight, device=DEVICE)
    loss = fused_tree_min_loss(x, lc, h, gamma=gamma, reduction=reduction, node_weight=w)
    up = torch.ones_like(loss) if upstream is None else torch.tensor(upstream, device=DEVICE).to(loss.dtype)
    (loss * up).sum().backward()
    assert x.grad.dtype == x.dtype
    expect_dtype = torch.float64 if dtype == "float64" else torch.float32
    assert loss.dtype == expect_dtype
    return loss.detach().double().cpu().numpy(), x.grad.double().cpu().numpy(), x


def _oracle(x_np, labels, h, *, gamma=None, reduction="mean", node_weight=None, upstream=None):
    value = oracle.tree_min_loss(x_np, labels, h, gamma=gamma, reduction=reduction, node_weight=node_weight)
    grad = oracle.tree_min_grad(x_np, labels, h, gamma=gamma, reduction=reduction, node_weight=node_weight,
                                upstream=upstream)
    return np.asarray(value, dtype=np.float64), grad


def _rounded(x_np, dtype):
    """The float64 values the kernel actually sees for ``dtype`` input."""
    return torch.tensor(x_np).to(TORCH_DTYPES[dtype]).double().numpy()


@st.composite
def loss_cases(draw, max_depth=3, dtype=None):
    h = draw(hierarchies(max_depth=max_depth, max_children=4, order=None))
    b = draw(st.integers(1, 2))
    spatial = draw(st.sampled_from([(1,), (7,), (3, 5), (17,), (2, 19), (37,)]))
    shape = (b, *spatial)
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    ties = draw(st.booleans())
    x = draw(logits(h, shape, ties=ties))
    gamma = draw(st.sampled_from([None, None, 0.0, 2.0, 0.5, 1.0, 3.0, 4.0]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    weight = None
    if draw(st.booleans()):
        weight = np.random.default_rng(draw(st.integers(0, 2**16))).uniform(0.1, 2.0, h.num_nodes)
    upstream = None
    if reduction == "none":
        upstream = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=x.shape)
    dt = dtype or draw(st.sampled_from(["float64", "float32"]))
    return h, labels, x, dict(gamma=gamma, reduction=reduction, node_weight=weight, upstream=upstream), dt


@settings(max_examples=12)
@given(case=loss_cases())
def test_value_and_grad_match_oracle(case):
    h, labels, x, kw, dtype = case
    x = _rounded(x, dtype)
    value, grad, _ = _run(x, labels, h, dtype, **kw)
    ref_value, ref_grad = _oracle(x, labels, h, **kw)
    np.testing.assert_allclose(value, ref_value, **VALUE_TOL[dtype])
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_inputs(dtype, reduction):
    h = presets.pascal_person_part()
    rng = np.random.default_rng(3)
    labels = rng.integers(0, h.num_nodes, size=(2, 5, 9))
    labels[0, 0] = 255
    x = _rounded(rng.normal(0, 3, size=(2, h.num_nodes, 5, 9)), dtype)
    for gamma in (None, 2.0):
        upstream = rng.normal(size=x.shape) if reduction == "none" else None
        value, grad, _ = _run(x, labels, h, dtype, gamma=gamma, reduction=reduction, upstream=upstream)
        ref_value, ref_grad = _oracle(x, labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
        np.testing.assert_allclose(value, ref_value, **VALUE_TOL[dtype])
        # The oracle gradient rounded to the input dtype is the best the kernel can return.
        np.testing.assert_allclose(grad, _rounded(ref_grad, dtype), **GRAD_TOL[dtype])


def test_mapillary_preset_tiny():
    h = presets.mapillary_vistas_v2()
    assert h.num_nodes == 149 and h.descendant_table.shape[1] == 58
    rng = np.random.default_rng(0)
    shape = (2, 3, 7)
    labels = rng.integers(0, h.num_nodes, size=shape)  # leaves and partial labels at every depth
    labels[1, 2, :3] = 255
    x = np.round(rng.normal(0, 2, size=(2, h.num_nodes, 3, 7)) * 2) / 2  # frequent ties
    weight = rng.uniform(0.5, 2.0, size=h.num_nodes)
    # A wide tree's kernel reaches labels, weights, the upstream gradient and its sums through
    # load_rows with a run-time 1 (_codegen._one_wide): weights with both reductions that gather them.
    for reduction, gamma, w in (("hssn", None, None), ("mean", 2.0, weight), ("none", None, weight)):
        upstream = rng.normal(size=x.shape) if reduction == "none" else None
        value, grad, _ = _run(x, labels, h, "float64", gamma=gamma, reduction=reduction, upstream=upstream,
                              node_weight=w)
        ref_value, ref_grad = _oracle(x, labels, h, gamma=gamma, reduction=reduction, upstream=upstream,
                                      node_weight=w)
        np.testing.assert_allclose(value, ref_value, **VALUE_TOL["float64"])
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL["float64"])
    for method in ("path", "top_down"):
        leaf, depth = fused_decode(torch.tensor(x, device=DEVICE), h, method)
        ref_leaf, ref_depth = oracle.decode(x, h, method)
        np.testing.assert_array_equal(leaf.cpu().numpy(), ref_leaf)
        np.testing.assert_array_equal(depth.cpu().numpy(), ref_depth)


def _wide_tree():
    """Root 27 with 21 children (leaves 0..18, then 28 and 29 with three leaves each), root 30 with two."""
    from hieraloss import Hierarchy

    return Hierarchy.from_parents([27] * 19 + [28] * 3 + [29] * 3 + [30] * 2 + [-1, 27, 27, -1])


def test_wide_node_ties_match_oracle():
    """The generated kernel folds each child into its parent's running maximum as soon as the child
    is complete (and folds the parent's own logit last): on exact ties across a 21-child node the
    first in pre-order still wins, as in the loop oracle."""
    h = _wide_tree()
    rng = np.random.default_rng(5)
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 11))
    labels[0, 0, :2] = 255
    x = rng.integers(0, 2, size=(2, h.num_nodes, 3, 11)).astype(np.float64)  # ties everywhere
    x[0, :, 1, :] = 1.0  # every node tied
    for gamma, reduction in ((None, "sum"), (2.0, "mean"), (None, "none")):
        upstream = rng.normal(size=x.shape) if reduction == "none" else None
        value, grad, _ = _run(x, labels, h, "float64", gamma=gamma, reduction=reduction, upstream=upstream)
        ref_value, ref_grad = _oracle(x, labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
        np.testing.assert_allclose(value, ref_value, **VALUE_TOL["float64"])
        np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL["float64"])


def test_wide_node_nan_goes_to_nan_node():
    """A NaN logit wins every maximum it is in, wherever it sits in the order (the parent's own
    logit, one or several of a wide node's children, a grandchild), and of several NaNs the last in
    the order (node, then children) wins. A maximum's gradient goes to its winner, so a finite node
    that wrongly won a NaN maximum would get a NaN gradient, and an internal NaN node gets none of
    its own when a NaN below it wins."""
    h = _wide_tree()
    ch = h.channel_of
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, h.num_nodes, 6))
    nan_at = {0: [27], 1: [3, 10], 2: [28, 20], 3: [7], 4: [27, 18], 5: [21]}  # pixel -> node ids
    for pix, nodes in nan_at.items():
        for v in nodes:
            x[0, ch[v], pix] = np.nan
    labels = np.full((1, 6), 25)  # the labelled path (30, 25) holds no NaN
    _, grad, _ = _run(x, labels, h, "float64", reduction="sum")
    expected = np.isnan(x)
    expected[0, ch[28], 2] = expected[0, ch[27], 4] = False  # a NaN child won: after the node itself
    np.testing.assert_array_equal(np.isnan(grad), expected)


def test_gamma_zero_is_plain_and_inputs_untouched():
    h = presets.cityscapes()
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0, 3, size=(2, h.num_nodes, 4, 9)), dtype=torch.float32, device=DEVICE)
    lc = torch.tensor(h.label_channels(rng.integers(0, 19, size=(2, 4, 9))), device=DEVICE)
    x0, lc0 = x.clone(), lc.clone()
    for reduction in REDUCTIONS:
        a = fused_tree_min_loss(x, lc, h, gamma=None, reduction=reduction)
        b = fused_tree_min_loss(x, lc, h, gamma=0.0, reduction=reduction)
        assert torch.equal(a, b)
    assert torch.equal(x, x0) and torch.equal(lc, lc0)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0, 4.0, 2.5, 0.25])
def test_integer_gamma_products_match_oracle(gamma):
    """gamma 1..4 take sigmoid^gamma as products (FOCAL = the integer), any other gamma one exp: both
    against the oracle, in float64 (exact math) and float32, with saturated logits: |x| up to 100,
    past 87.3, where float32 exp(-|x|) is no longer a normal number (a GPU flushes it to 0)."""
    from hieraloss.torch.kernels._terms import focal_code

    assert focal_code(gamma) == (int(gamma) if gamma in (1.0, 2.0, 3.0, 4.0) else -1)
    h = presets.cityscapes()
    rng = np.random.default_rng(int(gamma * 4))
    labels = rng.integers(0, h.num_nodes, size=(2, 3, 11))
    labels[1, 0, :3] = 255
    x = rng.normal(0, 4, size=(2, h.num_nodes, 3, 11))
    x[0, :, 0, 0] = 40.0
    x[0, :, 0, 1] = -40.0
    x[0, :, 0, 2:6] = [100.0, -100.0, 88.0, -88.0]
    for dtype in ("float64", "float32"):
        xd = _rounded(x, dtype)
        for reduction in ("hssn", "none"):
            upstream = rng.normal(size=x.shape) if reduction == "none" else None
            value, grad, _ = _run(xd, labels, h, dtype, gamma=gamma, reduction=reduction, upstream=upstream)
            ref_value, ref_grad = _oracle(xd, labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
            np.testing.assert_allclose(value, ref_value, **VALUE_TOL[dtype])
            np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL[dtype])


def test_focal_code():
    from hieraloss.torch.kernels._terms import focal_code

    assert [focal_code(g) for g in (0.0, 1.0, 2, 3.0, 4.0, 5.0, 0.5, 2.0000001)] == [0, 1, 2, 3, 4, -1, -1, -1]


def test_strided_logits_equal_contiguous():
    """Channels-last and sliced logits are read as they are; the gradient and the loss map come back
    in the logits' memory order where that is dense, else contiguous (autograd's layout for a leaf's
    .grad), equal to the contiguous ones."""
    h = presets.cityscapes()
    rng = np.random.default_rng(2)
    base = torch.tensor(rng.normal(size=(2, 6, 5, h.num_nodes + 3)), device=DEVICE)
    sliced_last = base[..., :h.num_nodes].permute(0, 3, 1, 2)  # [B, N, H, W] view, channel stride 1, not dense
    sliced = base.permute(0, 3, 1, 2).contiguous()[:, :h.num_nodes]  # not dense, contiguous order
    channels_last = sliced_last.contiguous(memory_format=torch.channels_last)
    lc = torch.tensor(h.label_channels(rng.integers(0, 19, size=(2, 6, 5))), device=DEVICE)
    y = torch.tensor(h.node_ids[rng.integers(0, h.num_nodes, size=(2, 6, 5))], device=DEVICE)
    for x, layout in ((sliced_last, torch.contiguous_format), (sliced, torch.contiguous_format),
                      (channels_last, torch.channels_last)):
        for reduction in ("mean", "none"):
            a = fused_tree_min_loss(x, lc, h, reduction=reduction)
            b = fused_tree_min_loss(x.contiguous(), lc, h, reduction=reduction)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert reduction == "mean" or a.is_contiguous(memory_format=layout)
        # autograd.grad hands over the backward's own gradient (.grad would be copied into the layout)
        upstream = x.contiguous()
        for loss in (lambda t: kernels.fused_objective(t, y, h, ignore_index=255, reduction="hssn",
                                                       ce_weights=[1.0, 0.5], gamma=2.0)[0],
                     lambda t: (fused_tree_min_loss(t, lc, h, reduction="none") * upstream).sum()):  # noqa: B023
            grads = [torch.autograd.grad(loss(t), t)[0] for t in (x.detach().requires_grad_(True),
                                                                  x.contiguous().requires_grad_(True))]
            assert grads[0].is_contiguous(memory_format=layout), grads[0].stride()
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        for method in ("path", "top_down"):
            for a, b in zip(fused_decode(x, h, method), fused_decode(x.contiguous(), h, method), strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_entries_gives_connected_exact_zero(reduction):
    h = presets.cityscapes()
    x = torch.randn(1, h.num_nodes, 3, 5, device=DEVICE, requires_grad=True)
    lc = torch.full((1, 3, 5), -1, dtype=torch.int64, device=DEVICE)
    loss = fused_tree_min_loss(x, lc, h, reduction=reduction, gamma=2.0)
    assert loss.grad_fn is not None
    assert torch.count_nonzero(loss) == 0
    loss.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_empty_inputs_and_single_node_tree():
    from hieraloss import Hierarchy

    h = presets.cityscapes()
    for shape in ((0, h.num_nodes, 4, 5), (2, h.num_nodes, 0)):
        x = torch.randn(*shape, device=DEVICE, requires_grad=True)
        lc = torch.zeros((shape[0], *shape[2:]), dtype=torch.int64, device=DEVICE)
        loss = fused_tree_min_loss(x, lc, h, reduction="hssn")
        loss.backward()
        assert float(loss) == 0.0 and x.grad.shape == x.shape
        leaf, depth = fused_decode(x, h, "path")
        assert leaf.shape == lc.shape and depth.shape == (shape[0], h.max_depth, *shape[2:])
    single = Hierarchy.from_parents([-1])
    x = np.array([[[1.5, -0.5, 2.0]]])
    labels = np.array([[0, 255, 0]])
    value, grad, _ = _run(x, labels, single, "float64", reduction="sum")
    ref_value, ref_grad = _oracle(x, labels, single, reduction="sum")
    np.testing.assert_allclose(value, ref_value, **VALUE_TOL["float64"])
    np.testing.assert_allclose(grad, ref_grad, **GRAD_TOL["float64"])


def test_gradcheck_float64():
    h = presets.pascal_person_part()
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(0, 2, size=(1, h.num_nodes, 3, 6)), device=DEVICE, requires_grad=True)
    labels = rng.integers(0, h.num_nodes, size=(1, 3, 6))
    labels[0, 0, 0] = 255
    lc = torch.tensor(h.label_channels(labels), device=DEVICE)
    w = torch.tensor(rng.uniform(0.5, 1.5, h.num_nodes), device=DEVICE)
    for reduction, gamma in (("hssn", None), ("mean", 2.0)):
        assert torch.autograd.gradcheck(
            lambda t, g=gamma, r=reduction: fused_tree_min_loss(t, lc, h, gamma=g, reduction=r,
                                                                node_weight=w),
            (x,), eps=1e-6, atol=1e-6, fast_mode=True)


@small_settings
@given(data=st.data())
def test_decode_matches_oracle(data):
    h = data.draw(hierarchies(max_depth=3, max_children=4, order=None))
    shape = data.draw(st.sampled_from([(1, 7), (2, 3, 5), (1, 37)]))
    x = data.draw(logits(h, shape, ties=data.draw(st.booleans())))
    dtype = data.draw(st.sampled_from(["float64", "float32", "float16"]))
    x = _rounded(x, dtype)
    xt = torch.tensor(x, device=DEVICE).to(TORCH_DTYPES[dtype])
    for method in ("path", "top_down"):
        leaf, depth = fused_decode(xt, h, method)
        ref_leaf, ref_depth = oracle.decode(x, h, method)
        assert leaf.dtype == torch.int64 and depth.dtype == torch.int64
        np.testing.assert_array_equal(leaf.cpu().numpy(), ref_leaf)
        np.testing.assert_array_equal(depth.cpu().numpy(), ref_depth)
        assert_consistent(depth, h)


@small_settings
@given(case=loss_cases(dtype="float64"))
def test_matches_other_backends(case):
    """Same numbers as hieraloss.numpy and the vectorized torch ops."""
    h, labels, x, kw, dtype = case
    value, grad, xt = _run(x, labels, h, dtype, **kw)
    np_name = "focal_tree_min_loss" if kw["gamma"] is not None else "tree_min_loss"
    np_fn = getattr(hnp, np_name)
    extra = {} if kw["gamma"] is None else {"gamma": kw["gamma"]}
    ref = np_fn(x, labels, h, reduction=kw["reduction"], node_weight=kw["node_weight"], **extra)
    np.testing.assert_allclose(value, np.asarray(ref, dtype=np.float64), **VALUE_TOL[dtype])
    xr = xt.detach().clone().requires_grad_(True)
    lc = torch.tensor(h.label_channels(labels), device=DEVICE)
    w = None if kw["node_weight"] is None else torch.tensor(kw["node_weight"], device=DEVICE)
    ref = tree_min_op(xr, lc, h, gamma=kw["gamma"] or 0.0, reduction=kw["reduction"], node_weight=w)
    up = 1.0 if kw["upstream"] is None else torch.tensor(kw["upstream"], device=DEVICE)
    (ref * up).sum().backward()
    np.testing.assert_allclose(value, ref.detach().cpu().numpy(), **VALUE_TOL[dtype])
    np.testing.assert_allclose(grad, xr.grad.cpu().numpy(), **GRAD_TOL[dtype])


def test_decode_matches_torch_backend():
    h = presets.mapillary_vistas_v2()
    x = torch.tensor(np.round(np.random.default_rng(5).normal(size=(1, h.num_nodes, 3, 11))), device=DEVICE)
    for method in ("path", "top_down"):
        for a, b in zip(fused_decode(x, h, method), decode_op(x, h, method), strict=True):
            assert torch.equal(a.cpu(), b.cpu())


def test_the_kernel_signature_is_written_once():
    """The generated def lists _codegen.OBJECTIVE_PARAMS in order (then the constexprs), the launch
    names each of them (a missing or unknown one is a TypeError naming it), and the AOT compile types
    every pointer from the same table."""
    from hieraloss.torch.kernels import _codegen
    from hieraloss.torch.kernels import objective as objective_module

    names = _codegen.objective_param_names()
    kernel = objective_module.kernel_for(presets.pascal_person_part())
    assert kernel.arg_names[:len(names)] == names
    constexprs = {name for name, p in inspect.signature(kernel.fn).parameters.items() if "constexpr" in str(p)}
    assert set(kernel.arg_names[len(names):]) == constexprs
    arguments = dict.fromkeys(names, 0)
    assert objective_module._objective_arguments(**arguments) == arguments
    del arguments["scale_ptr"]
    with pytest.raises(TypeError, match=r"missing \['scale_ptr'\]"):
        objective_module._objective_arguments(**arguments, extra=1)
    for _, row in _codegen.OBJECTIVE_PARAMS:
        for param in row:
            assert param.name.endswith("_ptr") == param.aot.startswith("*"), param


def test_ops_are_registered_with_torch_library():
    """The ops' schemas and autograd registration, and fakes that agree with the real outputs in shape,
    dtype and strides (channels_last and non-dense logits included: a compiler plans on the fake's)."""
    for name in ("objective", "objective_map_backward", "decode"):
        assert hasattr(torch.ops.hieraloss, name), name
    h = presets.pascal_person_part()
    base = torch.randn(2, h.num_nodes + 2, 3, 5, dtype=torch.float64, device=DEVICE)
    labels = torch.tensor(np.random.default_rng(6).integers(0, 12, size=(2, 3, 5)), device=DEVICE)
    for view in (base[:, :h.num_nodes].contiguous(), base[:, :h.num_nodes],
                 base[:, :h.num_nodes].contiguous(memory_format=torch.channels_last)):
        x = view.requires_grad_(True)
        for reduction, want_grad in (("hssn", True), ("mean", False), ("none", False)):
            args = (x, labels, h.fingerprint, 255, None, 2.0, reduction, True, 1.0, [1.0, 0.5, 0.0], want_grad)
            torch.library.opcheck(torch.ops.hieraloss.objective.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.library.opcheck(torch.ops.hieraloss.objective_map_backward.default,
                              (torch.randn_like(x), x.detach(), labels, h.fingerprint, 255, None, 2.0),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.hieraloss.decode.default, (x.detach(), h.fingerprint, "top_down"),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(monkeypatch):
    """The public functions trace as one graph with check_labels=False (the CUDA path: the hierarchy
    reaches the ops as its fingerprint); a second hierarchy gets its own kernel (no stale cache).
    The traced backward scales with plain ops: the in-place kernel only ever sees real tensors."""
    from hieraloss.torch import hssn_loss, tree_min_loss
    from hieraloss.torch.kernels import _grad_buffer

    scale_in_place = _grad_buffer.scale_in_place

    def eager_only(grad, scale):
        assert type(grad) is torch.Tensor and type(scale) is torch.Tensor, type(grad)
        scale_in_place(grad, scale)
    monkeypatch.setattr(_grad_buffer, "scale_in_place", eager_only)

    def step(x, y, h):
        a = tree_min_loss(x, y, h, reduction="hssn", backend="triton", check_labels=False)
        b = hssn_loss(x, y, h, focal_gamma=2.0, backend="triton", check_labels=False)
        return 3 * a + b

    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    rng = np.random.default_rng(7)
    for h in (presets.pascal_person_part(), presets.lip(), presets.lip().with_order("coarse_to_fine")):
        x = torch.tensor(rng.normal(size=(2, h.num_nodes, 3, 5)), device=DEVICE, requires_grad=True)
        y = torch.tensor(h.node_ids[rng.integers(0, h.num_nodes, size=(2, 3, 5))], device=DEVICE)
        (g_compiled,) = torch.autograd.grad(fn(x, y, h), x)
        eager = step(x, y, h)
        (g_eager,) = torch.autograd.grad(eager, x)
        torch.testing.assert_close(fn(x, y, h), eager, rtol=0, atol=0)
        torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)
        leaf_c, depth_c = torch.compile(fused_decode, backend="aot_eager", fullgraph=True)(x, h, "top_down")
        leaf_e, depth_e = fused_decode(x, h, "top_down")
        assert torch.equal(leaf_c, leaf_e) and torch.equal(depth_c, depth_e)


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not on its tensors' one: every kernel the public
    functions launch (the objective and its separate label count, the gradient scale, decoding, the
    triplet's three kernels) runs inside ``on_device`` of the device of all its tensor arguments."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    from hieraloss.torch import hssn_loss, tree_min_loss
    from hieraloss.torch.kernels import _grad_buffer, decode, objective, triplet

    current = []  # devices made current by the guard, innermost last

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    for module in (objective, decode, triplet, _grad_buffer):
        monkeypatch.setattr(module, "on_device", Guard)
    launches = []
    # Under the interpreter a launch ends in GridExecutor.__call__, on a GPU in JITFunction.run.
    owner, method = (interpreter.GridExecutor, "__call__") if _common.interpreting() else (JITFunction, "run")
    run = getattr(owner, method)

    def checked(self, *args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        launches.append(self.fn.__name__)
        assert current and devices == {current[-1]}, (self.fn.__name__, current, devices)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, checked)
    h = presets.pascal_person_part()
    rng = np.random.default_rng(8)
    x = torch.tensor(rng.normal(size=(2, h.num_nodes, 4, 6)), device=DEVICE, requires_grad=True)
    y = torch.tensor(h.node_ids[rng.integers(0, h.num_nodes, size=(2, 4, 6))], device=DEVICE)
    emb = torch.tensor(rng.normal(size=(2, 8, 2, 3)), device=DEVICE, requires_grad=True)
    (2 * tree_min_loss(x, y, h, reduction="hssn", backend="triton")).backward()
    tree_min_loss(x, y, h, reduction="none", backend="triton").sum().backward()
    hssn_loss(x, y, h, embeddings=emb, triplet_weight=0.5, sampling="first", backend="triton").backward()
    fused_decode(x.detach(), h, "top_down")
    monkeypatch.setenv("HIERALOSS_LABEL_COUNT", "separate")
    tree_min_loss(x, y, h, backend="triton").backward()
    assert not current
    names = set(launches)
    assert {"objective_kernel", "_scale_kernel", "decode_kernel", "_codes_kernel", "_select_kernel",
            "_score_kernel", "_label_count_kernel"} <= names, names


@pytest.mark.parametrize("spatial", [(), (1, 1)])
def test_one_pixel_per_image_runs_as_the_pixels_of_one_image(monkeypatch, spatial):
    """Logits with one pixel per image (hierarchical classification, point-sampled logits): the
    objective and decode kernels take the images as the pixels of one image, so their grid is one
    row high (CUDA allows 65535 rows, one per image) and their tiles full, with the values,
    gradients and labels of the torch ops."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    from hieraloss.torch import decode, hssn_loss, tree_min_loss

    grids = []
    if _common.interpreting():
        call = interpreter.GridExecutor.__call__

        def recorded(self, *args, **kwargs):
            grids.append((self.fn.__name__, tuple(self.grid)))
            return call(self, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", recorded)
    else:
        run = JITFunction.run

        def recorded(self, *args, grid, **kwargs):
            grids.append((self.fn.__name__, tuple(grid)))
            return run(self, *args, grid=grid, **kwargs)

        monkeypatch.setattr(JITFunction, "run", recorded)
    h = presets.pascal_person_part()
    images = 37
    rng = np.random.default_rng(3)
    x_np = rng.normal(size=(images, h.num_nodes, *spatial))
    y_np = h.node_ids[rng.integers(0, h.num_nodes, size=(images, *spatial))]
    y_np.reshape(-1)[::5] = 255
    y = torch.tensor(y_np, device=DEVICE)
    for reduction in ("mean", "sum", "hssn", "none"):
        got = {}
        for backend in ("torch", "triton"):
            x = torch.tensor(x_np, device=DEVICE, requires_grad=True)
            loss = tree_min_loss(x, y, h, reduction=reduction, backend=backend)
            (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)).sum().backward()
            got[backend] = (loss.detach(), x.grad)
        for a, b in zip(got["triton"], got["torch"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got = {}
    for backend in ("torch", "triton"):
        x = torch.tensor(x_np, device=DEVICE, requires_grad=True)
        hssn_loss(x, y, h, backend=backend).backward()
        got[backend] = x.grad
    torch.testing.assert_close(got["triton"], got["torch"], rtol=1e-10, atol=1e-12)
    x = torch.tensor(x_np, device=DEVICE)
    for method in ("path", "top_down"):
        for a, b in zip(decode(x, h, method, backend="triton"), decode(x, h, method, backend="torch"), strict=True):
            assert a.shape == b.shape and a.is_contiguous() and torch.equal(a, b)
    tiles = triton.cdiv(images, 16)
    assert {name for name, _ in grids} >= {"objective_kernel", "decode_kernel"}
    assert all(grid == (tiles, 1) for name, grid in grids if name in ("objective_kernel", "decode_kernel")), grids


def test_batches_beyond_the_kernels_limits_are_refused_by_name():
    """More than 65535 images of several pixels each (a grid row per image), or more than 2**31
    pixels in an image (int32 lane offsets; images count as pixels when each has one): refused by
    name with ``backend="triton"``, left to the torch ops by ``"auto"``."""
    from types import SimpleNamespace

    from hieraloss import Hierarchy
    from hieraloss.torch import decode, tree_min_loss
    from hieraloss.torch.ops.route import use_triton as _use_triton

    h = presets.pascal_person_part()
    many = torch.zeros(_common.MAX_GRID_ROWS + 1, h.num_nodes, 2, device=DEVICE)
    labels = torch.zeros(many.shape[0], 2, dtype=torch.int64, device=DEVICE)
    limit = r"CUDA allows 65535 rows; got 65536 images of 2 pixels"
    with pytest.raises(ValueError, match=r"backend='triton': the fused kernels launch a row .*" + limit):
        tree_min_loss(many, labels, h, backend="triton")
    with pytest.raises(ValueError, match=limit):
        decode(many, h, "path", backend="triton")
    # "auto" on a CUDA tensor of such a batch takes the torch ops (the rule alone: a stand-in tensor)
    assert not _use_triton("auto", SimpleNamespace(is_cuda=True, shape=many.shape))
    assert _use_triton("auto", SimpleNamespace(is_cuda=True, shape=many[:-1].shape))
    assert kernels.batch_unsupported_reason(many[:, :, :1].shape) is None

    # 2**31 + 1 pixels in one image, as a view of one value (no memory)
    tree = Hierarchy.from_parents([2, 2, -1])
    n = _common.MAX_IMAGE_PIXELS + 1
    wide = torch.zeros(1, 3, 1, device=DEVICE).expand(1, 3, n)
    with pytest.raises(ValueError, match=r"at most 2\*\*31 pixels per image .* got 1 images of 2147483649 pixels"):
        tree_min_loss(wide, torch.zeros(1, 1, dtype=torch.int64, device=DEVICE).expand(1, n), tree,
                      backend="triton", check_labels=False)
    with pytest.raises(ValueError, match="2147483649 pixels"):
        decode(wide, tree, "path", backend="triton")
    assert kernels.batch_unsupported_reason((1, 3, n - 1)) is None
    assert "2147483649 images of 1 pixels" in kernels.batch_unsupported_reason((n, 3))
    assert kernels.batch_unsupported_reason((n - 1, 3, 1, 1)) is None


def test_trees_beyond_the_label_codes_are_refused_by_name():
    """Trees of CODE_NODE_LIMIT nodes or more (the label codes pack 16-bit node positions): refused
    at the door with ``backend="triton"``, with the words the plan raises, and left to the torch ops
    by ``"auto"``. The rule reads only the node count, so stand-ins take the place of a tree whose
    tables would not fit in memory here."""
    from types import SimpleNamespace

    from hieraloss.core import CODE_NODE_LIMIT, code_node_limit_reason
    from hieraloss.torch.ops.route import use_triton as _use_triton

    big, small = SimpleNamespace(num_nodes=CODE_NODE_LIMIT), SimpleNamespace(num_nodes=CODE_NODE_LIMIT - 1)
    words = f"the fused kernels take hierarchies below {CODE_NODE_LIMIT} nodes"
    assert kernels.unsupported_reason((2, 3, 4), big) == code_node_limit_reason(CODE_NODE_LIMIT)
    assert words in kernels.unsupported_reason((2, 3, 4), big) and f"got {CODE_NODE_LIMIT} nodes" in \
        kernels.unsupported_reason((2, 3, 4), big)
    assert kernels.unsupported_reason((2, 3, 4), small) is None
    # the batch rule still applies to small trees
    assert "65536 images" in kernels.unsupported_reason((_common.MAX_GRID_ROWS + 1, 3, 2), small)
    x = torch.zeros(1, 3, 2, device=DEVICE)
    with pytest.raises(ValueError, match=f"backend='triton': {words}"):
        _use_triton("triton", x, big)
    assert _use_triton("triton", x, small)
    assert not _use_triton("auto", SimpleNamespace(is_cuda=True, shape=(1, CODE_NODE_LIMIT, 2)), big)


def test_auto_leaves_trees_too_slow_to_compile_to_the_torch_ops():
    """``"auto"`` gives the fused kernels trees of at most AUTO_FUSED_MAX_NODES nodes (the generated
    kernel's compile time grows about as N**1.9); ``backend="triton"`` takes larger ones."""
    from types import SimpleNamespace

    from hieraloss.core.rules import AUTO_FUSED_MAX_NODES
    from hieraloss.torch.ops.route import use_triton as _use_triton

    on_cuda = SimpleNamespace(is_cuda=True, shape=(1, 3, 2))
    at_limit = SimpleNamespace(num_nodes=AUTO_FUSED_MAX_NODES)
    above = SimpleNamespace(num_nodes=AUTO_FUSED_MAX_NODES + 1)
    assert _use_triton("auto", on_cuda, at_limit)
    assert not _use_triton("auto", on_cuda, above)
    assert _use_triton("triton", torch.zeros(1, 3, 2, device=DEVICE), above)
    assert _use_triton("auto", on_cuda)  # embeddings: the triplet kernels are not generated per tree


def test_on_device_makes_the_tensors_cuda_device_current(monkeypatch):
    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: made.append(d) or "guard")
    assert _common.on_device(torch.device("cuda", 1)) == "guard" and made == [torch.device("cuda", 1)]
    with _common.on_device(torch.device("cpu")):
        pass
    assert made == [torch.device("cuda", 1)]


@pytest.mark.skipif(not (DEVICE == "cuda" and torch.cuda.device_count() > 1), reason="needs two CUDA devices")
def test_tensors_on_another_device_than_the_current_one():
    h = presets.cityscapes()
    rng = np.random.default_rng(9)
    x0 = torch.tensor(rng.normal(size=(2, h.num_nodes, 8, 8)), device="cuda:0", requires_grad=True)
    y0 = torch.tensor(h.node_ids[rng.integers(0, h.num_nodes, size=(2, 8, 8))], device="cuda:0")
    x1 = x0.detach().to("cuda:1").requires_grad_(True)
    with torch.cuda.device(0):
        from hieraloss.torch import tree_min_loss

        a = tree_min_loss(x0, y0, h, reduction="hssn", backend="triton")
        b = tree_min_loss(x1, y0.to("cuda:1"), h, reduction="hssn", backend="triton")
        (a + b.to("cuda:0")).backward()
        leaf0, _ = fused_decode(x0.detach(), h)
        leaf1, _ = fused_decode(x1.detach(), h)
    torch.testing.assert_close(b.cpu(), a.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(x1.grad.cpu(), x0.grad.cpu(), rtol=0, atol=0)
    assert torch.equal(leaf1.cpu(), leaf0.cpu())


def test_bad_input_raises_clearly(monkeypatch):
    h = presets.cityscapes()
    x = torch.randn(1, h.num_nodes, 4, device=DEVICE)
    lc = torch.zeros(1, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="reduction"):
        fused_tree_min_loss(x, lc, h, reduction="avg")
    with pytest.raises(ValueError, match="method"):
        fused_decode(x, h, "hssn")
    with pytest.raises(TypeError, match="dtype"):
        fused_tree_min_loss(x.to(torch.int32), lc, h)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            fused_tree_min_loss(x, lc, h)


def _depth_ce_loop(x, labels, h, depth, ignore_index=255):
    """Plain loop: mean over counted pixels of -log softmax over depth_channels[depth-1] at the target."""
    at_depth = oracle.labels_at_depth(labels, h, depth, ignore_index)
    classes = [int(c) for c in h.depth_channels[depth - 1]]
    total, count = 0.0, 0
    for pix in oracle.pixels(labels.shape):
        target = int(at_depth[pix])
        if target == ignore_index:
            continue
        z = [float(oracle.at(x, pix, c)) for c in classes]
        m = max(z)
        lse = m + np.log(sum(np.exp(v - m) for v in z))
        total += lse - float(oracle.at(x, pix, int(h.channel_of[target])))
        count += 1
    return total / max(count, 1)


@settings(max_examples=10)
@given(case=loss_cases(), data=st.data())
def test_fused_objective_matches_parts(case, data):
    """hssn-style total = tm_weight * TM + sum_d w_d CE_d from raw node-id labels, one launch:
    value and parts against the loop oracle, gradient against the vectorized torch ops."""
    h, labels, x, kw, dtype = case
    x = _rounded(x, dtype)
    gamma = kw["gamma"] or 0.0
    ce_w = [data.draw(st.sampled_from([0.0, 1.0, 0.5])) for _ in range(h.max_depth)]
    tm_w = data.draw(st.sampled_from([0.0, 1.0, 0.2]))
    ignore_index = data.draw(st.sampled_from([255, -1]))
    raw = np.where(labels == 255, ignore_index, labels)
    node_ids = h.node_ids[np.where(raw == ignore_index, 0, h.channel_of[np.where(raw == ignore_index, 0, raw)])]
    raw = np.where(raw == ignore_index, ignore_index, node_ids)
    xt = torch.tensor(x, device=DEVICE).to(TORCH_DTYPES[dtype]).requires_grad_(True)
    yt = torch.tensor(raw, device=DEVICE)
    w = None if kw["node_weight"] is None else torch.tensor(kw["node_weight"], device=DEVICE)
    total, parts = fused_objective(xt, yt, h, ignore_index=ignore_index, gamma=gamma, reduction="hssn",
                                   tm_weight=tm_w, ce_weights=ce_w, node_weight=w)
    (grad,) = torch.autograd.grad(total * 1.5, xt)
    tm_ref = oracle.tree_min_loss(x, labels, h, gamma=kw["gamma"], reduction="hssn", node_weight=kw["node_weight"])
    # every depth's CE is computed once any depth has a weight (a weight 0 only drops it from the total)
    ce_ref = [_depth_ce_loop(x, labels, h, d) if any(ce_w) else 0.0 for d in range(1, h.max_depth + 1)]
    tol = VALUE_TOL[dtype] if dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts.double().cpu().numpy(), [tm_ref, *ce_ref], **tol)
    np.testing.assert_allclose(float(total), tm_w * tm_ref + float(np.dot(ce_w, ce_ref)), **tol)
    # gradient: the eager torch ops on the same rounded logits
    xr = xt.detach().double().requires_grad_(True)
    lc = torch.tensor(h.label_channels(labels), device=DEVICE)
    ref = tm_w * tree_min_op(xr, lc, h, gamma=gamma, reduction="hssn", node_weight=w, has_partial=True)
    for d, wd in enumerate(ce_w, start=1):
        if wd:
            ref = ref + wd * depth_cross_entropy_op(xr, lc, h, d)
    (gref,) = torch.autograd.grad(ref * 1.5, xr)
    np.testing.assert_allclose(grad.double().cpu().numpy(), _rounded(gref.cpu().numpy(), dtype), **GRAD_TOL[dtype])


def test_functional_triton_path_labels_and_syncs():
    """Public functions on backend='triton': bad labels raise LabelError by default and count as
    ignored with check_labels=False; hssn_loss equals its parts; depth_cross_entropy alone."""
    from hieraloss import LabelError
    from hieraloss.torch import depth_cross_entropy, hssn_loss, tree_min_loss

    h = presets.cityscapes()
    rng = np.random.default_rng(11)
    x = torch.tensor(rng.normal(size=(2, h.num_nodes, 3, 5)), device=DEVICE, requires_grad=True)
    y = torch.tensor(rng.integers(0, h.num_nodes, size=(2, 3, 5)), device=DEVICE)
    y[0, 0, 0] = 255
    bad = y.clone()
    bad[1, 2, 4] = 77
    with pytest.raises(LabelError, match="77"):
        tree_min_loss(x, bad, h, backend="triton")
    with pytest.raises(LabelError, match="77"):
        hssn_loss(x, bad, h, backend="triton")
    as_ignored = bad.clone()
    as_ignored[1, 2, 4] = 255
    for fn in (tree_min_loss, hssn_loss):
        a = fn(x, bad, h, backend="triton", check_labels=False)
        b = fn(x, as_ignored, h, backend="triton")
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from hieraloss.torch import HSSNLoss, TreeMinLoss

    for module in (TreeMinLoss(h, backend="triton", check_labels=False),
                   HSSNLoss(h, backend="triton", check_labels=False)):
        torch.testing.assert_close(module(x, bad), module(x, as_ignored), rtol=0, atol=0)
        with pytest.raises(LabelError, match="77"):
            type(module)(h, backend="triton")(x, bad)
    total, parts = hssn_loss(x, y, h, backend="triton", return_parts=True, ce_weights=[1.0, 0.5])
    ref_total, ref_parts = hssn_loss(x, y, h, backend="torch", return_parts=True, ce_weights=[1.0, 0.5])
    torch.testing.assert_close(total, ref_total)
    assert set(parts) == set(ref_parts) and all(not p.requires_grad for p in parts.values())
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k])
    for d in (1, 2):
        a = depth_cross_entropy(x, y, h, d, backend="triton")
        b = depth_cross_entropy(x, y, h, d, backend="torch")
        torch.testing.assert_close(a, b)
        ga, gb = (torch.autograd.grad(v, x)[0] for v in (a, b))
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_scale_in_place_takes_every_block_once(monkeypatch, dtype):
    """The backward's in-place scaling: a few programs, each looping over every programs-th block of
    4096 entries (a ragged last one), equal to ``grad * scale`` in the compute dtype (bfloat16: to
    one unit in the last place, the interpreter's rounding of the cast); a scale of 1 leaves the
    buffer untouched."""
    from hieraloss.torch.kernels import _grad_buffer

    monkeypatch.setenv(_common.SCALE_PROGRAMS_ENV, "2")
    ct = torch.float64 if dtype == "float64" else torch.float32
    rng = np.random.default_rng(12)
    for n in (5, 4096, 5 * 4096 + 7):
        base = torch.tensor(rng.normal(size=n), device=DEVICE).to(TORCH_DTYPES[dtype])
        for scale in (1.0, 0.5, -3.0, 0.0):
            grad = base.clone()
            _grad_buffer.scale_in_place(grad, torch.tensor(scale, dtype=ct, device=DEVICE))
            expect = base if scale == 1.0 else (base.to(ct) * scale).to(base.dtype)
            ulp = 2.0 ** -7 if dtype == "bfloat16" and scale != 1.0 else 0.0
            torch.testing.assert_close(grad, expect, rtol=ulp, atol=0, msg=f"n={n}, scale={scale}")


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_backward_scales_the_forward_gradient_once(dtype):
    """The training step's backward scales the forward's gradient buffer in place (skipped when
    the upstream gradient is 1): any upstream scale gives scale x the unit gradient, the buffer
    becomes .grad, and a second backward through the same loss raises instead of rescaling."""
    from hieraloss.torch import hssn_loss, tree_min_loss

    h = presets.cityscapes()
    rng = np.random.default_rng(5)
    x0 = torch.tensor(rng.normal(size=(2, h.num_nodes, 3, 7)), device=DEVICE).to(TORCH_DTYPES[dtype])
    y = torch.tensor(rng.integers(0, h.num_leaves, size=(2, 3, 7)), device=DEVICE)
    tol = GRAD_TOL[dtype]
    for fn in (tree_min_loss, hssn_loss):
        x = x0.clone().requires_grad_(True)
        ref = torch.autograd.grad(fn(x, y, h, backend="torch"), x)[0].double()
        fn(x, y, h, backend="triton").backward()
        torch.testing.assert_close(x.grad.double(), ref, **tol)
        for scale in (2.5, 0.0, -1.0):
            x.grad = None
            (scale * fn(x, y, h, backend="triton")).backward()
            torch.testing.assert_close(x.grad.double(), scale * ref, **tol)
        (g,) = torch.autograd.grad(3.0 * fn(x, y, h, backend="triton"), x)
        assert not g.requires_grad and g.grad_fn is None
        torch.testing.assert_close(g.double(), 3.0 * ref, **tol)
        loss = fn(x, y, h, backend="triton")
        (g1,) = torch.autograd.grad(2.0 * loss, x, retain_graph=True)
        g1_copy = g1.clone()
        (g2,) = torch.autograd.grad(-3.0 * loss, x, retain_graph=True)
        torch.testing.assert_close(g1, g1_copy, rtol=0, atol=0)  # the first result is not changed
        assert not g2.requires_grad
        torch.testing.assert_close(g2.double(), -3.0 * ref, **tol)
        # create_graph=True: the gradient stays a function of the upstream gradient
        w = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
        (g,) = torch.autograd.grad(w * fn(x, y, h, backend="triton"), x, create_graph=True)
        (dw,) = torch.autograd.grad(g.double().sum(), w)
        torch.testing.assert_close(dw.double(), ref.sum(), **tol)
        loss = fn(x, y, h, backend="triton")
        (0.0 * loss).backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="zero upstream gradient"):
            loss.backward()


def test_wide_trees_cap_registers(monkeypatch):
    """The register cap at launch for trees of more than WIDE_TREE_NODES nodes, where the triton
    version needs it (never under the interpreter). (How many rows the generated kernel loads at once
    is tuning, left to the AOT checks and the GPU A/B, not asserted here.)"""
    small, wide = _common.WIDE_TREE_NODES, _common.WIDE_TREE_NODES + 1
    # the interpreter has no ptxas; a GPU under triton < 3.9 gets the cap
    expected = {"maxnreg": _common.MAX_REGISTERS} if _common._CAP_REGISTERS and not _common.interpreting() else {}
    assert _common.register_cap(149) == expected
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_CAP_REGISTERS", True)
    assert _common.register_cap(wide) == {"maxnreg": _common.MAX_REGISTERS}
    assert _common.register_cap(small) == {}
    monkeypatch.setattr(_common, "_CAP_REGISTERS", False)
    assert _common.register_cap(wide) == {}


@triton.jit
def _count_probe(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction, spin_limit,
                 coef_ptr, denom_ptr, scale_ptr, seen_ptr, WAIT: tl.constexpr, L2: tl.constexpr, D2: tl.constexpr,
                 CB: tl.constexpr, STEP: tl.constexpr, RB: tl.constexpr, F64: tl.constexpr, APART: tl.constexpr):
    if APART:
        shared_depth_scales_apart(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr,
                                  reduction, spin_limit, coef_ptr, denom_ptr, scale_ptr, WAIT, L2, D2, CB, STEP, RB,
                                  F64)
    else:
        shared_depth_scales(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
                            spin_limit, coef_ptr, denom_ptr, scale_ptr, WAIT, L2, D2, CB, STEP, RB, F64)
    if WAIT:  # the scales as this program sees them once it may use them
        k = tl.arange(0, D2)
        row = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(seen_ptr + row * D2 + k, tl.load(scale_ptr + k, mask=k < L2, other=0.0, cache_modifier=".cg"),
                 mask=k < L2)


@pytest.mark.parametrize("reduction,dtype,step,apart", [("hssn", torch.float32, 64, False),
                                                        ("mean", torch.float64, 256, True),
                                                        ("sum", torch.float32, 512, False)])
def test_label_count_in_the_objective_launch_matches_bincount(monkeypatch, reduction, dtype, step, apart):
    """The objective kernel's own label count (``_reduce.shared_depth_scales``, run by a probe kernel
    with the objective's grid) against a bincount of the label slots times the count table: a 600-leaf
    flat tree, 20 images of 4097 pixels in chunks of 256 (a short last chunk per image) counted in
    one or several loop steps, inlined or as a call, labels out of range and ignored included,
    strided labels. Each chunk's row, the denominators and the scales;
    with the wait, the scales every program sees. Then the state other programs leave behind when
    they run at the same time (on a GPU): chunks already claimed and counted, the flag already up;
    and a chunk claimed but never done, where each waiting program gives up after its polls and
    counts every label itself."""
    from hieraloss import Hierarchy
    from hieraloss.torch.kernels import _reduce, objective

    monkeypatch.setenv(_common.LABEL_CHUNK_ENV, "256")
    h = Hierarchy([-1] * 600)
    rng = np.random.default_rng(7)
    labels = rng.integers(-3, 605, size=(20, 4097))
    labels[3, :50] = 1000
    codes = objective.label_codes(h, 1000, torch.device(DEVICE))
    code, shift, table, _ = codes
    L = h.max_depth
    L2, D2 = 2 * L, _reduce.padded_width(2 * L)
    B, P = labels.shape
    per_image = -(-P // 256)
    chunks = _reduce.count_chunks(B, P)
    assert chunks == B * per_image == 340
    slots = np.clip(labels + shift, 0, code.numel() - 1)
    tab = table.cpu().numpy()
    chunk_rows = np.zeros((chunks, D2))
    for c in range(chunks):
        b, j = divmod(c, per_image)
        chunk_rows[c, :L2] = tab[slots[b, j * 256:(j + 1) * 256]].sum(0)
    counts = chunk_rows.sum(0)[:L2]
    ref = np.maximum(counts, 1.0)
    if reduction == "mean":
        ref[:L] = max(counts[:L].sum(), 1.0)
    elif reduction == "sum":
        ref[:L] = 1.0
    assert counts[:L].sum() > 0 and counts[L:].sum() > 0
    coef = torch.tensor(rng.uniform(0.5, 2.0, L2), dtype=torch.float64, device=DEVICE)
    lab = torch.tensor(np.repeat(labels, 2, axis=1), device=DEVICE)[:, ::2]
    assert lab.stride(1) == 2
    tol = dict(rtol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6)

    def run(wait, sync=(0, 0, 0, 0), rows=None, grid=(5, B)):
        sync = torch.tensor(sync, dtype=torch.int32, device=DEVICE)
        rows = torch.full((chunks, D2), float("nan"), dtype=torch.float64, device=DEVICE) if rows is None else rows
        denom = torch.full((L2,), float("nan"), dtype=torch.float64, device=DEVICE)
        scales = torch.full((L2,), float("nan"), dtype=dtype, device=DEVICE)
        seen = torch.full((grid[0] * grid[1], D2), float("nan"), dtype=dtype, device=DEVICE)
        _count_probe[grid](lab, lab.stride(0), lab.stride(1), shift, code.numel(), table, P, chunks, sync, rows,
                           _reduce.REDUCTION_IDS[reduction], _reduce.spin_limit(), coef, denom, scales, seen,
                           WAIT=wait, L2=L2, D2=D2,
                           CB=_reduce.count_chunk(), STEP=step, RB=_reduce.rows_per_step(D2) // 4,
                           F64=dtype == torch.float64, APART=apart, num_warps=4)
        if wait:
            np.testing.assert_allclose(seen[:, :L2].double().cpu().numpy(),
                                       np.broadcast_to(coef.cpu().numpy() / ref, (len(seen), L2)), **tol)
        return sync.tolist(), rows.cpu().numpy(), denom.cpu().numpy(), scales

    for wait in (False, True):
        sync, rows, denom, scales = run(wait)
        np.testing.assert_array_equal(rows, chunk_rows)
        np.testing.assert_allclose(denom, ref, rtol=1e-12)
        assert scales.dtype == dtype
        np.testing.assert_allclose(scales.cpu().numpy(), coef.cpu().numpy() / ref, **tol)
        # every chunk done once; each program that found the flag down made one claim too many (under
        # the interpreter, which runs programs one after another, only the first)
        assert chunks < sync[0] <= chunks + 5 * B and sync[1:] == [chunks, 1, 0]  # no wait given up
        if _common.interpreting():
            assert sync[0] == chunks + 1
    # 7 chunks already claimed and counted elsewhere: this grid counts the rest and sums them all
    seeded = torch.full((chunks, D2), float("nan"), dtype=torch.float64, device=DEVICE)
    seeded[:7] = torch.tensor(chunk_rows[:7], device=DEVICE)
    sync, rows, denom, _ = run(True, (7, 7, 0, 0), seeded)
    np.testing.assert_array_equal(rows, chunk_rows)
    np.testing.assert_allclose(denom, ref, rtol=1e-12)
    assert chunks < sync[0] <= chunks + 5 * B and sync[1:] == [chunks, 1, 0]
    # the flag already up: nothing is claimed or counted
    sync, rows, denom, _ = run(False, (chunks, chunks, 1, 0))
    assert sync == [chunks, chunks, 1, 0] and np.isnan(rows).all() and np.isnan(denom).all()
    # every chunk claimed, one never done: the flag stays down, and each program gives up waiting
    sync, rows, denom, scales = run(True, (chunks, chunks - 1, 0, 0), grid=(2, 3))
    assert sync == [chunks + 6, chunks - 1, 0, 6] and np.isnan(rows).all()
    np.testing.assert_allclose(denom, ref, rtol=1e-12)
    np.testing.assert_allclose(scales.cpu().numpy(), coef.cpu().numpy() / ref, **tol)


@pytest.mark.parametrize("reduction", ["hssn", "mean"])
def test_objective_gives_the_same_bits_for_any_chunking_and_run(monkeypatch, reduction):
    """The label count sums whole numbers in float64 and every reduction sums in a fixed order, so the
    loss, its parts and the gradient do not change by a bit with the chunk size of the count, with
    the count in a launch of its own (the benchmarks' A/B), or from one run to the next (on a GPU,
    where programs count and finish in a different order every time, this is a check of that
    order-independence; partial labels make the per-depth counts differ)."""

    h = presets.pascal_person_part()
    rng = np.random.default_rng(3)
    B, H, W = (4, 96, 160) if DEVICE == "cuda" else (2, 5, 23)
    x = torch.tensor(rng.normal(size=(B, h.num_nodes, H, W)), dtype=torch.float32, device=DEVICE)
    labels = rng.choice(np.append(h.node_ids, 255), size=(B, H, W))
    y = torch.tensor(labels, device=DEVICE)

    def step(chunk, separate=False):
        if chunk is None:  # the automatic chunk
            monkeypatch.delenv(_common.LABEL_CHUNK_ENV, raising=False)
        else:
            monkeypatch.setenv(_common.LABEL_CHUNK_ENV, str(chunk))
        monkeypatch.setenv("HIERALOSS_LABEL_COUNT", "separate" if separate else "in-kernel")
        xt = x.clone().requires_grad_(True)
        total, parts = fused_objective(xt, y, h, ignore_index=255, reduction=reduction, ce_weights=[1.0, 0.5, 0.25])
        total.backward()
        return total.detach(), parts, xt.grad

    first = step(8)
    assert all(torch.isfinite(t).all() for t in first) and float(first[0]) > 0
    for chunk, separate in ((8, False), (16, False), (64, False), (None, False), (16, True)):
        for a, b in zip(first, step(chunk, separate), strict=True):
            assert torch.equal(a, b)


@triton.jit
def _finalize_probe(part_ptr, group, counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr,
                    L2: tl.constexpr, D2: tl.constexpr, RB: tl.constexpr, TM: tl.constexpr, CE: tl.constexpr,
                    F64: tl.constexpr):
    one = (group > 0).to(tl.int32)  # group >= 1
    finalize_sums(part_ptr, group, counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr, parts_ptr, one,
                  L2, D2, RB, TM, CE, F64)


@pytest.mark.parametrize("tm,ce", [(True, True), (True, False), (False, True)])
def test_finalize_sums_match_numpy(tm, ce):
    """The objective kernel's closing reduction, from the per-program sums to total and parts (run
    here by a probe kernel with one program per row): groups of 16 rows and a short last group, rows
    read in several chunks, float64 sums, and the columns the kernel did not write (``tm`` / ``ce``
    off) ignored even when they hold garbage."""
    rng = np.random.default_rng(8)
    L = 3
    for dtype in (torch.float32, torch.float64):
        part = rng.normal(size=(201, 2 * L))
        written = np.array([tm] * L + [ce] * L)
        garbage = np.where(written, part, np.nan)
        denom = rng.uniform(1, 50, 2 * L)
        coef = rng.uniform(0.1, 2, 2 * L)
        t = lambda a, dt=torch.float64: torch.tensor(a, dtype=dt, device=DEVICE)  # noqa: E731
        total, parts = torch.empty((), dtype=dtype, device=DEVICE), torch.empty(1 + L, dtype=dtype, device=DEVICE)
        rows, group = part.shape[0], 16
        counter = torch.zeros(1 + triton.cdiv(rows, group), dtype=torch.int32, device=DEVICE)
        gsum = torch.empty((triton.cdiv(rows, group), 8), dtype=torch.float64, device=DEVICE)
        _finalize_probe[(rows,)](t(garbage, dtype), group, counter, gsum, t(denom), t(coef), 5.0, total, parts,
                                 L2=2 * L, D2=8, RB=4, TM=tm, CE=ce, F64=dtype == torch.float64)
        assert counter.tolist() == [triton.cdiv(rows, group)] + [group] * (rows // group) + [rows % group]
        ratio = np.where(written, t(part, dtype).double().cpu().numpy().sum(0), 0.0) / denom
        tol = dict(rtol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6)
        np.testing.assert_allclose(float(total), ratio @ coef, **tol)
        np.testing.assert_allclose(parts.cpu().numpy(), np.concatenate([[5.0 * ratio[:L].sum()], ratio[L:]]), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_path_equals_the_registered_op(monkeypatch, dtype):
    """Eager calls skip torch.library's dispatcher (EagerFusedLoss); the registered op gives the same
    total, parts, gradient and second backward, and is what runs when the eager path is off."""
    from hieraloss.torch.kernels import objective

    h = presets.cityscapes()
    rng = np.random.default_rng(6)
    x0 = rng.normal(size=(2, h.num_nodes, 3, 7))
    y = torch.tensor(h.node_ids[rng.integers(0, h.num_nodes, size=(2, 3, 7))], device=DEVICE)

    def run():
        x = torch.tensor(x0, device=DEVICE, dtype=dtype, requires_grad=True)
        total, parts = fused_objective(x, y, h, ignore_index=255, gamma=2.0, tm_weight=0.7, ce_weights=(1.0, 0.5))
        assert not parts.requires_grad
        (3.0 * total).backward(retain_graph=True)
        first = x.grad.clone()
        x.grad = None
        total.backward()
        return total.detach(), parts, first, x.grad, type(total.grad_fn).__name__

    total, parts, g1, g2, node = run()
    assert "EagerFusedLoss" in node, node
    monkeypatch.setattr(objective, "eager", lambda t: False)
    op = run()
    assert "EagerFusedLoss" not in op[4], op[4]
    for a, b in zip((total, parts, g1, g2), op[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(g2, g1 / 3, rtol=1e-6, atol=0)


def test_eager_is_off_while_traced():
    """Under a dispatch mode, a tensor subclass or a functorch transform the registered op runs (what
    compilers and transforms must see)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hieraloss.torch.kernels._grad_buffer import eager

    t = torch.zeros(3, device=DEVICE)
    assert eager(t)
    with TorchDispatchMode():
        assert not eager(t)
    assert not eager(torch.nn.Parameter(t))
    seen = []
    torch.func.vmap(lambda r: seen.append(eager(r)) or r)(torch.zeros(2, 3))
    assert seen == [False]


@pytest.mark.parametrize("name", ["BLOCK_P_ENV", "LABEL_CHUNK_ENV", "SCALE_PROGRAMS_ENV"])
def test_launch_switches_take_powers_of_two(monkeypatch, name):
    """The launch-size switches: unset or empty is automatic, a power of two is taken, anything else
    raises a ValueError that names the variable and the fix."""
    env = getattr(_common, name)
    monkeypatch.delenv(env, raising=False)
    assert _common.launch_switch(env) is None
    monkeypatch.setenv(env, "")
    assert _common.launch_switch(env) is None
    monkeypatch.setenv(env, "32")
    assert _common.launch_switch(env) == 32
    for bad in ("12", "0", "-4", "x"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=f"{env} must be a positive power of two.*unset it"):
            _common.launch_switch(env)
