"""The compiled CPU tree-min kernel (hieraloss._native, torch glue in hieraloss.torch.ops.native).

Values and gradients against the loop oracle for every instruction set compiled in and supported
here (baseline, AVX2, AVX-512), over random hierarchies, tile-spanning shapes, ignore masks, partial
labels, ties, reductions, node weights and gammas; against the eager torch op at larger sizes;
thread-count independence; the fused-gradient bookkeeping (retained graphs, upstream scaling); the
environment switches. ``HIERALOSS_REQUIRE_NATIVE=1`` (set by ``make test``) makes a missing build fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import oracle
import pytest
import torch
from _native_utils import isa_capped
from hypothesis import given, settings
from hypothesis import strategies as st

import hieraloss
import hieraloss.numpy as hnp
import hieraloss.torch as ht
from hieraloss import _native
from hieraloss.core.plan import plan_for
from hieraloss.testing import hierarchies, label_maps, logits

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"native kernel unavailable: {_native.load_error()}")

REDUCTIONS = ("mean", "sum", "none", "hssn")


def test_kernel_is_built_where_required():
    if os.environ.get("HIERALOSS_REQUIRE_NATIVE") != "1":
        pytest.skip("HIERALOSS_REQUIRE_NATIVE is not set")
    assert _native.available(), _native.load_error()


ISA = pytest.mark.parametrize("isa", _native.ISAS)


def _t(a):
    return torch.from_numpy(np.array(a))


def _value_and_grad(x, labels, h, *, gamma, reduction, weight=None, upstream=None, backend="native"):
    xt = x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) else _t(x).requires_grad_(True)
    fn = ht.tree_min_loss if gamma is None else ht.focal_tree_min_loss
    kw = {} if gamma is None else {"gamma": gamma}
    value = fn(xt, _t(labels) if not isinstance(labels, torch.Tensor) else labels, h, reduction=reduction,
               node_weight=weight, backend=backend, **kw)
    up = torch.ones_like(value) if upstream is None else torch.as_tensor(upstream).to(value)
    (grad,) = torch.autograd.grad((value * up).sum(), xt)
    return value.detach(), grad


# ---------------------------------------------------------------------------- the kernel's tables
@given(h=hierarchies(max_depth=4, max_children=4, order=None))
def test_the_kernel_tables_describe_the_hierarchy(h):
    plan = plan_for(h)
    pre, size, edges = plan.int32("pre").astype(int), plan.int32("size").astype(int), plan.int32("edges")
    assert sorted(pre.tolist()) == list(range(h.num_nodes))
    for v in range(h.num_nodes):
        for u in range(h.num_nodes):
            below = pre[v] <= pre[u] < pre[v] + size[v]
            assert below == bool(h.is_ancestor[v, u]), (v, u)
    kids = [int(k) for k, _ in edges]
    assert sorted(kids) == [v for v in range(h.num_nodes) if h.parent[v] >= 0]
    for k, p in edges:
        assert h.parent[k] == p
    depths = [int(h.depth[k]) for k in kids]
    assert depths == sorted(depths, reverse=True)  # deepest first
    for p in set(int(p) for _, p in edges):  # siblings keep channel order (the zmax tie order)
        assert [int(k) for k, q in edges if q == p] == sorted(int(c) for c in h.children[p])


# ---------------------------------------------------------------------------- against the loop oracle
@st.composite
def cases(draw, ties=True):
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    # several spatial widths: one partial tile, exactly one tile (64 pixels), several tiles
    shape = draw(st.sampled_from([(1, 5), (2, 64), (1, 3, 47), (2, 150), (1, 2, 2, 33)]))
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = draw(logits(h, shape, ties=ties))
    return h, x, labels


@ISA
@settings(max_examples=25)
@given(data=st.data())
def test_matches_loop_oracle_float64(isa, data):
    h, x, labels = data.draw(cases(ties=True))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([None, 2.0, 0.5]))
    w = data.draw(st.sampled_from([None, "random"]))
    w = None if w is None else np.random.default_rng(0).uniform(0.5, 2.0, h.num_nodes)
    upstream = None
    if reduction == "none":
        upstream = np.random.default_rng(1).normal(size=(x.shape[0], h.num_nodes, *x.shape[2:]))
    with isa_capped(isa):
        value, grad = _value_and_grad(x, labels, h, gamma=gamma, reduction=reduction,
                                      weight=None if w is None else torch.from_numpy(w), upstream=upstream)
    want = oracle.tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction, node_weight=w)
    want_grad = oracle.tree_min_grad(x, labels, h, gamma=gamma, reduction=reduction, node_weight=w,
                                     upstream=upstream)
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)


@ISA
@settings(max_examples=25)
@given(data=st.data())
def test_matches_loop_oracle_float32(isa, data):
    """float32 runs the kernel's own exp/log1p polynomials: within a few ulp of the float64 truth."""
    h, x, labels = data.draw(cases(ties=True))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([None, 2.0, 1.5]))
    x32 = x.astype(np.float32)
    upstream = None
    if reduction == "none":
        upstream = np.random.default_rng(1).normal(size=(x.shape[0], h.num_nodes, *x.shape[2:]))
    with isa_capped(isa):
        value, grad = _value_and_grad(_t(x32), labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    exact = x32.astype(np.float64)  # the same inputs, in float64
    want = oracle.tree_min_loss(exact, labels, h, gamma=gamma, reduction=reduction)
    want_grad = oracle.tree_min_grad(exact, labels, h, gamma=gamma, reduction=reduction, upstream=upstream)
    np.testing.assert_allclose(value.numpy(), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=2e-6, atol=1e-7 * max(1.0, np.abs(want_grad).max()))


@pytest.mark.parametrize("isa", _native.ISAS)
def test_extreme_logits_float32(isa):
    """Saturated and subnormal ranges of the float32 polynomials: |z| up to 200, exact zeros, +-0."""
    h = hieraloss.Hierarchy.from_dict({"a": ["a1", "a2"], "b": ["b1"]})
    z = np.concatenate([np.linspace(-200, 200, 4001), [0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 103.5, -103.5]])
    P = z.size
    x = np.stack([np.roll(z, k) for k in range(h.num_nodes)])[None].astype(np.float32)
    labels = np.random.default_rng(0).integers(0, h.num_nodes, (1, P))
    with isa_capped(isa):
        value, grad = _value_and_grad(_t(x), labels, h, gamma=None, reduction="none",
                                      upstream=np.ones((1, h.num_nodes, P)))
    exact = x.astype(np.float64)
    want = oracle.tree_min_loss(exact, labels, h, reduction="none")
    want_grad = oracle.tree_min_grad(exact, labels, h, reduction="none", upstream=np.ones((1, h.num_nodes, P)))
    # Each loss entry is one term: a few float32 roundings on top of the polynomials (no FMA on the
    # baseline ISA). A gradient entry can be a sum of terms of both signs, so it gets an absolute bound.
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-6, atol=1e-44)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-6, atol=1e-12)
    assert np.isfinite(value.numpy()).all() and np.isfinite(grad.numpy()).all()


# ---------------------------------------------------------------------------- against the eager op, larger
@ISA
@pytest.mark.parametrize("preset,batch", [("cityscapes", 2), ("mapillary_vistas_v2", 1)])
@pytest.mark.parametrize("gamma", [None, 2.0])
def test_matches_eager_torch_op_on_presets(isa, preset, batch, gamma):
    h = hieraloss.presets.get(preset)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, h.num_nodes, 19, 71, generator=gen) * 3
    labels = torch.randint(0, h.num_nodes, (batch, 19, 71), generator=gen)  # leaves and partial labels
    labels[:, :2] = 255
    for reduction in REDUCTIONS:
        up = torch.randn(batch, h.num_nodes, 19, 71, generator=gen) if reduction == "none" else None
        with isa_capped(isa):
            value, grad = _value_and_grad(x, labels, h, gamma=gamma, reduction=reduction, upstream=up)
        want, want_grad = _value_and_grad(x.double(), labels, h, gamma=gamma, reduction=reduction, upstream=up,
                                          backend="torch")
        np.testing.assert_allclose(value.numpy(), want.numpy(), rtol=3e-6, atol=1e-7)
        np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=3e-6, atol=1e-7 * want_grad.abs().max().item())


def test_thread_count_leaves_gradient_bitwise_and_value_within_rounding():
    h = hieraloss.presets.cityscapes()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, h.num_nodes, 37, 101, generator=gen) * 2
    labels = torch.randint(0, h.num_leaves, (3, 37, 101), generator=gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_value_and_grad(x, labels, h, gamma=None, reduction="hssn"))
    finally:
        torch.set_num_threads(before)
    for value, grad in results[1:]:
        assert torch.equal(grad, results[0][1])  # per entry: no cross-pixel arithmetic
        assert abs(value.item() - results[0][0].item()) <= 1e-6 * abs(results[0][0].item())


def test_matches_numpy_backend_with_node_weight_and_spatial_ranks():
    h = hieraloss.presets.pascal_person_part()
    rng = np.random.default_rng(4)
    for spatial in [(), (7,), (3, 5), (2, 3, 4)]:
        x = rng.normal(0, 3, (2, h.num_nodes, *spatial))
        labels = rng.integers(0, h.num_nodes, (2, *spatial))
        w = rng.uniform(0.1, 3.0, h.num_nodes)
        for reduction in REDUCTIONS:
            value, _ = _value_and_grad(x, labels, h, gamma=None, reduction=reduction, weight=torch.from_numpy(w))
            want = hnp.tree_min_loss(x, labels, h, reduction=reduction, node_weight=w)
            np.testing.assert_allclose(value.numpy(), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=8)
@given(data=st.data())
def test_gradcheck_float64(data):
    h, x, labels = data.draw(cases(ties=False))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([0.0, 2.0, 1.5]))
    lab = _t(labels)
    up = torch.from_numpy(np.random.default_rng(2).normal(size=(x.shape[0], h.num_nodes, *x.shape[2:])))

    def f(t):
        v = ht.focal_tree_min_loss(t, lab, h, gamma=gamma, reduction=reduction, backend="native")
        return (v * up).sum() if reduction == "none" else v

    assert torch.autograd.gradcheck(f, (_t(x).requires_grad_(True),))


# ---------------------------------------------------------------------------- fused-gradient bookkeeping
def _setup(seed=0, shape=(2, 9, 13)):
    h = hieraloss.presets.cityscapes()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], h.num_nodes, *shape[1:], generator=gen)
    labels = torch.randint(0, h.num_nodes, shape, generator=gen)
    return h, x, labels


def test_upstream_scaling_and_retained_graph_second_backward():
    h, x, labels = _setup()
    xt = x.clone().requires_grad_(True)
    loss = ht.tree_min_loss(xt, labels, h, backend="native")
    (3.0 * loss).backward(retain_graph=True)  # uses the gradient written by the forward pass
    first = xt.grad.clone()
    xt.grad = None
    (0.5 * loss).backward()  # the stored gradient was handed out: recomputed
    np.testing.assert_allclose(xt.grad.numpy(), first.numpy() / 6.0, rtol=1e-6, atol=1e-9)
    _, want = _value_and_grad(x.double(), labels, h, gamma=None, reduction="mean", backend="torch")
    np.testing.assert_allclose(first.numpy(), 3.0 * want.numpy(), rtol=1e-5, atol=1e-9)


def test_inputs_are_not_modified_and_no_grad_mode_works():
    h, x, labels = _setup(1)
    x0, l0 = x.clone(), labels.clone()
    xt = x.clone().requires_grad_(True)
    ht.focal_tree_min_loss(xt, labels, h, reduction="hssn", backend="native").backward()
    assert torch.equal(xt.detach(), x0) and torch.equal(labels, l0)
    with torch.no_grad():
        value = ht.tree_min_loss(x, labels, h, backend="native")
    assert value.grad_fn is None
    np.testing.assert_allclose(value.item(), ht.tree_min_loss(x.double(), labels, h, backend="torch").item(),
                               rtol=1e-6)


def test_non_contiguous_and_half_logits():
    h, x, labels = _setup(2, shape=(2, 6, 10))
    base = x.to(memory_format=torch.channels_last)
    for t in (base, x[..., ::2].contiguous(), x.transpose(2, 3).contiguous().transpose(2, 3)):
        lab = labels if t.shape[2:] == labels.shape[1:] else labels[..., ::2]
        value, grad = _value_and_grad(t, lab, h, gamma=2.0, reduction="sum")
        want, want_grad = _value_and_grad(t.double(), lab, h, gamma=2.0, reduction="sum", backend="torch")
        np.testing.assert_allclose(value.numpy(), want.numpy(), rtol=2e-6)
        np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=2e-6, atol=1e-7)
    for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        xh = x.to(dtype)
        value, grad = _value_and_grad(xh, labels, h, gamma=None, reduction="mean")
        assert value.dtype == torch.float32 and grad.dtype == dtype
        want, want_grad = _value_and_grad(xh.double(), labels, h, gamma=None, reduction="mean", backend="torch")
        np.testing.assert_allclose(value.numpy(), want.numpy(), rtol=1e-5)
        np.testing.assert_allclose(grad.double().numpy(), want_grad.numpy(), rtol=tol,
                                   atol=tol * want_grad.abs().max().item())


def test_non_finite_logits_propagate_at_counted_entries():
    h, x, labels = _setup(3, shape=(1, 4, 4))
    labels[...] = 0  # every pixel valid, label leaf 0
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[0, 1, 2, 2] = bad  # a negative entry of a valid pixel
        value = ht.tree_min_loss(xb, labels, h, backend="native")
        assert not torch.isfinite(ht.tree_min_loss(xb, labels, h, backend="torch"))
        if bad != bad:
            assert torch.isnan(value)
        else:  # softplus(+inf) = +inf, the exact limit (the eager op may return nan from inf - inf)
            assert value.item() == float("inf")


# ---------------------------------------------------------------------------- switches and errors
def test_set_isa_rejects_unknown_names_and_reports_the_isa():
    with pytest.raises(ValueError, match="isa must be one of"):
        _native.set_isa("sse9")
    assert _native.isa() in _native.ISAS


def test_huge_page_advice_is_opt_in_and_keeps_the_buffer_usable(monkeypatch):
    big = torch.empty(1 << 22)  # 16 MiB
    monkeypatch.delenv("HIERALOSS_HUGEPAGES", raising=False)
    assert _native.advise_hugepages(big.data_ptr(), big.numel() * 4) is False  # off by default
    monkeypatch.setenv("HIERALOSS_HUGEPAGES", "1")
    small = torch.empty(1000)
    assert _native.advise_hugepages(small.data_ptr(), small.numel() * 4) is False
    advised = _native.advise_hugepages(big.data_ptr(), big.numel() * 4)
    assert advised is (sys.platform == "linux" and "[never]" not in _thp_mode())
    big.fill_(1.5)
    assert big.sum().item() == 1.5 * (1 << 22)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return "[never]"


def test_disabled_kernel_falls_back_and_native_backend_errors():
    code = (
        "import torch, hieraloss, hieraloss.torch as ht\n"
        "from hieraloss import _native\n"
        "assert not _native.available() and 'HIERALOSS_NATIVE=0' in _native.load_error()\n"
        "h = hieraloss.presets.cityscapes(); x = torch.randn(1, 26, 3, 3); y = torch.zeros(1, 3, 3, dtype=torch.long)\n"
        "assert torch.allclose(ht.tree_min_loss(x, y, h), ht.tree_min_loss(x, y, h, backend='torch'))\n"
        "try:\n"
        "    ht.tree_min_loss(x, y, h, backend='native')\n"
        "except RuntimeError as exc:\n"
        "    assert 'compiled CPU kernel' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, HIERALOSS_NATIVE="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_isa_environment_cap_is_validated():
    env = dict(os.environ, HIERALOSS_NATIVE_ISA="avx3")
    out = subprocess.run([sys.executable, "-c", "from hieraloss import _native; _native.available()"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "HIERALOSS_NATIVE_ISA must be one of" in out.stderr
    env = dict(os.environ, HIERALOSS_NATIVE_ISA="generic")
    out = subprocess.run([sys.executable, "-c", "from hieraloss import _native; print(_native.isa())"], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "generic"


# ---------------------------------------------------------------------------- gradient buffer pool
def _big_setup():
    h = hieraloss.presets.cityscapes()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, h.num_nodes, 64, 640, generator=gen)  # 4.3 MB of float32: pooled
    labels = torch.randint(0, h.num_leaves, (1, 64, 640), generator=gen)
    return h, x, labels


def _grad_of(h, x, labels, gamma=None):
    xt = x.clone().requires_grad_(True)
    fn = ht.tree_min_loss if gamma is None else ht.focal_tree_min_loss
    fn(xt, labels, h, backend="native", **({} if gamma is None else {"gamma": gamma})).backward()
    return xt.grad


def test_pool_reuses_only_buffers_no_tensor_uses():
    hieraloss.release_cpu_buffers()
    h, x, labels = _big_setup()
    first = _grad_of(h, x, labels)
    base = first.data_ptr()
    kept = first.clone()
    view = first[0, 3]  # a view keeps the buffer in use too
    del first
    second = _grad_of(h, x, labels, gamma=2.0)  # different values, same shape
    assert not np.shares_memory(second.numpy(), view.numpy())
    assert torch.equal(view, kept[0, 3])  # untouched while in use
    del view, kept
    reused = _grad_of(h, x, labels)  # the first buffer is free again: handed out and overwritten
    assert reused.data_ptr() == base
    np.testing.assert_allclose(reused.numpy(), _grad_of(h, x.double(), labels).numpy(), rtol=1e-5, atol=1e-9)


def test_pool_hands_the_same_memory_back_once_free_and_respects_capacity(monkeypatch):
    hieraloss.release_cpu_buffers()
    h, x, labels = _big_setup()
    ptr = _grad_of(h, x, labels).data_ptr()  # freed at once
    assert _grad_of(h, x, labels).data_ptr() == ptr  # reused: no fresh pages to fault in
    held = [_grad_of(h, x, labels) for _ in range(_native.BufferPool.capacity + 2)]
    assert len({g.data_ptr() for g in held}) == len(held)  # all distinct while alive
    assert len(_native.BUFFERS) == _native.BufferPool.capacity
    ref = _grad_of(h, x.double(), labels)
    for g in held:
        np.testing.assert_allclose(g.numpy(), ref.numpy(), rtol=1e-5, atol=1e-9)
    hieraloss.release_cpu_buffers()
    assert len(_native.BUFFERS) == 0
    monkeypatch.setenv("HIERALOSS_REUSE_BUFFERS", "0")
    _grad_of(h, x, labels)
    assert len(_native.BUFFERS) == 0


def test_pool_keeps_shapes_and_dtypes_apart():
    hieraloss.release_cpu_buffers()
    pool = _native.BufferPool()
    a = pool.take((2, 1 << 20), np.float32)
    assert a is not None and a.shape == (2, 1 << 20) and a.dtype == np.float32
    del a
    b = pool.take((1 << 20, 2), np.float32)  # same bytes, other shape: not the free one
    assert b.shape == (1 << 20, 2)
    del b
    c = pool.take((2, 1 << 20), np.float64)
    assert c.dtype == np.float64 and len(pool) == 2  # capacity 2: the least recently used free one went
    assert pool.take((10,), np.float32) is None  # small: plain allocation by the caller


def test_use_for_decides_and_names_why_native_cannot_run():
    assert _native.use_for("auto", on_cpu=True, device="cpu")
    assert not _native.use_for("auto", on_cpu=False, device="cuda:0")
    assert not _native.use_for("torch", on_cpu=True, device="cpu")
    assert _native.use_for("native", on_cpu=True, device="cpu")
    with pytest.raises(RuntimeError, match=r"backend='native'.*logits on cuda:0, the kernel runs on the CPU"):
        _native.use_for("native", on_cpu=False, device="cuda:0")
