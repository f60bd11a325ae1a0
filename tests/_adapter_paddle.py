"""Conformance adapter for hieraloss.paddle (numpy in, numpy out); picked up by tests/backends.py."""

from __future__ import annotations

import numpy as np
import paddle
from backends import dtype_name

import hieraloss.paddle as hp

paddle.set_device("cpu")


def _tensor(x, grad=False):
    """A paddle tensor of the dtype the suite asked for (bfloat16 arrives as a marked float32 array)."""
    name = dtype_name(x)
    t = paddle.to_tensor(np.array(x, dtype=np.float32 if name == "bfloat16" else x.dtype))
    if name == "bfloat16":
        t = t.astype("bfloat16")
    t.stop_gradient = not grad
    return t


def _labels(labels):
    labels = np.asarray(labels)
    return paddle.to_tensor(labels) if np.issubdtype(labels.dtype, np.integer) else labels


def _numpy(t):
    if t.dtype == paddle.bfloat16:
        t = t.astype("float32")
    return t.numpy()


def _weight(kw):
    kw = dict(kw)
    if kw.get("node_weight") is not None:
        kw["node_weight"] = np.asarray(kw["node_weight"])
    return kw


class PaddleAdapter:
    """backend="auto": on the CPU that is the compiled kernel when it is built (tests/paddle/test_paddle_native.py
    covers it directly); ``_adapter_paddle_eager.py`` runs the same suite on the vectorized paddle ops."""

    name = "paddle"
    loss_backend = "auto"
    supports_grad = True
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def tree_min_loss(self, logits, labels, hierarchy, **kw):
        return _numpy(
            hp.tree_min_loss(_tensor(logits), _labels(labels), hierarchy, backend=self.loss_backend, **_weight(kw))
        )

    def focal_tree_min_loss(self, logits, labels, hierarchy, **kw):
        return _numpy(
            hp.focal_tree_min_loss(
                _tensor(logits), _labels(labels), hierarchy, backend=self.loss_backend, **_weight(kw)
            )
        )

    def value_and_grad(self, fn_name, logits, labels, hierarchy, upstream=None, **kw):
        x = _tensor(logits, grad=True)
        value = getattr(hp, fn_name)(x, _labels(labels), hierarchy, backend=self.loss_backend, **_weight(kw))
        up = (
            paddle.ones_like(value)
            if upstream is None
            else paddle.to_tensor(np.asarray(upstream, dtype=np.float64))
            .astype(value.dtype)
            .reshape(value.shape)
        )
        (value * up).sum().backward()
        return _numpy(value), _numpy(x.grad)

    def decode(self, logits, hierarchy, method):
        leaf, depth = hp.decode(_tensor(logits), hierarchy, method, backend="paddle")
        return leaf.numpy(), depth.numpy()

    def expand_targets(self, labels, hierarchy, ignore_index=255):
        targets, mask = hp.expand_targets(_labels(labels), hierarchy, ignore_index)
        return targets.numpy(), mask.numpy()

    def hierarchy_triplet_loss(self, embeddings, labels, hierarchy, **kw):
        return float(_numpy(hp.hierarchy_triplet_loss(_tensor(embeddings), _labels(labels), hierarchy, **kw)))

    def triplet_value_and_grad(self, embeddings, labels, hierarchy, **kw):
        e = _tensor(embeddings, grad=True)
        value = hp.hierarchy_triplet_loss(e, _labels(labels), hierarchy, **kw)
        value.backward()
        grad = e.grad if e.grad is not None else paddle.zeros_like(e)
        return float(_numpy(value)), _numpy(grad)

    def triplet_weight(self, step, total_steps):
        return float(hp.triplet_weight(step, total_steps))


ADAPTER = PaddleAdapter()
