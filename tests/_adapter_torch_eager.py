"""hieraloss.torch with backend="torch": the vectorized torch ops, never the compiled CPU kernel."""

from __future__ import annotations

from _adapter_torch import TorchAdapter


class EagerTorchAdapter(TorchAdapter):
    name = "torch_eager"
    loss_backend = "torch"


ADAPTER = EagerTorchAdapter()
