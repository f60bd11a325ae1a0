"""Cross-rank triplet loss over ``paddle.distributed`` (the Paddle twin of :mod:`hieraloss.torch.distributed`).

Rule: the pixels of all ranks form one global batch (rank 0's pixels in flat ``(b, i, j)`` order,
then rank 1's, ...); triplets are drawn on it exactly as :func:`hieraloss.paddle.hierarchy_triplet_loss`
draws them on one batch (``"random"``: rank 0 draws with its generator and broadcasts the triplets),
so every rank gets the same value, which equals the single-process loss of the batches concatenated
along dim 0 when the ranks' shapes agree. Gradients reach only the calling rank's embeddings (rows
from other ranks are constants); the result is always connected to the local embeddings.
Communication: a few integers, the leaf maps, the triplets (``"random"`` only) and only the
embedding rows that the triplets use. Tensors travel on the CPU (gloo) or the current GPU (nccl).

The op itself, :func:`gathered_triplet_op`, lives in :mod:`hieraloss.paddle.ops.collective` (below
the functional API, which calls it); this module re-exports it with :func:`is_distributed` and
adds :func:`hierarchy_triplet_loss`, the functional loss with ``gather_across_ranks=True``.
"""

from __future__ import annotations

from typing import Any

import paddle

from ..hierarchy import Hierarchy
from . import functional as _pf
from .ops.collective import gathered_triplet_op, is_distributed

__all__ = ["is_distributed", "gathered_triplet_op", "hierarchy_triplet_loss"]


def hierarchy_triplet_loss(embeddings: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *,
                           max_per_class: int = 200, base_margin: float = 0.1, sampling: str = "random",
                           generator: Any = None, ignore_index: int = 255,
                           process_group: Any = None) -> paddle.Tensor:
    """:func:`hieraloss.paddle.hierarchy_triplet_loss` with ``gather_across_ranks=True``: triplets drawn
    across the ranks of ``process_group`` (a collective: every rank must call it); the local loss when
    paddle.distributed is not initialised."""
    return _pf.hierarchy_triplet_loss(embeddings, labels, hierarchy, max_per_class=max_per_class,
                                      base_margin=base_margin, sampling=sampling, generator=generator,
                                      ignore_index=ignore_index, process_group=process_group,
                                      gather_across_ranks=True)
