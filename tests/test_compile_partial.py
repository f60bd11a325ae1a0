"""torch.compile on the paths that compile today (issue 29 tracks the rest): warm caches are read
without locks, and a compiled label check is an assertion in the graph, not a host read."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import hieraloss  # noqa: E402
from hieraloss.torch import decode, depth_cross_entropy, tree_min_loss  # noqa: E402

H = hieraloss.presets.cityscapes()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, H.num_nodes, 6, 6, generator=g, requires_grad=True)
    y = torch.randint(0, H.num_leaves, (2, 6, 6), generator=g)
    return x, y


def test_decode_compiles_fullgraph_once_its_tables_are_warm():
    torch._dynamo.reset()
    x, _ = _inputs()
    eager = decode(x, H)  # warms the device tables
    compiled = torch.compile(lambda z: decode(z, H), fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_compiled_label_check_asserts_in_the_graph():
    torch._dynamo.reset()
    x, y = _inputs()

    def step(z, labels):
        return depth_cross_entropy(z, labels, H, 2, backend="torch") + tree_min_loss(z, labels, H, backend="torch")

    eager = step(x, y)
    compiled = torch.compile(step, backend="aot_eager")
    value = compiled(x, y)
    assert torch.allclose(value, eager, rtol=1e-6)
    (g_eager,) = torch.autograd.grad(eager, x)
    (g_compiled,) = torch.autograd.grad(compiled(x, y), x)
    assert torch.allclose(g_compiled, g_eager, rtol=1e-5, atol=1e-7)
    bad = y.clone()
    bad[0, 0, 0] = 40  # a raw Cityscapes id
    with pytest.raises(RuntimeError, match="neither node ids 0..25 nor ignore_index=255"):
        compiled(x, bad)
