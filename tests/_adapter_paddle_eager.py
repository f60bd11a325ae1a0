"""hieraloss.paddle with backend="paddle": the vectorized paddle ops, never the compiled CPU kernel."""

from __future__ import annotations

from _adapter_paddle import PaddleAdapter


class EagerPaddleAdapter(PaddleAdapter):
    name = "paddle_eager"
    loss_backend = "paddle"


ADAPTER = EagerPaddleAdapter()
