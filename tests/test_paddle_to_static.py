"""paddle.jit.to_static (SOT mode, paddle's default) on the paddle API: the same values and gradients
as eager. full_graph=True (AST transcription) is not supported yet (issue 29): the losses check
their inputs' types and read label checks back on the host."""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import hieraloss  # noqa: E402
import hieraloss.paddle as hp  # noqa: E402

H = hieraloss.presets.cityscapes()


# Functions traced by to_static must live in a file (SOT reads their source).
def tree_min_auto(x, y):
    return hp.tree_min_loss(x, y, H)


def tree_min_paddle(x, y):
    return hp.tree_min_loss(x, y, H, backend="paddle", reduction="hssn")


def hssn(x, y):
    return hp.hssn_loss(x, y, H)


def hxe(x, y):
    return hp.hierarchical_cross_entropy(x[:, : H.num_leaves], y, H, alpha=0.3)


def decode_path(x, y):
    return hp.decode(x, H)[0].astype("float32").sum() + 0 * x.sum()


@pytest.mark.parametrize("fn", [tree_min_auto, tree_min_paddle, hssn, hxe, decode_path], ids=lambda f: f.__name__)
def test_sot_matches_eager(fn):
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(2, H.num_nodes, 6, 7)).astype("float32")
    y = paddle.to_tensor(rng.integers(0, H.num_leaves, size=(2, 6, 7)))
    grads = []
    values = []
    for f in (fn, paddle.jit.to_static(fn)):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        value = f(x, y)
        value.backward()
        values.append(float(value))
        grads.append(x.grad.numpy())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)
