"""hieraloss.torch: values and gradients against loop references (tests/oracle.py, plain loops below)
and hieraloss.numpy, float64 gradcheck, half precision, validation, modules, torch.compile, dispatch."""

from __future__ import annotations

import math
import os
import types

import numpy as np
import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hieraloss
import hieraloss.numpy as hnp
import hieraloss.torch as ht
from hieraloss import LabelError, _native
from hieraloss.testing import assert_consistent, hierarchies, label_maps, logits
from hieraloss.torch.ops import route
from hieraloss.torch.ops.labels import label_channels

REDUCTIONS = ("mean", "sum", "none", "hssn")
# The CPU loss runs on the compiled kernel (auto/native) or the vectorized torch ops (torch): test both.
LOSS_BACKENDS = pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not _native.available(), reason="native kernel not built")),
])
SHAPES = st.sampled_from([(2, 3), (1, 2, 3), (2, 2, 1, 2)])  # [B, N], [B, N, H, W], [B, N, D, H, W] labels


@st.composite
def cases(draw, ties=False, partial=None, max_depth=3):
    h = draw(hierarchies(max_depth=max_depth, max_children=3, order=None))
    shape = draw(SHAPES)
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=partial))
    x = draw(logits(h, shape, ties=ties))
    return h, x, labels


def _t(a):
    return torch.from_numpy(np.array(a))


def _loss(fn, h, x, labels, **kw):
    return getattr(ht, fn)(_t(x), _t(labels), h, **kw)


# ---------------------------------------------------------------------------- values and gradients
@LOSS_BACKENDS
@given(data=st.data())
def test_values_and_grads_match_loop_reference_with_ties(backend, data):
    h, x, labels = data.draw(cases(ties=True, partial=None))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([None, 0.0, 2.0, 0.5]))
    weight = data.draw(st.sampled_from([None, "random"]))
    w = None if weight is None else np.random.default_rng(0).uniform(0.5, 2.0, h.num_nodes)
    upstream = None
    if reduction == "none":
        upstream = np.random.default_rng(1).normal(size=(x.shape[0], h.num_nodes, *x.shape[2:]))
    fn = "tree_min_loss" if gamma is None else "focal_tree_min_loss"
    kw = {} if gamma is None else {"gamma": gamma}
    xt = _t(x).requires_grad_(True)
    value = getattr(ht, fn)(xt, _t(labels), h, reduction=reduction,
                            node_weight=None if w is None else torch.from_numpy(w), backend=backend, **kw)
    up = torch.ones_like(value) if upstream is None else _t(upstream)
    (grad,) = torch.autograd.grad((value * up).sum(), xt)
    want = oracle.tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction, node_weight=w)
    want_grad = oracle.tree_min_grad(x, labels, h, gamma=gamma, reduction=reduction, node_weight=w,
                                     upstream=upstream)
    np.testing.assert_allclose(value.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    # and the numpy reference backend
    ref = getattr(hnp, fn)(x, labels, h, reduction=reduction, node_weight=w, **kw)
    np.testing.assert_allclose(value.detach().numpy(), ref, rtol=1e-10, atol=1e-12)


@settings(max_examples=40)
@given(data=st.data())
def test_depth_at_a_time_sweeps_give_the_node_at_a_time_bits(data):
    """The torch op sweeps the tree one node at a time or one depth at a time (chosen by tree shape, or
    by ``HIERALOSS_TORCH_SWEEP``): the same value and gradient bits either way, ties routed to the
    same child, NaN carried alike, and the loop reference's numbers."""
    from hieraloss.torch.ops.device import SWEEP_ENV

    h, x, labels = data.draw(cases(ties=True, partial=None, max_depth=4))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([0.0, 2.0]))
    if data.draw(st.booleans()):
        x = x.copy()
        x.reshape(-1)[data.draw(st.integers(0, x.size - 1))] = np.nan
    upstream = _t(np.random.default_rng(3).normal(size=(x.shape[0], h.num_nodes, *x.shape[2:])))
    got = []
    try:
        for sweep in ("node", "depth"):
            os.environ[SWEEP_ENV] = sweep
            xt = _t(x).requires_grad_(True)
            value = ht.focal_tree_min_loss(xt, _t(labels), h, gamma=gamma, reduction=reduction, backend="torch")
            (grad,) = torch.autograd.grad((value * upstream).sum() if reduction == "none" else value, xt)
            got.append((value.detach(), grad))
    finally:
        del os.environ[SWEEP_ENV]
    (v0, g0), (v1, g1) = got
    torch.testing.assert_close(v1, v0, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0, equal_nan=True)
    if not np.isnan(x).any():
        want = oracle.tree_min_grad(x, labels, h, gamma=gamma, reduction=reduction,
                                    upstream=upstream.numpy() if reduction == "none" else None)
        np.testing.assert_allclose(g1.numpy(), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(v1.numpy(), oracle.tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction),
                                   rtol=1e-10, atol=1e-12)


def test_the_sweep_follows_the_tree_shape():
    """Node at a time for the presets and for trees whose children are slices of leaves; depth at a
    time for deep trees whose children must be gathered one by one."""
    from hieraloss import Hierarchy
    from hieraloss.torch.ops.device import SWEEP_ENV, device_plan, sweep_by_depth

    cpu = torch.device("cpu")
    for h in (hieraloss.presets.cityscapes(), hieraloss.presets.mapillary_vistas_v2(),
              Hierarchy.from_parents(oracle.taxonomy_parents(30))):
        assert not device_plan(h, cpu).by_level
    # 100 leaves in 10 groups under 2 roots: slices of leaves in the default layout, gathered when shuffled
    wide = Hierarchy.from_parents([100 + i // 10 for i in range(100)] + [110 + i // 5 for i in range(10)] + [-1, -1])
    assert not device_plan(wide, cpu).by_level
    order = [int(v) for v in np.random.default_rng(0).permutation(wide.num_nodes)]
    shuffled = device_plan(Hierarchy.from_parents(wide._parent_ids.tolist(), order=order), cpu)
    assert shuffled.by_level
    # the switch overrides the shape's choice, and a wrong value names the choices
    for sweep, want in (("auto", True), ("node", False), ("depth", True)):
        os.environ[SWEEP_ENV] = sweep
        try:
            assert sweep_by_depth(shuffled) is want
        finally:
            del os.environ[SWEEP_ENV]
    os.environ[SWEEP_ENV] = "levels"
    try:
        with pytest.raises(ValueError, match="HIERALOSS_TORCH_SWEEP must be one of"):
            sweep_by_depth(shuffled)
    finally:
        del os.environ[SWEEP_ENV]


@LOSS_BACKENDS
@settings(max_examples=10)
@given(data=st.data())
def test_gradcheck_float64(backend, data):
    h, x, labels = data.draw(cases(ties=False, partial=None, max_depth=3))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([0.0, 2.0]))
    lab = _t(labels)
    up = torch.from_numpy(np.random.default_rng(2).normal(size=(x.shape[0], h.num_nodes, *x.shape[2:])))

    def f(t):
        v = ht.focal_tree_min_loss(t, lab, h, gamma=gamma, reduction=reduction, backend=backend)
        return (v * up).sum() if reduction == "none" else v

    assert torch.autograd.gradcheck(f, (_t(x).requires_grad_(True),))


@LOSS_BACKENDS
@settings(max_examples=15)
@given(data=st.data(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_low_precision_within_tolerance(backend, data, dtype):
    h, x, labels = data.draw(cases(partial=None))
    reduction = data.draw(st.sampled_from(("mean", "hssn", "sum")))
    xt = _t(x).to(dtype).requires_grad_(True)
    value = ht.tree_min_loss(xt, _t(labels), h, reduction=reduction, backend=backend)
    value.backward()
    assert value.dtype == torch.float32  # accumulated and returned in float32
    assert xt.grad.dtype == dtype
    rounded = xt.detach().double().numpy()  # the same inputs, exactly, in float64
    want = oracle.tree_min_loss(rounded, labels, h, reduction=reduction)
    want_grad = oracle.tree_min_grad(rounded, labels, h, reduction=reduction)
    np.testing.assert_allclose(value.item(), want, rtol=1e-5, atol=1e-6)
    grad_tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    np.testing.assert_allclose(xt.grad.double().numpy(), want_grad, rtol=grad_tol,
                               atol=grad_tol * max(np.abs(want_grad).max(), 1e-3))


def test_spatial_ranks_and_label_dtypes_agree():
    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(3)
    x = rng.normal(0, 3, (2, 26, 2, 3, 4))
    labels = rng.integers(0, 19, (2, 2, 3, 4))
    labels[0, 0, 0] = 255
    labels[1, 1, 1, :2] = 21  # partial labels
    base = ht.tree_min_loss(_t(x), _t(labels), h)
    flat = ht.tree_min_loss(_t(x).reshape(2, 26, -1), _t(labels).reshape(2, -1), h)
    plane = ht.tree_min_loss(_t(x).reshape(2, 26, 6, 4), _t(labels).reshape(2, 6, 4), h)
    assert torch.allclose(base, flat, rtol=1e-12) and torch.allclose(base, plane, rtol=1e-12)
    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(ht.tree_min_loss(_t(x), _t(labels).to(dt), h), base)
    pointwise = ht.tree_min_loss(_t(x[:, :, 0, 0, 0]), _t(labels[:, 0, 0, 0]), h, reduction="none")
    assert pointwise.shape == (2, 26)


def test_focal_gamma_zero_is_tree_min_exactly():
    h = hieraloss.presets.lip()
    rng = np.random.default_rng(4)
    x = _t(rng.normal(0, 3, (2, 25, 4, 4))).float()
    labels = _t(rng.integers(0, 25, (2, 4, 4)))
    for reduction in REDUCTIONS:
        assert torch.equal(ht.tree_min_loss(x, labels, h, reduction=reduction),
                           ht.focal_tree_min_loss(x, labels, h, gamma=0.0, reduction=reduction))


def test_zero_valid_entries_give_connected_exact_zero():
    h = hieraloss.presets.cityscapes()
    x = torch.randn(1, 26, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 255)
    for reduction in ("mean", "sum", "hssn"):
        value = ht.tree_min_loss(x, labels, h, reduction=reduction)
        assert value.item() == 0.0 and value.requires_grad
        (g,) = torch.autograd.grad(value, x)
        assert torch.equal(g, torch.zeros_like(x))


def test_inputs_are_never_modified():
    h = hieraloss.presets.mapillary_vistas_v2()
    rng = np.random.default_rng(5)
    x = _t(rng.normal(0, 3, (2, h.num_nodes, 3, 3))).float().requires_grad_(True)
    labels = _t(rng.integers(0, h.num_nodes, (2, 3, 3)))
    labels[0, 0, 0] = 255
    w = torch.rand(h.num_nodes)
    emb = torch.randn(2, 4, 3, 3, requires_grad=True)
    copies = [t.detach().clone() for t in (x, labels, w, emb)]
    for fn in (ht.tree_min_loss, ht.focal_tree_min_loss):
        fn(x, labels, h, node_weight=w).backward()
        fn(x, labels, h, reduction="none").sum().backward()
    ht.hssn_loss(x, labels, h, embeddings=emb, step=3, total_steps=10).backward()
    ht.decode(x, h)
    ht.expand_targets(labels, h)
    for original, now in zip(copies, (x, labels, w, emb), strict=True):
        assert torch.equal(original, now.detach())


def test_read_only_arrays_are_copied_without_a_warning():
    """Labels and node weights given as read-only arrays (a memory-mapped file, a hierarchy's
    tables) give the same values as writable ones and no warning: torch warns about a tensor over a
    read-only array, and only once per process, so the calls run in a fresh one."""
    code = """
import numpy as np, torch
import hieraloss, hieraloss.torch as ht
h = hieraloss.presets.cityscapes()
x = torch.randn(1, h.num_nodes, 3, 4, generator=torch.Generator().manual_seed(0))
labels = np.random.default_rng(0).integers(0, h.num_leaves, (1, 3, 4))
w = np.linspace(0.5, 1.5, h.num_nodes)
frozen_labels, frozen_w = labels.copy(), w.copy()
frozen_labels.setflags(write=False)
frozen_w.setflags(write=False)
for fn in (ht.tree_min_loss, ht.focal_tree_min_loss):
    assert torch.equal(fn(x, frozen_labels, h, node_weight=frozen_w), fn(x, labels, h, node_weight=w))
assert torch.equal(ht.expand_targets(frozen_labels, h)[0], ht.expand_targets(labels, h)[0])
# the module keeps a float32 copy of the weights, so its reference is the module over writable ones
assert torch.equal(ht.TreeMinLoss(h, node_weight=frozen_w)(x, torch.from_numpy(labels)),
                   ht.TreeMinLoss(h, node_weight=w)(x, torch.from_numpy(labels)))
print("ok")
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_non_finite_logits_propagate_or_raise():
    h = hieraloss.presets.cityscapes()
    x = torch.randn(1, 26, 2, 2)
    x[0, 3, 1, 1] = float("nan")
    x[0, 20, 0, 0] = float("inf")
    labels = torch.zeros(1, 2, 2, dtype=torch.int64)
    assert not torch.isfinite(ht.tree_min_loss(x, labels, h))  # default: no check, no sync
    with pytest.raises(ValueError, match="2 non-finite"):
        ht.tree_min_loss(x, labels, h, check_finite=True)


# ---------------------------------------------------------------------------- validation
def test_clear_errors():
    h = hieraloss.presets.cityscapes()
    x = torch.randn(2, 26, 3, 3)
    labels = torch.zeros(2, 3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="25 channels"):
        ht.tree_min_loss(x[:, :25], labels, h)
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        ht.tree_min_loss(x, labels[:, :2], h)
    bad = labels.clone()
    bad[0, 0, 0], bad[1, 1, 1], bad[1, 2, 2] = 30, -4, 254
    with pytest.raises(LabelError, match="-4, 30, 254"):
        ht.tree_min_loss(x, bad, h)
    with pytest.raises(LabelError, match="integers"):
        ht.tree_min_loss(x, labels.float(), h)
    with pytest.raises(LabelError, match="collides"):
        ht.tree_min_loss(x, labels, h, ignore_index=3)
    with pytest.raises(ValueError, match="reduction"):
        ht.tree_min_loss(x, labels, h, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ht.tree_min_loss(x, labels, h, backend="cuda")
    with pytest.raises(ValueError, match="node_weight"):
        ht.tree_min_loss(x, labels, h, node_weight=torch.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        ht.focal_tree_min_loss(x, labels, h, gamma=-1)
    with pytest.raises(TypeError, match="float16"):
        ht.tree_min_loss(x.long(), labels, h)
    with pytest.raises(ValueError, match="method"):
        ht.decode(x, h, "greedy")


# ---------------------------------------------------------------------------- published parity
def _published_cityscapes(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Clean-room restatement of the published Cityscapes formula: probabilities, per-class loops with
    cat + min/max, log(p + eps), per-level means, times 5 (the caller's labels are not touched)."""
    groups = [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9], [10], [11, 12], [13, 14, 15, 16, 17, 18]]
    p = torch.sigmoid(logits)
    valid = labels != 255
    lab = torch.where(valid, labels, torch.zeros_like(labels))
    leaf_y = torch.nn.functional.one_hot(lab, 19).movedim(-1, 1).to(p)
    cat_of = torch.tensor([j for j, g in enumerate(groups) for _ in g])
    cat_y = torch.nn.functional.one_hot(cat_of[lab], 7).movedim(-1, 1).to(p)
    cat_neg = torch.cat([torch.max(torch.cat([p[:, k:k + 1] for k in g] + [p[:, 19 + j:20 + j]], 1), 1, True)[0]
                         for j, g in enumerate(groups)], 1)
    leaf_pos = p[:, :19].clone()
    for j, g in enumerate(groups):
        for k in g:
            leaf_pos[:, k:k + 1] = torch.min(torch.cat([p[:, k:k + 1], p[:, 19 + j:20 + j]], 1), 1, True)[0]
    m = valid.unsqueeze(1).to(p)
    num = valid.sum()
    leaf = ((-leaf_y * torch.log(leaf_pos + eps) - (1 - leaf_y) * torch.log(1 - p[:, :19] + eps)) * m).sum()
    cat = ((-cat_y * torch.log(p[:, 19:] + eps) - (1 - cat_y) * torch.log(1 - cat_neg + eps)) * m).sum()
    return 5 * (leaf / num / 19 + cat / num / 7)


def test_hssn_reduction_matches_published_cityscapes_formula():
    h = hieraloss.presets.cityscapes()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 26, 8, 9, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 19, (2, 8, 9), generator=gen)
    labels[:, :2] = 255
    ours = ht.tree_min_loss(x, labels, h, reduction="hssn")
    theirs = _published_cityscapes(x, labels)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    ours32 = ht.tree_min_loss(x.float(), labels, h, reduction="hssn")
    assert abs(ours32.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    # and the independent numpy restatement in tests/oracle.py
    assert math.isclose(ours.item(), oracle.published_cityscapes_hssn(x.numpy(), labels.numpy()), rel_tol=1e-5)


# ---------------------------------------------------------------------------- decoding and targets
@given(data=st.data(), method=st.sampled_from([m for m in ht.DECODE_METHODS if m != "logic"]))
def test_decode_matches_numpy_and_oracle(data, method):
    h, x, _ = data.draw(cases(ties=True))
    leaf, depth = ht.decode(_t(x), h, method)
    want_leaf, want_depth = hnp.decode(x, h, method)
    np.testing.assert_array_equal(leaf.numpy(), want_leaf)
    np.testing.assert_array_equal(depth.numpy(), want_depth)
    o_leaf, o_depth = oracle.decode(x, h, method)
    np.testing.assert_array_equal(leaf.numpy(), o_leaf)
    if method != "independent":
        assert_consistent(depth, h)


@given(data=st.data())
def test_expand_targets_matches_hierarchy(data):
    h, _, labels = data.draw(cases(partial=None))
    targets, mask = ht.expand_targets(_t(labels), h)
    want_t, want_m = h.expand_targets(labels)
    assert targets.dtype == torch.uint8 and mask.dtype == torch.bool
    np.testing.assert_array_equal(targets.numpy(), want_t)
    np.testing.assert_array_equal(mask.numpy(), want_m)


# ---------------------------------------------------------------------------- triplet loss
@st.composite
def triplet_cases(draw):
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    B, H, W = draw(st.sampled_from([(1, 4, 4), (2, 3, 5)]))
    labels = draw(label_maps(h, (B, H, W), ignore_fraction=0.2, partial_fraction=0.1))
    hw = draw(st.sampled_from([(H, W), (2, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    emb = rng.normal(size=(B, 3, *hw))
    return h, emb, labels


@given(data=st.data(), max_per_class=st.sampled_from([1, 2, 200]))
def test_triplet_first_matches_loop_reference(data, max_per_class):
    h, emb, labels = data.draw(triplet_cases())
    got = ht.hierarchy_triplet_loss(_t(emb), _t(labels), h, sampling="first", max_per_class=max_per_class)
    want = oracle.triplet_loss_first(emb, labels, h, max_per_class=max_per_class)
    assert math.isclose(got.item(), want, rel_tol=1e-10, abs_tol=1e-12)


@given(data=st.data())
def test_triplet_random_is_reproducible_and_a_valid_sample(data):
    h, emb, labels = data.draw(triplet_cases())
    run = lambda seed, **kw: ht.hierarchy_triplet_loss(  # noqa: E731
        _t(emb), _t(labels), h, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1), run(1))
    # With room for every triplet, the random draw only re-pairs the same pixels: a valid sample is
    # one whose loss equals the loop loss of some set of triplets; check it via max_per_class=1 bounds.
    small = oracle.resize_nearest(labels, emb.shape[2:])
    trips = oracle.first_triplets(small, h, max_per_class=10**6)
    if not trips:
        assert run(2).item() == 0.0
        return
    # Every class uses T = min(sizes) triplets either way; per-class losses lie within the extremes
    # over all (a, p, n) combinations of that class, so the total does as well.
    lo = hi = 0.0
    for c, _ in trips:
        t = oracle.tree(h)
        flat = small.reshape(-1)
        pc = t.parent[int(h.channel_of[c])]
        leaf_px = [i for i, v in enumerate(flat) if v < h.num_leaves]
        A = [i for i in leaf_px if flat[i] == c]
        P = [i for i in leaf_px if flat[i] != c and t.parent[int(h.channel_of[flat[i]])] == pc]
        N = [i for i in leaf_px if t.parent[int(h.channel_of[flat[i]])] != pc]
        vals = [oracle.triplet_loss_from(emb, small, h, [(c, [(a, p, n)])]) for a in A for p in P for n in N]
        lo += min(vals)
        hi += max(vals)
    got = run(3).item()
    assert lo / len(trips) - 1e-12 <= got <= hi / len(trips) + 1e-12


def test_triplet_without_triplets_is_connected_zero():
    h = hieraloss.presets.cityscapes()
    emb = torch.randn(1, 4, 2, 2, requires_grad=True)
    value = ht.hierarchy_triplet_loss(emb, torch.zeros(1, 2, 2, dtype=torch.int64), h)
    assert value.item() == 0.0 and value.requires_grad
    (g,) = torch.autograd.grad(value, emb)
    assert torch.equal(g, torch.zeros_like(emb))


def test_triplet_weight_schedule():
    assert ht.triplet_weight(0, 100) == pytest.approx(0.0, abs=1e-15)
    assert ht.triplet_weight(50, 100) == pytest.approx(0.25)
    assert ht.triplet_weight(100, 100) == 0.5 and ht.triplet_weight(500, 100) == 0.5
    with pytest.raises(ValueError):
        ht.triplet_weight(1, 0)


# ---------------------------------------------------------------------------- hssn_loss and modules
def _depth_ce_loop(x: np.ndarray, labels: np.ndarray, h, depth: int) -> float:
    classes = list(h.depth_channels[depth - 1])
    total, count = 0.0, 0
    at = h.labels_at_depth(labels, depth)
    for idx in np.ndindex(labels.shape):
        if at[idx] == 255:
            continue
        b, rest = idx[0], idx[1:]
        scores = [x[(b, c, *rest)] for c in classes]
        m = max(scores)
        lse = m + math.log(sum(math.exp(s - m) for s in scores))
        total += lse - x[(b, int(h.channel_of[at[idx]]), *rest)]
        count += 1
    return total / count if count else 0.0


@settings(max_examples=10)
@given(data=st.data())
def test_hssn_loss_is_the_published_combination(data):
    h, x, labels = data.draw(cases(partial=None))
    xt = _t(x)
    emb = torch.randn(x.shape[0], 3, 2, 2, dtype=torch.float64) if x.ndim == 4 else None
    kw = dict(step=3, total_steps=10) if emb is not None else {}
    total, parts = ht.hssn_loss(xt, _t(labels), h, embeddings=emb, return_parts=True, sampling="first", **kw)
    tm = oracle.tree_min_loss(x, labels, h, reduction="hssn")
    want = tm  # 5.0 * (hssn / 5)
    for d in range(1, h.max_depth + 1):
        ce = _depth_ce_loop(x, labels, h, d)
        assert math.isclose(parts[f"ce_depth{d}"].item(), ce, rel_tol=1e-9, abs_tol=1e-12)
        want += ce
    if emb is not None:
        tt = ht.hierarchy_triplet_loss(emb, _t(labels), h, sampling="first")
        want += ht.triplet_weight(3, 10) * tt.item()
    assert math.isclose(total.item(), want, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(parts["tree_min"].item(), tm / 5, rel_tol=1e-9, abs_tol=1e-12)


def test_modules_equal_functional_and_state_dict_round_trips():
    h = hieraloss.presets.pascal_person_part()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 12, 4, 4, generator=gen)
    labels = torch.randint(0, 12, (2, 4, 4), generator=gen)
    w = torch.rand(12, generator=gen)
    assert torch.equal(ht.TreeMinLoss(h, node_weight=w)(x, labels), ht.tree_min_loss(x, labels, h, node_weight=w))
    assert torch.equal(ht.FocalTreeMinLoss(h, gamma=1.5, reduction="hssn")(x, labels),
                       ht.focal_tree_min_loss(x, labels, h, gamma=1.5, reduction="hssn"))
    for method in ht.DECODE_METHODS:
        got, want = ht.HierarchyDecoder(h, method)(x), ht.decode(x, h, method)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    emb = torch.randn(2, 3, 2, 2, generator=gen)
    trip = ht.HierarchyTripletLoss(h, sampling="first")(emb, labels)
    assert torch.equal(trip, ht.hierarchy_triplet_loss(emb, labels, h, sampling="first"))

    loss = ht.HSSNLoss(h, total_steps=10, sampling="first", node_weight=w)
    assert loss.node_weight.dtype == torch.float32
    for step in range(3):
        got = loss(x, labels, emb)
        want = ht.hssn_loss(x, labels, h, embeddings=emb, step=step, total_steps=10, sampling="first", node_weight=w)
        assert torch.equal(got, want)
    assert int(loss.step) == 3
    other = ht.HSSNLoss(h, total_steps=10, sampling="first", node_weight=torch.zeros(12))
    other.load_state_dict(loss.state_dict())
    assert int(other.step) == 3 and torch.equal(other.node_weight, loss.node_weight)
    loss.eval()
    loss(x, labels, emb)
    assert int(loss.step) == 3  # evaluation does not advance the schedule
    moved = ht.TreeMinLoss(h, node_weight=w).to(torch.float64)
    assert moved.node_weight.dtype == torch.float64
    assert torch.allclose(moved(x.double(), labels), ht.tree_min_loss(x.double(), labels, h, node_weight=w))


@LOSS_BACKENDS
def test_torch_compile_module_on_cpu(backend):
    """The torch ops trace; the compiled kernel runs outside the graph (torch.compiler.disable)."""
    h = hieraloss.presets.cityscapes()
    module = ht.TreeMinLoss(h, reduction="hssn", backend=backend)
    compiled = torch.compile(module, backend="aot_eager")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 26, 4, 4, generator=gen, requires_grad=True)
    labels = torch.randint(0, 19, (2, 4, 4), generator=gen)
    value = compiled(x, labels)
    (g,) = torch.autograd.grad(value, x)
    (g_eager,) = torch.autograd.grad(module(x, labels), x)
    assert torch.allclose(value, module(x, labels)) and torch.allclose(g, g_eager)


# ---------------------------------------------------------------------------- dispatch
def test_backend_dispatch(monkeypatch):
    calls = []

    def fused_objective(x, labels, h, **kw):
        calls.append(("objective", labels.clone(), kw))
        return x.sum() * 0, torch.zeros(1 + h.max_depth)

    fake = types.SimpleNamespace(
        triton_available=lambda: True,
        fused_objective=fused_objective,
        fused_decode=lambda x, h, method: calls.append(("decode", method)) or ("leaf", "depth"),
        unsupported_reason=lambda shape, hierarchy, op="objective": None,
    )
    monkeypatch.setattr(route, "kernels", lambda: fake)
    import sys
    monkeypatch.setitem(sys.modules, "hieraloss.torch.kernels", fake)
    h = hieraloss.presets.cityscapes()
    x = torch.randn(1, 26, 2, 2)
    labels = torch.tensor([[[0, 255], [20, 3]]])
    ht.tree_min_loss(x, labels, h)  # auto on CPU: the compiled kernel or the torch op, never Triton
    ht.hssn_loss(x, labels, h)
    assert calls == []
    assert route.use_native("auto", x) == _native.available()
    assert not route.use_native("torch", x)
    assert route.use_triton("auto", types.SimpleNamespace(is_cuda=True, shape=x.shape), h)
    assert not route.use_triton("torch", types.SimpleNamespace(is_cuda=True, shape=x.shape), h)
    ht.focal_tree_min_loss(x, labels, h, backend="triton", gamma=2.0, reduction="sum")
    kind, lab, kw = calls.pop()
    # raw labels and ignore_index go to the kernel, which maps them itself
    assert kind == "objective" and torch.equal(lab, labels)
    assert kw == {"ignore_index": 255, "gamma": 2.0, "reduction": "sum", "node_weight": None}
    ht.tree_min_loss(x, labels, h, backend="triton")
    assert calls.pop()[2]["gamma"] == 0.0
    ht.hssn_loss(x, labels, h, backend="triton", ce_weights=[1.0, 0.0], tree_min_weight=2.5)
    kw = calls.pop()[2]
    assert kw["reduction"] == "hssn" and kw["tm_weight"] == 0.5 and list(kw["ce_weights"]) == [1.0, 0.0]
    assert ht.decode(x, h, "top_down", backend="triton") == ("leaf", "depth")
    assert ht.decode(x, h, "hssn", backend="triton")[0].shape == (1, 2, 2)  # no kernel for hssn: torch op


@settings(max_examples=8)
@given(data=st.data())
def test_tiled_pixels_match_untiled(data):
    """The op walks pixels in tiles; force many small tiles and compare with one tile per image."""
    from hieraloss.torch.ops import tree_min as _ops

    h = data.draw(hierarchies(max_depth=3, max_children=3, order=None))
    labels = data.draw(label_maps(h, (2, 5, 7), ignore_fraction=None, partial_fraction=None))
    x = data.draw(logits(h, (2, 5, 7), ties=True))
    reduction = data.draw(st.sampled_from(REDUCTIONS))
    gamma = data.draw(st.sampled_from([0.0, 2.0]))
    up = torch.from_numpy(np.random.default_rng(9).normal(size=x.shape))

    def run(tile):
        old = _ops.TILE_ELEMENTS
        _ops.TILE_ELEMENTS = tile
        try:
            xt = _t(x).requires_grad_(True)
            v = ht.focal_tree_min_loss(xt, _t(labels), h, gamma=gamma, reduction=reduction, backend="torch")
            (g,) = torch.autograd.grad((v * up).sum() if reduction == "none" else v, xt)
            return v.detach(), g
        finally:
            _ops.TILE_ELEMENTS = old

    v_small, g_small = run(3 * h.num_nodes)  # 3 pixels per tile, a ragged last tile
    v_big, g_big = run(1 << 30)
    torch.testing.assert_close(v_small, v_big, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_small, g_big, rtol=1e-12, atol=1e-12)
    want = hnp.focal_tree_min_loss(x, labels, h, gamma=gamma, reduction=reduction)
    np.testing.assert_allclose(v_small.numpy(), want, rtol=1e-10, atol=1e-12)


@settings(max_examples=30)
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
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    t = torch.from_numpy(labels).to(dtype)
    try:
        want = h.label_channels(labels, ignore_index=ignore_index)
    except LabelError:
        with pytest.raises(LabelError, match="neither node ids"):
            label_channels(t, h, ignore_index)
        return
    got, partial = label_channels(t, h, ignore_index)
    assert got.tolist() == want.tolist()
    assert partial == bool(((labels >= h.num_leaves) & (labels < h.num_nodes)).any())
    assert torch.equal(t, torch.from_numpy(labels).to(dtype))  # not modified
    for v in range(h.num_nodes):  # every single node id: its channel, partial iff internal
        got, partial = label_channels(torch.tensor([[v, ignore_index]], dtype=dtype), h, ignore_index)
        assert got.tolist() == [[int(h.channel_of[v]), -1]] and partial == (v >= h.num_leaves)
