"""The compiled kernel's HSSN objective: tree-min and the cross-entropy of every depth in one pass
(hieraloss._native with ``ce_sums`` / ``ce_grad_scale``; torch glue ``hssn_objective_native`` in
hieraloss.torch.ops.native, paddle twin in tests/paddle/test_paddle_native.py).

Values (total, tree-min part, per-depth cross-entropies) and gradients against a plain-loop float64
reference written here (tree-min from tests/oracle.py, the cross-entropy by its own loop over pixels
and depths), for every compiled instruction set, float32 and float64, random hierarchies (balanced
or not, any channel layout), ignore pixels, partial labels, focal gamma, node weights and
cross-entropy weights with zeros; presets; a float64 gradcheck; the fused-gradient bookkeeping;
inputs left untouched; the class tables and counts; unsupported output sets.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import oracle
import pytest
import torch
from _native_utils import isa_capped
from _objective_cases import cases
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import depth_classes, objective_reference

import hieraloss
from hieraloss import _native
from hieraloss.core.plan import ce_counted_per_depth, plan_for
from hieraloss.testing import hierarchies
from hieraloss.torch.ops.cross_entropy import depth_cross_entropy_op
from hieraloss.torch.ops.native import hssn_objective_native
from hieraloss.torch.ops.tree_min import tree_min_op

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"native kernel unavailable: {_native.load_error()}")

ISA = pytest.mark.parametrize("isa", _native.ISAS)


# ---------------------------------------------------------------------------- helpers
def _channels(labels, h) -> torch.Tensor:
    return torch.from_numpy(np.asarray(h.label_channels(np.asarray(labels), 255), dtype=np.int64))


def run_native(x, labels, h, *, gamma=0.0, node_weight=None, tree_min_weight=5.0, ce_weights=None, upstream=1.0):
    """(total, tm, ce, grad of upstream * total) through hssn_objective_native, as torch tensors."""
    xt = (x.detach().clone() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))).requires_grad_(True)
    w = None if node_weight is None else torch.as_tensor(np.asarray(node_weight, dtype=np.float64))
    ce_weights = [1.0] * h.max_depth if ce_weights is None else ce_weights
    total, tm, ce = hssn_objective_native(xt, _channels(labels, h), h, gamma=gamma, node_weight=w,
                                                     tree_min_weight=tree_min_weight, ce_weights=ce_weights)
    assert tm.grad_fn is None and not tm.requires_grad and not ce.requires_grad
    (grad,) = torch.autograd.grad(total * upstream, xt)
    return total.detach(), tm, ce, grad


def _check(got, want, *, rtol, atol, grad_atol):
    total, tm, ce, grad = got
    w_total, w_tm, w_ce, w_grad = want
    np.testing.assert_allclose(total.numpy(), w_total, rtol=rtol, atol=atol)
    np.testing.assert_allclose(tm.numpy(), w_tm, rtol=rtol, atol=atol)
    np.testing.assert_allclose(ce.numpy(), w_ce, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad.numpy(), w_grad, rtol=rtol, atol=grad_atol * max(1.0, np.abs(w_grad).max()))


# ---------------------------------------------------------------------------- against the loop reference
@ISA
@settings(max_examples=15)
@given(data=st.data())
def test_matches_loop_reference_float64(isa, data):
    h, x, labels, kw = data.draw(cases(ties=True))
    with isa_capped(isa):
        got = run_native(x, labels, h, **kw)
    assert got[0].dtype == got[1].dtype == got[2].dtype == got[3].dtype == torch.float64
    assert got[2].shape == (h.max_depth,)
    _check(got, objective_reference(x, labels, h, **kw), rtol=1e-10, atol=1e-12, grad_atol=1e-12)


@ISA
@settings(max_examples=15)
@given(data=st.data())
def test_matches_loop_reference_float32(isa, data):
    """float32 runs the kernel's own exp / log polynomials: within a few ulp of the float64 truth."""
    h, x, labels, kw = data.draw(cases(ties=True))
    x32 = x.astype(np.float32)
    with isa_capped(isa):
        got = run_native(torch.from_numpy(x32), labels, h, **kw)
    assert got[0].dtype == got[1].dtype == got[2].dtype == got[3].dtype == torch.float32
    want = objective_reference(x32.astype(np.float64), labels, h, **kw)  # the same inputs, in float64
    _check(got, want, rtol=3e-6, atol=1e-6, grad_atol=1e-6)


@ISA
@pytest.mark.parametrize("preset,shape", [("cityscapes", (2, 5, 13)), ("mapillary_vistas_v2", (1, 4, 11))])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_presets_match_loop_reference(isa, preset, shape, dtype):
    """Cityscapes (balanced) and Mapillary Vistas 2.0 (leaves at depths 2-4: shallow leaves are classes
    of the deeper depths), with ignored pixels, partial labels, node weights, focal gamma."""
    h = hieraloss.presets.get(preset)
    rng = np.random.default_rng(1)
    x = (rng.normal(0, 3, (shape[0], h.num_nodes, *shape[1:]))).astype(dtype)
    labels = rng.integers(0, h.num_nodes, shape)  # leaves and partial labels
    labels[:, 0, :3] = 255
    w = rng.uniform(0.5, 2.0, h.num_nodes)
    ce_weights = [1.0, 0.0, 0.5, 2.0][: h.max_depth]
    kw = dict(gamma=2.0, node_weight=w, tree_min_weight=5.0, ce_weights=ce_weights)
    with isa_capped(isa):
        got = run_native(torch.from_numpy(x), labels, h, **kw)
    want = objective_reference(x.astype(np.float64), labels, h, **kw)
    if dtype == np.float64:
        _check(got, want, rtol=1e-10, atol=1e-12, grad_atol=1e-12)
    else:
        _check(got, want, rtol=3e-6, atol=1e-6, grad_atol=1e-6)


@ISA
@pytest.mark.parametrize("preset,batch", [("cityscapes", 2), ("mapillary_vistas_v2", 1)])
def test_matches_eager_ops_over_many_tiles_and_threads(isa, preset, batch):
    """Larger than the loop reference allows: many tiles per thread (the lane sums are flushed every 8
    tiles), 1 and 2 threads; against the eager torch ops (tree_min_op + depth_cross_entropy_op) in float64."""
    h = hieraloss.presets.get(preset)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, h.num_nodes, 37, 101, generator=gen) * 3
    labels = torch.randint(0, h.num_nodes, (batch, 37, 101), generator=gen)
    labels[:, :3] = 255
    lc = _channels(labels.numpy(), h)
    ce_weights = [1.0, 0.5, 0.0, 2.0][: h.max_depth]
    xr = x.double().requires_grad_(True)
    tm_want = tree_min_op(xr, lc, h, gamma=0.0, reduction="hssn", node_weight=None) / 5
    ce_want = torch.stack([depth_cross_entropy_op(xr, lc, h, d) for d in range(1, h.max_depth + 1)])
    total_want = 5.0 * tm_want + (torch.tensor(ce_weights, dtype=torch.float64) * ce_want).sum()
    (grad_want,) = torch.autograd.grad(total_want, xr)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with isa_capped(isa):
                total, tm, ce, grad = run_native(x, labels.numpy(), h, ce_weights=ce_weights)
            np.testing.assert_allclose(total.item(), total_want.item(), rtol=2e-6)
            np.testing.assert_allclose(tm.item(), tm_want.item(), rtol=2e-6)
            np.testing.assert_allclose(ce.numpy(), ce_want.detach().numpy(), rtol=2e-6)
            np.testing.assert_allclose(grad.numpy(), grad_want.numpy(), rtol=3e-6,
                                       atol=1e-6 * grad_want.abs().max().item())
            grads.append(grad)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])  # per entry: no cross-pixel arithmetic in the gradient


@settings(max_examples=8)
@given(data=st.data())
def test_gradcheck_float64(data):
    h, x, labels, kw = data.draw(cases(ties=False, shapes=((1, 5), (2, 3, 4), (1, 2, 2, 3))))
    lc = _channels(labels, h)
    w = None if kw["node_weight"] is None else torch.from_numpy(kw["node_weight"])

    def f(t):
        return hssn_objective_native(t, lc, h, gamma=kw["gamma"], node_weight=w,
                                                tree_min_weight=kw["tree_min_weight"], ce_weights=kw["ce_weights"])[0]

    assert torch.autograd.gradcheck(f, (torch.from_numpy(x).requires_grad_(True),))


# ---------------------------------------------------------------------------- edge cases
def _setup(seed=0, shape=(2, 9, 13), preset="mapillary_vistas_v2"):
    h = hieraloss.presets.get(preset)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], h.num_nodes, *shape[1:], generator=gen) * 2
    labels = torch.randint(0, h.num_nodes, shape, generator=gen)
    return h, x, labels


def test_no_counted_pixel_gives_exact_zeros():
    h, x, labels = _setup(1, shape=(1, 3, 4))
    total, tm, ce, grad = run_native(x, np.full((1, 3, 4), 255), h, ce_weights=[1.0] * h.max_depth)
    assert total.item() == 0.0 and tm.item() == 0.0 and torch.equal(ce, torch.zeros(h.max_depth))
    assert torch.count_nonzero(grad) == 0
    # partial labels at depth 1 only: depth 1 counts, deeper depths have no counted pixel (exact 0)
    depth1 = [int(h.node_ids[v]) for v in h.depth_channels[0] if not h.is_leaf[v]]
    labels = np.array(depth1[:2] * 6).reshape(1, 3, 4)
    _, _, ce, _ = run_native(x, labels, h)
    assert ce[0].item() > 0 and torch.equal(ce[1:], torch.zeros(h.max_depth - 1))
    np.testing.assert_allclose(ce.numpy(), objective_reference(x.numpy(), labels, h)[2], rtol=1e-6)


def test_zero_ce_weights_add_nothing_to_the_tree_min_gradient():
    """The kernel with every CE gradient scale 0 writes the tree-min-only gradient bit for bit (the CE
    sums are still computed); through the torch glue, the objective with CE weights 0 is tree-min."""
    h, x, labels = _setup(2)
    tree = plan_for(h)
    xn = x.numpy()
    lc = _channels(labels.numpy(), h)
    scale = np.random.default_rng(0).uniform(0.1, 1.0, h.num_nodes)
    args = (_native.FLOAT32, xn.ctypes.data, (xn.shape[0], h.num_nodes, xn[0, 0].size), lc.numpy().ctypes.data,
            tree, 2.0)
    plain, fused = np.empty_like(xn), np.empty_like(xn)
    sums, sums2, ce_sums = np.empty(h.num_nodes), np.empty(h.num_nodes), np.empty(h.max_depth)
    zero = np.zeros(h.max_depth)
    _native.tree_min(*args, channel_sums=sums.ctypes.data, grad=plain.ctypes.data, grad_scale=scale.ctypes.data)
    _native.tree_min(*args, channel_sums=sums2.ctypes.data, grad=fused.ctypes.data, grad_scale=scale.ctypes.data,
                     ce_sums=ce_sums.ctypes.data, ce_grad_scale=zero.ctypes.data)
    assert np.array_equal(plain, fused) and np.array_equal(sums, sums2)
    want = torch.stack([depth_cross_entropy_op(x.double(), lc, h, d) for d in range(1, h.max_depth + 1)])
    counts = np.bincount(lc.numpy().ravel() + 1, minlength=h.num_nodes + 1)[1:] @ ce_counted_per_depth(h)
    np.testing.assert_allclose(ce_sums / counts, want.numpy(), rtol=2e-6)
    import hieraloss.torch as ht

    xt = x.clone().requires_grad_(True)
    (2.0 * ht.focal_tree_min_loss(xt, labels, h, gamma=0.5, reduction="hssn", backend="native") / 5).backward()
    total, tm, ce, grad = run_native(x, labels.numpy(), h, gamma=0.5, tree_min_weight=2.0,
                                     ce_weights=[0.0] * h.max_depth)
    np.testing.assert_allclose(grad.numpy(), xt.grad.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(total.item(), 2.0 * tm.item(), rtol=1e-7)


def test_extreme_logits_float32():
    """Saturated logits (|x| up to 200, +-0, tiny): the float32 log-sum-exp stays within a few ulp."""
    h = hieraloss.presets.cityscapes()
    z = np.concatenate([np.linspace(-200, 200, 701), [0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 103.5, -103.5]])
    x = np.stack([np.roll(z, 7 * k) for k in range(h.num_nodes)])[None].astype(np.float32)
    labels = np.random.default_rng(0).integers(0, h.num_nodes, (1, z.size))
    for isa in _native.ISAS:
        with isa_capped(isa):
            got = run_native(torch.from_numpy(x), labels, h, ce_weights=[1.0, 0.7])
        want = objective_reference(x.astype(np.float64), labels, h, ce_weights=[1.0, 0.7])
        _check(got, want, rtol=2e-6, atol=1e-6, grad_atol=1e-6)
        assert np.isfinite(got[3].numpy()).all()


def test_non_finite_logits_propagate_into_counted_depths():
    h, x, labels = _setup(3, shape=(1, 4, 4), preset="cityscapes")
    labels[...] = 0  # leaf 0 everywhere: every depth counts
    x[0, 20, 1, 1] = float("nan")  # a depth-1 class (channel 20) of a counted pixel
    _, _, ce, _ = run_native(x, labels.numpy(), h)
    assert torch.isnan(ce[0]) and torch.isfinite(ce[1])
    labels[0, 1, 1] = 255  # the pixel is ignored: nothing propagates
    total, _, ce, grad = run_native(x, labels.numpy(), h)
    assert torch.isfinite(ce).all() and torch.isfinite(total) and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------- fused-gradient bookkeeping
def test_upstream_scaling_retained_graph_and_no_grad():
    h, x, labels = _setup(4)
    lc = _channels(labels.numpy(), h)
    kw = dict(gamma=2.0, node_weight=None, tree_min_weight=5.0, ce_weights=[1.0, 0.0, 0.5, 1.0])
    xt = x.clone().requires_grad_(True)
    total, tm, ce = hssn_objective_native(xt, lc, h, **kw)
    (3.0 * total).backward(retain_graph=True)  # the gradient the forward pass wrote, scaled
    first = xt.grad.clone()
    xt.grad = None
    (0.5 * total).backward()  # the stored gradient was handed out: recomputed (gradient-only pass)
    np.testing.assert_allclose(xt.grad.numpy(), first.numpy() / 6.0, rtol=1e-6, atol=1e-9)
    _, _, _, want = run_native(x.double(), labels.numpy(), h, **kw)
    np.testing.assert_allclose(first.numpy(), 3.0 * want.numpy(), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        t2, tm2, ce2 = hssn_objective_native(xt, lc, h, **kw)
    assert t2.grad_fn is None
    assert t2.item() == total.item() and tm2.item() == tm.item() and torch.equal(ce2, ce)
    t3, _, _ = hssn_objective_native(x, lc, h, **kw)  # logits without requires_grad
    assert t3.grad_fn is None and t3.item() == total.item()


def test_inputs_are_not_modified_and_halves_and_views_work():
    h, x, labels = _setup(5, shape=(2, 6, 10), preset="cityscapes")
    lc = _channels(labels.numpy(), h)
    w = torch.linspace(0.5, 1.5, h.num_nodes, dtype=torch.float64)
    x0, lc0, w0 = x.clone(), lc.clone(), w.clone()
    kw = dict(gamma=0.5, node_weight=w, tree_min_weight=5.0, ce_weights=[1.0, 0.5])
    xt = x.clone().requires_grad_(True)
    hssn_objective_native(xt, lc, h, **kw)[0].backward()
    assert torch.equal(xt.detach(), x0) and torch.equal(lc, lc0) and torch.equal(w, w0)
    want_total, _, want_ce = hssn_objective_native(x.double(), lc, h, **kw)
    for view in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        vt = view.clone().requires_grad_(True)
        total, _, ce = hssn_objective_native(vt, lc, h, **kw)
        total.backward()
        np.testing.assert_allclose(total.item(), want_total.item(), rtol=2e-6)
        np.testing.assert_allclose(vt.grad.numpy(), xt.grad.numpy(), rtol=1e-6, atol=1e-9)
    for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        xh = x.to(dtype).requires_grad_(True)
        total, tm, ce = hssn_objective_native(xh, lc, h, **kw)
        assert total.dtype == tm.dtype == ce.dtype == torch.float32
        total.backward()
        assert xh.grad.dtype == dtype
        xd = xh.detach().double().requires_grad_(True)  # the inputs the kernel saw, in float64
        ref_total, _, ref_ce = hssn_objective_native(xd, lc, h, **kw)
        ref_total.backward()
        np.testing.assert_allclose(total.item(), ref_total.item(), rtol=1e-5)
        np.testing.assert_allclose(ce.numpy(), ref_ce.numpy(), rtol=1e-5)
        np.testing.assert_allclose(xh.grad.double().numpy(), xd.grad.numpy(), rtol=tol,
                                   atol=tol * xd.grad.abs().max().item())


# ---------------------------------------------------------------------------- tables, counts, the ABI
@settings(max_examples=30)
@given(h=hierarchies(max_depth=4, max_children=3, order=None))
def test_class_tables_and_ce_counts_describe_the_hierarchy(h):
    plan = plan_for(h)
    t = oracle.tree(h)
    L = h.max_depth
    offsets, channels, target = (plan.int32(name) for name in ("class_offsets", "class_channels", "ce_target"))
    assert all(a.dtype == np.int32 and a.flags.c_contiguous and not a.flags.writeable
               for a in (offsets, channels, target))
    assert plan.int32("class_offsets") is offsets  # made once per plan
    assert plan.max_depth == L and offsets[0] == 0 and offsets.size == L + 1
    counted = ce_counted_per_depth(h)
    assert counted.shape == (h.num_nodes, L)
    pre, size = plan.int32("pre").astype(int), plan.int32("size").astype(int)
    for d in range(1, L + 1):
        cls = channels[offsets[d - 1]:offsets[d]].tolist()
        assert cls == depth_classes(t, d) == h.depth_channels[d - 1].tolist()
        for c in range(h.num_nodes):
            counts = not t.children[c] or t.depth[c] >= d
            assert bool(counted[c, d - 1]) == counts
            # the kernel's target: the one class that is c or above c, -1 where the pixel does not count
            hits = [v for v in cls if pre[v] <= pre[c] < pre[v] + size[v]]
            assert hits == ([t.path_of(c)[d - 1]] if counts else [])
            assert target[c, d - 1] == (hits[0] if counts else -1)


def test_unsupported_output_sets_and_bad_tables_are_refused():
    h = hieraloss.presets.cityscapes()
    tree = plan_for(h)
    x = np.zeros((1, h.num_nodes, 8), dtype=np.float32)
    lc = np.zeros((1, 8), dtype=np.int64)
    sums = np.zeros(h.num_nodes)
    ce_sums = np.zeros(h.max_depth)
    scale = np.ones(h.max_depth)
    out = np.zeros_like(x)
    args = (_native.FLOAT32, x.ctypes.data, x.shape, lc.ctypes.data, tree, 0.0)
    for kw in (dict(loss_map=out.ctypes.data, ce_sums=ce_sums.ctypes.data),  # a map with the CE
               dict(ce_sums=ce_sums.ctypes.data),  # CE sums without the tree-min sums
               dict(channel_sums=sums.ctypes.data, grad=out.ctypes.data, ce_sums=ce_sums.ctypes.data),  # no CE scale
               dict(grad=out.ctypes.data, grad_up=out.ctypes.data, ce_grad_scale=scale.ctypes.data)):
        with pytest.raises(RuntimeError, match="unsupported combination"):
            _native.tree_min(*args, **kw)
    _native.tree_min(*args, channel_sums=sums.ctypes.data, ce_sums=ce_sums.ctypes.data)  # supported
    np.testing.assert_allclose(ce_sums, [8 * math.log(7), 8 * math.log(19)], rtol=1e-6)  # uniform logits
    bad_channels = tree.class_channels.copy()
    bad_channels[3] = h.num_nodes  # a channel out of range
    broken = dataclasses.replace(tree, class_channels=bad_channels)
    assert broken.int32("class_channels")[3] == h.num_nodes  # the copy's own int32 table, not the cached one
    with pytest.raises(RuntimeError, match="bad sizes"):
        _native.tree_min(*args[:4], broken, 0.0, channel_sums=sums.ctypes.data, ce_sums=ce_sums.ctypes.data)
