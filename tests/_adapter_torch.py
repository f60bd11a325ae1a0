"""hieraloss.torch behind the numpy-in / numpy-out adapter interface of tests/backends.py."""

from __future__ import annotations

import numpy as np
import torch
from backends import dtype_name

import hieraloss.torch as ht

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _float_tensor(x, requires_grad: bool = False) -> torch.Tensor:
    name = dtype_name(x)
    t = torch.from_numpy(np.array(x, dtype=np.float32 if name == "bfloat16" else name))
    t = t.to(_DTYPES[name]).requires_grad_(requires_grad)
    return t


def _labels(labels) -> torch.Tensor:
    return torch.from_numpy(np.array(labels))


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _kw(kw: dict) -> dict:
    kw = dict(kw)
    if kw.get("node_weight") is not None:
        kw["node_weight"] = torch.as_tensor(np.asarray(kw["node_weight"]))
    # An int seed passes unchanged: it draws the same triplets as numpy (hieraloss.core.triplets).
    return kw


class TorchAdapter:
    """backend="auto": on the CPU that is the compiled kernel when it is built (tests/native/test_native_tree_min.py
    covers it directly); ``_adapter_torch_eager.py`` runs the same suite on the vectorized torch ops."""

    name = "torch"
    loss_backend = "auto"
    supports_grad = True
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def _loss_kw(self, kw: dict) -> dict:
        return dict(_kw(kw), backend=self.loss_backend)

    def tree_min_loss(self, logits, labels, hierarchy, **kw):
        return _numpy(ht.tree_min_loss(_float_tensor(logits), _labels(labels), hierarchy, **self._loss_kw(kw)))

    def focal_tree_min_loss(self, logits, labels, hierarchy, **kw):
        return _numpy(ht.focal_tree_min_loss(_float_tensor(logits), _labels(labels), hierarchy, **self._loss_kw(kw)))

    def value_and_grad(self, fn_name, logits, labels, hierarchy, upstream=None, **kw):
        if fn_name not in ("tree_min_loss", "focal_tree_min_loss"):
            raise ValueError(f"unknown loss {fn_name!r}")
        x = _float_tensor(logits, requires_grad=True)
        value = getattr(ht, fn_name)(x, _labels(labels), hierarchy, **self._loss_kw(kw))
        up = torch.ones_like(value) if upstream is None else torch.as_tensor(np.asarray(upstream)).to(value)
        (grad,) = torch.autograd.grad((value * up).sum(), x)
        return _numpy(value), _numpy(grad)

    def decode(self, logits, hierarchy, method):
        leaf, depth = ht.decode(_float_tensor(logits), hierarchy, method=method)
        return leaf.numpy(), depth.numpy()

    def expand_targets(self, labels, hierarchy, ignore_index=255):
        targets, mask = ht.expand_targets(_labels(labels), hierarchy, ignore_index=ignore_index)
        return targets.numpy(), mask.numpy()

    def hierarchy_triplet_loss(self, embeddings, labels, hierarchy, **kw):
        return float(ht.hierarchy_triplet_loss(_float_tensor(embeddings), _labels(labels), hierarchy, **_kw(kw)))

    def triplet_value_and_grad(self, embeddings, labels, hierarchy, **kw):
        e = _float_tensor(embeddings, requires_grad=True)
        value = ht.hierarchy_triplet_loss(e, _labels(labels), hierarchy, **_kw(kw))
        (grad,) = torch.autograd.grad(value, e)
        return float(value.detach()), _numpy(grad)

    def triplet_weight(self, step, total_steps):
        return float(ht.triplet_weight(step, total_steps))


ADAPTER = TorchAdapter()
