"""hieraloss.torch with backend="triton": the fused Triton kernels (the objective, decoding and the
triplet loss), run on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it) or on a GPU.

``ADAPTER`` runs the generated objective kernel (one per tree), ``TABLE_ADAPTER`` the table-driven
one (one per tree depth). What the kernels do beyond the suite is in tests/kernels/.
"""

from __future__ import annotations

import torch
from _adapter_torch import TorchAdapter, _float_tensor, _kw, _labels, _numpy

import hieraloss.torch as ht

# The fused decoder covers these methods; the others run the torch ops whatever the backend.
_FUSED_DECODE = ("path", "top_down")


class TritonTorchAdapter(TorchAdapter):
    """``objective``: the Triton objective kernel it runs (``HIERALOSS_TRITON_OBJECTIVE``, set around
    each test by tests/conformance/test_conformance_triton.py)."""

    name = "torch_triton"
    loss_backend = "triton"
    objective = "generated"

    def decode(self, logits, hierarchy, method):
        backend = self.loss_backend if method in _FUSED_DECODE else "auto"
        leaf, depth = ht.decode(_float_tensor(logits), hierarchy, method=method, backend=backend)
        return leaf.numpy(), depth.numpy()

    def hierarchy_triplet_loss(self, embeddings, labels, hierarchy, **kw):
        return float(ht.hierarchy_triplet_loss(_float_tensor(embeddings), _labels(labels), hierarchy,
                                               **_kw(kw), backend=self.loss_backend))

    def triplet_value_and_grad(self, embeddings, labels, hierarchy, **kw):
        e = _float_tensor(embeddings, requires_grad=True)
        value = ht.hierarchy_triplet_loss(e, _labels(labels), hierarchy, **_kw(kw), backend=self.loss_backend)
        (grad,) = torch.autograd.grad(value, e)
        return float(value.detach()), _numpy(grad)


class TableTritonTorchAdapter(TritonTorchAdapter):
    name = "torch_triton_table"
    objective = "table"


ADAPTER = TritonTorchAdapter()
TABLE_ADAPTER = TableTritonTorchAdapter()
