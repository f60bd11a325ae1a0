"""``path_scores(logits, hierarchy)``: per-pixel leaf scores of the ``path`` decoding (torch and paddle).

Entry k of axis 1 is the sum of the logits along leaf k's path (leaves in id order), checked against
a loop over parent pointers; its argmax is the ``path`` decoding; the gradient reaches every node
on each leaf's path; same dtype rule, empty inputs and errors as ``decode``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hieraloss import Hierarchy, presets
from hieraloss.testing import hierarchies, logits

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} missing"))
    for name in ("torch", "paddle")
]


class _Torch:
    def __init__(self):
        import torch

        import hieraloss.torch as lib

        self.t, self.lib = torch, lib

    def tensor(self, x, dtype="float64", grad=False):
        out = self.t.tensor(np.asarray(x, dtype=np.float64)).to(getattr(self.t, dtype))
        return out.requires_grad_(grad)

    def numpy(self, t):
        return t.detach().to(self.t.float64).numpy() if t.is_floating_point() else t.numpy()

    def dtype(self, t):
        return str(t.dtype).removeprefix("torch.")

    def argmax(self, t):
        return t.argmax(dim=1).numpy()

    def grad(self, out, x, up):
        (out * self.t.tensor(up, dtype=out.dtype)).sum().backward()
        return x.grad.to(self.t.float64).numpy()


class _Paddle:
    def __init__(self):
        import paddle

        import hieraloss.paddle as lib

        self.p, self.lib = paddle, lib

    def tensor(self, x, dtype="float64", grad=False):
        out = self.p.to_tensor(np.asarray(x, dtype=np.float64)).astype(dtype)
        out.stop_gradient = not grad
        return out

    def numpy(self, t):
        floats = (self.p.float16, self.p.bfloat16, self.p.float32)
        return t.astype("float64").numpy() if t.dtype in floats else t.numpy()

    def dtype(self, t):
        return str(t.dtype).removeprefix("paddle.")

    def argmax(self, t):
        return self.p.argmax(t, axis=1).numpy()

    def grad(self, out, x, up):
        (out * self.p.to_tensor(up).astype(out.dtype)).sum().backward()
        return x.grad.astype("float64").numpy()


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    return _Torch() if request.param == "torch" else _Paddle()


def _loop_path_scores(h: Hierarchy, x: np.ndarray) -> np.ndarray:
    """Sum of the logits over each leaf's path, walking parent pointers (leaf ids in order)."""
    out = np.zeros((x.shape[0], h.num_leaves, *x.shape[2:]))
    for leaf in range(h.num_leaves):
        c = int(h.channel_of[leaf])
        while c >= 0:
            out[:, leaf] += x[:, c]
            c = int(h.parent[c])
    return out


def _loop_path_gradient(h: Hierarchy, up: np.ndarray) -> np.ndarray:
    """d sum(scores * up) / d logits: node v collects ``up`` of every leaf whose path holds v."""
    out = np.zeros((up.shape[0], h.num_nodes, *up.shape[2:]))
    for leaf in range(h.num_leaves):
        c = int(h.channel_of[leaf])
        while c >= 0:
            out[:, c] += up[:, leaf]
            c = int(h.parent[c])
    return out


@given(data=st.data())
def test_scores_gradient_and_argmax(backend, data):
    h = data.draw(hierarchies(max_depth=4, order=None))  # any layout; leaf ids unrelated to positions
    shape = (2, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)))
    x = data.draw(logits(h, shape))
    xt = backend.tensor(x, grad=True)
    got = backend.lib.path_scores(xt, h)
    assert tuple(got.shape) == (2, h.num_leaves, *shape[1:])
    assert backend.dtype(got) == "float64"
    np.testing.assert_allclose(backend.numpy(got), _loop_path_scores(h, x), rtol=1e-12, atol=1e-12)
    leaf, _ = backend.lib.decode(backend.tensor(x), h, method="path")
    np.testing.assert_array_equal(backend.argmax(got), backend.numpy(leaf))  # continuous logits: no ties
    up = np.random.default_rng(0).normal(size=(2, h.num_leaves, *shape[1:]))
    np.testing.assert_allclose(backend.grad(got, xt, up), _loop_path_gradient(h, up), rtol=1e-12, atol=1e-12)


def test_leaves_in_id_order_when_channels_are_permuted(backend):
    h = presets.pascal_person_part()
    h = h.with_order([int(c) for c in np.random.default_rng(3).permutation(h.num_nodes)])
    assert not np.array_equal(h.node_ids[np.sort(h.leaf_channels)], np.arange(h.num_leaves))
    x = np.random.default_rng(4).normal(size=(2, h.num_nodes, 3))
    got = backend.lib.path_scores(backend.tensor(x), h)
    np.testing.assert_allclose(backend.numpy(got), _loop_path_scores(h, x), rtol=1e-12, atol=1e-12)
    leaf, _ = backend.lib.decode(backend.tensor(x), h, method="path")
    np.testing.assert_array_equal(backend.argmax(got), backend.numpy(leaf))


@pytest.mark.parametrize(("dtype", "want"), [("float16", "float32"), ("bfloat16", "float32"),
                                             ("float32", "float32"), ("float64", "float64")])
def test_dtype_follows_decode(backend, dtype, want):
    """Computed in float32 for float16/bfloat16/float32 logits, float64 for float64 (as decode)."""
    h = presets.pascal_person_part()
    x = np.random.default_rng(1).normal(size=(2, h.num_nodes, 3, 2))
    xt = backend.tensor(x, dtype)
    got = backend.lib.path_scores(xt, h)
    assert backend.dtype(got) == want
    exact = _loop_path_scores(h, backend.numpy(xt))  # of the logits as given (rounded to dtype)
    np.testing.assert_allclose(backend.numpy(got), exact, rtol=1e-6, atol=1e-6)
    leaf, _ = backend.lib.decode(xt, h, method="path")
    np.testing.assert_array_equal(backend.argmax(got), backend.numpy(leaf))


@pytest.mark.parametrize("shape", [(0, 3, 2), (2, 0, 3), (1, 4, 0)])
def test_empty_inputs_give_empty_maps(backend, shape):
    h = presets.cityscapes()
    x = np.zeros((shape[0], h.num_nodes, *shape[1:]))
    got = backend.lib.path_scores(backend.tensor(x), h)
    assert tuple(got.shape) == (shape[0], h.num_leaves, *shape[1:])


def test_bad_inputs_raise_like_decode(backend):
    h = presets.cityscapes()
    for bad in (backend.tensor(np.zeros((1, 19, 2, 2))), np.zeros((1, h.num_nodes, 2, 2)),
                backend.tensor(np.zeros((1, h.num_nodes, 2, 2)), "float64")[:, :, 0, 0].sum()):
        with pytest.raises((ValueError, TypeError)) as want:
            backend.lib.decode(bad, h)
        with pytest.raises(type(want.value)) as got:
            backend.lib.path_scores(bad, h)
        assert str(got.value) == str(want.value)
    with pytest.raises(TypeError, match="hieraloss.Hierarchy"):
        backend.lib.path_scores(backend.tensor(np.zeros((1, h.num_nodes, 2, 2))), "cityscapes")


def test_the_integrations_return_the_public_scores(backend):
    h = presets.mapillary_vistas_v2()
    x = np.random.default_rng(2).normal(size=(1, h.num_nodes, 2, 3))
    name = "mmseg" if isinstance(backend, _Torch) else "paddleseg"
    integration = importlib.import_module(f"hieraloss.integrations.{name}")
    np.testing.assert_array_equal(backend.numpy(integration.path_scores(backend.tensor(x), h)),
                                  backend.numpy(backend.lib.path_scores(backend.tensor(x), h)))
