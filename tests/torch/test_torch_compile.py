"""torch.compile on the losses, decoders and modules (docs/compile.md says what is left): the
caches are built outside the trace (``_tables.cached_on``), so cold and warm caches compile alike,
fullgraph included, and a compiled label check is an assertion in the graph, not a host read."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import hieraloss  # noqa: E402
import hieraloss.core.plan as core_plan  # noqa: E402
import hieraloss.torch._tables as device_tables  # noqa: E402
from hieraloss.torch import (  # noqa: E402
    decode,
    depth_cross_entropy,
    hierarchical_cross_entropy,
    hssn_loss,
    logic_refine,
    logicseg_loss,
    soft_label_cross_entropy,
    tree_min_loss,
)

H = hieraloss.presets.cityscapes()
# Leaves at depths 1, 2 and 3: ragged paths and a leaf right under the root, in a small graph.
DEEP = hieraloss.Hierarchy.from_names(["a--a1", "a--a2", "b--b1--b11", "b--b1--b12", "b--b2", "c"])


def _inputs(h=H):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, h.num_nodes, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, h.num_nodes, (2, 5, 6), generator=g)  # partial labels included
    y[:, 0] = 255
    return x, y


CASES = {
    "tree_min": lambda x, y: tree_min_loss(x, y, H, backend="torch"),
    "tree_min_hssn_reduction": lambda x, y: tree_min_loss(x, y, H, backend="torch", reduction="hssn"),
    "depth_cross_entropy": lambda x, y: depth_cross_entropy(x, y, H, 2),
    "hssn_loss": lambda x, y: hssn_loss(x, y, H, backend="torch"),
    "hssn_loss_triplet_first": lambda x, y: hssn_loss(x, y, H, backend="torch", embeddings=x[:, :4],
                                                      triplet_weight=1.0, sampling="first"),
    "hierarchical_cross_entropy": lambda x, y: hierarchical_cross_entropy(x[:, :H.num_leaves], y, H, alpha=0.3),
    "soft_label_cross_entropy": lambda x, y: soft_label_cross_entropy(x[:, :H.num_leaves], y, H),
    "decode_path": lambda x, y: decode(x, H)[1].sum().to(x.dtype) + 0 * x.sum(),
    "logicseg_loss": lambda x, y: logicseg_loss(x, y, H, step=30000),
    "logicseg_loss_release_form": lambda x, y: logicseg_loss(x, y, H, rule_logits=x[..., ::2, ::2], exclusion="level",
                                                             easy_filter=True, ramp=None),
}


@pytest.mark.parametrize("name", ["tree_min", "hierarchical_cross_entropy"])
def test_unbalanced_tree_compiles_fullgraph_cold(name):
    torch._dynamo.reset()
    x, y = _inputs(DEEP)
    fn = {"tree_min": lambda a, b: tree_min_loss(a, b, DEEP, backend="torch", reduction="hssn"),
          "hierarchical_cross_entropy": lambda a, b: hierarchical_cross_entropy(a[:, :DEEP.num_leaves], b, DEEP)}[name]
    eager = fn(x, y)
    device_tables._CACHE.clear()
    core_plan._PLANS.clear()
    value = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    assert torch.allclose(value, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_ops_compile_fullgraph_with_cold_or_warm_caches(name, cold):
    torch._dynamo.reset()
    x, y = _inputs()
    fn = CASES[name]
    eager = fn(x, y)
    (g_eager,) = torch.autograd.grad(eager, x)
    if cold:
        device_tables._CACHE.clear()
        core_plan._PLANS.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    value = compiled(x, y)
    (g_compiled,) = torch.autograd.grad(value, x)
    assert torch.allclose(value, eager, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_compiled, g_eager, rtol=1e-10, atol=1e-12)


def test_random_triplet_sampling_compiles_fullgraph():
    torch._dynamo.reset()
    x, y = _inputs()
    emb = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    fn = torch.compile(lambda e, lab: hssn_loss(x.detach(), lab, H, backend="torch", embeddings=e, triplet_weight=1.0),
                       fullgraph=True, backend="aot_eager")
    value = fn(emb, y)
    (grad,) = torch.autograd.grad(value, emb)
    assert torch.isfinite(value) and grad.abs().sum() > 0


def test_compiled_label_check_asserts_in_the_graph():
    torch._dynamo.reset()
    x, y = _inputs()
    compiled = torch.compile(CASES["tree_min"], backend="aot_eager")
    compiled(x, y)
    bad = y.clone()
    bad[0, 1, 1] = 1000  # neither a node id nor ignore_index
    with pytest.raises(RuntimeError, match=f"neither node ids 0..{H.num_nodes - 1} nor ignore_index=255"):
        compiled(x, bad)


# ------------------------------------------------------------------ the compiled CPU kernel as custom ops
native = pytest.importorskip("hieraloss._native")


def _needs_native():
    if not native.available():
        pytest.skip(f"the compiled CPU kernel is not built here: {native.load_error()}")


@pytest.mark.parametrize("reduction", ["mean", "hssn", "none"])
def test_native_tree_min_compiles_fullgraph(reduction):
    _needs_native()
    torch._dynamo.reset()
    x, y = _inputs()

    def fn(a, b):
        out = tree_min_loss(a, b, H, backend="native", reduction=reduction)
        return out if reduction != "none" else (out * torch.linspace(0, 1, out.numel(), dtype=out.dtype)
                                                .view_as(out)).sum()

    eager = fn(x, y)
    (g_eager,) = torch.autograd.grad(eager, x)
    device_tables._CACHE.clear()
    core_plan._PLANS.clear()
    value = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    (g_compiled,) = torch.autograd.grad(value, x)
    assert torch.allclose(value, eager, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_compiled, g_eager, rtol=1e-12, atol=1e-12)


def test_native_hssn_objective_compiles_fullgraph():
    _needs_native()
    torch._dynamo.reset()
    x, y = _inputs()

    def fn(a, b):
        total, parts = hssn_loss(a, b, H, backend="native", return_parts=True)
        return total, parts["tree_min"], parts["ce_depth2"]

    eager = fn(x, y)
    (g_eager,) = torch.autograd.grad(eager[0], x)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    (g_compiled,) = torch.autograd.grad(compiled[0], x)
    for got, want in zip(compiled, eager, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_compiled, g_eager, rtol=1e-12, atol=1e-12)


def test_native_custom_ops_pass_opcheck():
    """torch.library's own checks of the registrations: schema, fake (meta) implementation, autograd."""
    _needs_native()
    from hieraloss.torch.ops import native as _native_op

    x, y = _inputs()
    x = x.detach().reshape(2, H.num_nodes, -1).contiguous().requires_grad_()
    lc = torch.clamp(y.reshape(2, -1), max=H.num_nodes - 1)
    lc[lc == 255] = -1
    key = H.fingerprint
    torch.library.opcheck(_native_op.native_tree_min_op, (x, lc, None, key, 0.0, "mean", True))
    torch.library.opcheck(_native_op.native_hssn_objective_op, (x, lc, None, key, 0.0, 5.0, [1.0, 1.0], True))
    from hieraloss.torch.ops import logicseg as _logic_ops

    r = torch.randn(2, H.num_nodes, 3, 3, dtype=torch.float64, requires_grad=True)
    for rules, want_r in ((None, False), (r, True)):
        torch.library.opcheck(_logic_ops.native_logicseg_op, (x, rules, lc, key),
                              dict(p=5.0, exclusion="siblings", easy_filter=False, weight=0.2, with_rules=True,
                                   asl=[4.0, 1.0, 0.05, 1e-8], want_x=True, want_r=want_r))


@pytest.mark.parametrize("name", ["default", "release_form", "asymmetric_bce", "parts"])
def test_native_logicseg_compiles_fullgraph_on_the_kernel(name, monkeypatch):
    """LogicSeg on the compiled CPU kernel as the custom op ``hieraloss::native_logicseg``: one
    kernel call per compiled step, eager's values and gradients (rule logits included)."""
    _needs_native()
    from hieraloss.torch import asymmetric_bce_loss
    from hieraloss.torch.ops import logicseg as _logic_ops

    torch._dynamo.reset()
    x, y = _inputs()
    r = torch.randn(2, H.num_nodes, 3, 3, dtype=torch.float64, requires_grad=True)
    fn = {
        "default": lambda a, b: logicseg_loss(a, b, H, step=30000, backend="native"),
        "release_form": lambda a, b: logicseg_loss(a, b, H, rule_logits=r, exclusion="level", easy_filter=True,
                                                   ramp=None, backend="native"),
        "asymmetric_bce": lambda a, b: asymmetric_bce_loss(a, b, H, backend="native"),
        "parts": lambda a, b: logicseg_loss(a, b, H, backend="native", return_parts=True)[1]["exclusion"] + 0 * a.sum(),
    }[name]
    eager = fn(x, y)
    g_eager = torch.autograd.grad(eager, (x, r), allow_unused=True)
    calls = []
    kernel = _logic_ops._kernel_pass
    monkeypatch.setattr(_logic_ops, "_kernel_pass", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    device_tables._CACHE.clear()
    core_plan._PLANS.clear()
    value = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    g_value = torch.autograd.grad(value, (x, r), allow_unused=True)
    assert calls == [1]
    assert torch.allclose(value, eager, rtol=1e-12, atol=1e-12)
    for got, want in zip(g_value, g_eager, strict=True):
        assert (got is None) == (want is None) and (got is None or torch.allclose(got, want, rtol=1e-12, atol=1e-12))


def test_one_training_step_compiles_with_inductor():
    """The default compiler (inductor, C++ on the CPU) on a whole step: the HSSN objective with
    triplets on the compiled CPU kernel, and path decoding; values and gradients as eager."""
    torch._dynamo.reset()
    x, y = _inputs()
    x = x.detach().float().requires_grad_()
    emb = torch.randn(2, 8, 5, 6, requires_grad=True)

    def step(logits, labels, embeddings):
        loss = hssn_loss(logits, labels, H, embeddings=embeddings, step=100, total_steps=1000, sampling="first")
        return loss, decode(logits.detach(), H)[0]

    compiled = torch.compile(step, fullgraph=True)(x, y, emb)
    eager = step(x, y, emb)
    assert torch.allclose(compiled[0], eager[0], rtol=1e-6) and torch.equal(compiled[1], eager[1])
    for got, want in zip(torch.autograd.grad(compiled[0], (x, emb)), torch.autograd.grad(eager[0], (x, emb)),
                         strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_every_other_op_compiles_with_inductor():
    """Inductor on the ops the training-step case leaves out: the leaf losses (their tables built in
    the graph), LogicSeg on the kernel's custom op, tree-min and the cross-entropy on the vectorized
    ops, top-down decoding; values and gradients as eager."""
    torch._dynamo.reset()
    x, y = _inputs()
    x = x.detach().float().requires_grad_()
    k = H.num_leaves

    def step(logits, labels):
        loss = (hierarchical_cross_entropy(logits[:, :k], labels, H, alpha=0.3, normalize=True)
                + soft_label_cross_entropy(logits[:, :k], labels, H, beta=2.0)
                + logicseg_loss(logits, labels, H, step=30000)
                + tree_min_loss(logits, labels, H, backend="torch", reduction="hssn")
                + depth_cross_entropy(logits, labels, H, 2))
        return loss, decode(logits.detach(), H, "top_down")[1]

    compiled = torch.compile(step, fullgraph=True)(x, y)
    eager = step(x, y)
    assert torch.allclose(compiled[0], eager[0], rtol=1e-5) and torch.equal(compiled[1], eager[1])
    (g_compiled,), (g_eager,) = torch.autograd.grad(compiled[0], x), torch.autograd.grad(eager[0], x)
    assert torch.allclose(g_compiled, g_eager, rtol=1e-4, atol=1e-6)


def test_modules_compile_fullgraph():
    """The module forms delegate to the functionals and compile the same way (HSSNLoss with the
    trainer's step: its own counter is a host read, see docs/compile.md)."""
    from hieraloss.torch import (
        HierarchicalCrossEntropyLoss,
        HierarchyDecoder,
        HSSNLoss,
        SoftLabelCrossEntropyLoss,
        TreeMinLoss,
    )

    x, y = _inputs()
    emb = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    cases = [
        (TreeMinLoss(H, reduction="hssn"), lambda m, a: m(a, y)),
        (HSSNLoss(H, total_steps=100, sampling="first"), lambda m, a: m(a, y, emb, step=40)),
        (HierarchyDecoder(H), lambda m, a: m(a)[1].sum().to(a.dtype) + 0 * a.sum()),
        (HierarchicalCrossEntropyLoss(H, alpha=0.2), lambda m, a: m(a[:, :H.num_leaves], y)),
        (SoftLabelCrossEntropyLoss(H, beta=2.0), lambda m, a: m(a[:, :H.num_leaves], y)),
    ]
    for module, call in cases:
        torch._dynamo.reset()
        eager = call(module, x)
        compiled = torch.compile(lambda a, m=module, c=call: c(m, a), fullgraph=True, backend="aot_eager")(x)
        assert torch.allclose(compiled, eager, rtol=1e-12, atol=1e-12), type(module).__name__
    assert int(cases[1][0].step) == 0  # an explicit step leaves the counter alone


def test_hssn_module_counts_its_own_steps_in_the_graph():
    """HSSNLoss with its stored step under fullgraph: the schedule is computed from the buffer on the
    device and the buffer advances in the graph; values and the counter follow eager."""
    from hieraloss.torch import HSSNLoss

    torch._dynamo.reset()
    x, y = _inputs()
    emb = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    eager = HSSNLoss(H, total_steps=3, sampling="first")
    traced = HSSNLoss(H, total_steps=3, sampling="first")
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    for _ in range(5):  # past the horizon: the weight stays at 0.5
        want, want_parts = eager(x, y, emb, return_parts=True)
        got, got_parts = compiled(x, y, emb, return_parts=True)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        assert float(got_parts["triplet_weight"]) == pytest.approx(float(want_parts["triplet_weight"]), rel=1e-12)
        # the backward uses this step's weight, not the advanced counter's
        for g_got, g_want in zip(torch.autograd.grad(got, emb), torch.autograd.grad(want, emb), strict=True):
            assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert int(traced.step) == int(eager.step) == 5
    traced.eval()
    compiled(x, y, emb)
    assert int(traced.step) == 5  # evaluation leaves it alone


def test_logicseg_module_counts_its_own_steps_in_the_graph():
    """LogicSegLoss with its stored step under fullgraph: the ramp from the buffer on the device."""
    from hieraloss.torch import LogicSegLoss

    torch._dynamo.reset()
    x, y = _inputs()
    eager, traced = LogicSegLoss(H, ramp=(1, 3)), LogicSegLoss(H, ramp=(1, 3))
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    for _ in range(5):
        want, want_parts = eager(x, y, return_parts=True)
        got, got_parts = compiled(x, y, return_parts=True)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        assert float(got_parts["rule_factor"]) == pytest.approx(float(want_parts["rule_factor"]), rel=1e-12)
        (g_got,), (g_want,) = torch.autograd.grad(got, x), torch.autograd.grad(want, x)
        assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12)  # this step's factor in backward
    assert int(traced.step) == int(eager.step) == 5


def test_logic_refine_compiles():
    """Rule descent takes gradients inside: it compiles (with graph breaks at the inner autograd call)."""
    torch._dynamo.reset()
    x, _ = _inputs()
    eager = logic_refine(x.detach(), H, steps=2)
    compiled = torch.compile(lambda a: logic_refine(a, H, steps=2), backend="aot_eager")(x.detach())
    assert torch.allclose(compiled, eager, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ dynamic shapes
# Two batch sizes and two resolutions (no size 1: dynamo always specializes 0 and 1).
DYNAMIC_SHAPES = [(2, 5, 6), (3, 5, 6), (2, 7, 9)]


def _module_cases():
    from hieraloss.torch import (
        FocalTreeMinLoss,
        HierarchicalCrossEntropyLoss,
        HierarchyDecoder,
        HierarchyTripletLoss,
        HSSNLoss,
        LogicSegLoss,
        SoftLabelCrossEntropyLoss,
        TreeMinLoss,
    )

    k = H.num_leaves
    # Module attributes (alpha, beta, gamma, the ramp) become symbolic floats under dynamic=True.
    return {
        "TreeMinLoss": (lambda: TreeMinLoss(H, reduction="hssn"), lambda m, a, b: m(a, b)),
        "FocalTreeMinLoss_torch": (lambda: FocalTreeMinLoss(H, gamma=1.5, backend="torch"), lambda m, a, b: m(a, b)),
        "HierarchyTripletLoss": (lambda: HierarchyTripletLoss(H, sampling="first"), lambda m, a, b: m(a[:, :4], b)),
        "HSSNLoss_own_step": (lambda: HSSNLoss(H, total_steps=3, sampling="first"), lambda m, a, b: m(a, b, a[:, :4])),
        "HSSNLoss_torch": (lambda: HSSNLoss(H, total_steps=9, sampling="first", backend="torch"),
                           lambda m, a, b: m(a, b, a[:, :4], step=4)),
        "HierarchyDecoder": (lambda: HierarchyDecoder(H), lambda m, a, b: m(a)[1].sum().to(a.dtype) + 0 * a.sum()),
        "HierarchicalCrossEntropyLoss": (lambda: HierarchicalCrossEntropyLoss(H, alpha=0.2, weighting="height",
                                                                              normalize=True),
                                         lambda m, a, b: m(a[:, :k], b)),
        "SoftLabelCrossEntropyLoss": (lambda: SoftLabelCrossEntropyLoss(H, beta=2.0), lambda m, a, b: m(a[:, :k], b)),
        "LogicSegLoss_own_step": (lambda: LogicSegLoss(H, ramp=(1, 3)), lambda m, a, b: m(a, b)),
    }


DYNAMIC_CASES = {
    **CASES,
    "tree_min_native": lambda x, y: tree_min_loss(x, y, H, backend="native"),
    "hssn_loss_native_triplet": lambda x, y: hssn_loss(x, y, H, backend="native", embeddings=x[:, :4],
                                                       triplet_weight=1.0, sampling="first"),
    **{name: None for name in _module_cases()},
}


def _dynamic_inputs(shape):
    b, hh, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(b, H.num_nodes, hh, w, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, H.num_nodes, (b, hh, w), generator=g)
    y[:, 0] = 255
    return x, y


@pytest.mark.parametrize("name", list(DYNAMIC_CASES))
def test_dynamic_shapes_compile_once_and_match_eager(name):
    """``dynamic=True``, fullgraph: one graph for every batch size and resolution (no recompile
    after the first call), with eager's values and gradients; modules count their steps alike."""
    if "native" in name:
        _needs_native()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    if DYNAMIC_CASES[name] is None:
        make, call = _module_cases()[name]
        eager_module, compiled_module = make(), make()
        eager_fn = lambda a, b: call(eager_module, a, b)  # noqa: E731
        traced_fn = lambda a, b: call(compiled_module, a, b)  # noqa: E731
    else:
        eager_fn = traced_fn = DYNAMIC_CASES[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(traced_fn, fullgraph=True, backend=counter, dynamic=True)
    graphs_after_first = None
    for shape in DYNAMIC_SHAPES:
        x, y = _dynamic_inputs(shape)
        want = eager_fn(x, y)
        got = compiled(x, y)
        graphs_after_first = graphs_after_first or counter.frame_count
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), shape
        (g_want,) = torch.autograd.grad(want, x)
        (g_got,) = torch.autograd.grad(got, x, allow_unused=True) if got.requires_grad else (torch.zeros_like(x),)
        assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12), shape
    assert counter.frame_count == graphs_after_first, "a new input size compiled a new graph"
