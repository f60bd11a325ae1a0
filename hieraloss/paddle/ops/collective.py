"""The cross-rank triplet op over ``paddle.distributed`` (the paddle twin of
:func:`hieraloss.torch.distributed.gathered_triplet_op`); the rule it follows is written in :mod:`.distributed`.

No validation: :func:`.functional.hierarchy_triplet_loss` checks the inputs and calls
:func:`gathered_triplet_op` when ``gather_across_ranks=True`` and more than one rank takes part.
Imports no door module of the backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from ...core import triplets as _triplets
from ...hierarchy import Hierarchy
from .device import NORM_EPS, compute_dtype

__all__ = ["is_distributed", "gathered_triplet_op"]


def is_distributed(group: Any = None) -> bool:
    """True when ``paddle.distributed`` is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_gather_padded(x: paddle.Tensor, sizes: list[int], group) -> list[paddle.Tensor]:
    longest = max(sizes)
    pad = paddle.zeros([longest, *x.shape[1:]], dtype=x.dtype)
    if x.shape[0]:
        pad[: x.shape[0]] = x.detach()
    out: list[paddle.Tensor] = []
    dist.all_gather(out, pad, group=group)
    return [o[:n] for o, n in zip(out, sizes, strict=True)]


def _zero(embeddings: paddle.Tensor, ct) -> paddle.Tensor:
    flat = embeddings.reshape([-1])[:1]
    return paddle.where(paddle.zeros_like(flat, dtype="bool"), flat, paddle.zeros_like(flat)).sum().astype(ct)


def gathered_triplet_op(embeddings: paddle.Tensor, leaf: np.ndarray, hierarchy: Hierarchy, *, max_per_class: int,
                        base_margin: float, sampling: str, generator: np.random.Generator | None,
                        process_group: Any = None) -> paddle.Tensor:
    """Triplet loss over the global batch of all ranks (module docstring); a collective.

    ``leaf`` is a host ``[B, h, w]`` array of leaf ids (-1 elsewhere). Raises ``RuntimeError`` on
    every rank when the ranks disagree on the hierarchy, C, the dtype or the settings.
    """
    group = process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    src = group.ranks[0] if group is not None else 0  # broadcast takes the global rank
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[:2]
    flat = np.asarray(leaf).reshape(-1).astype(np.int64)
    margin_bits = int(np.float64(base_margin).view(np.int64))
    meta = paddle.to_tensor([flat.size, C, 2 if ct == paddle.float64 else 1, int(hierarchy.fingerprint[:15], 16),
                             int(max_per_class), margin_bits, int(sampling == "random")], dtype="int64")
    metas: list[paddle.Tensor] = []
    dist.all_gather(metas, meta, group=group)
    metas = np.stack([m.numpy() for m in metas])
    names = ("", "embedding width C", "embedding dtype", "hierarchy", "max_per_class", "base_margin", "sampling")
    differ = [names[k] for k in range(1, len(names)) if (metas[:, k] != metas[0, k]).any()]
    if differ:
        raise RuntimeError(
            f"gathered triplet loss: the ranks disagree on {', '.join(differ)} (rank {rank} of {world})")
    sizes = metas[:, 0].tolist()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    zero = _zero(embeddings, ct)
    if offsets[-1] == 0:
        return zero
    pieces = _all_gather_padded(paddle.to_tensor(flat).reshape([-1, 1]), sizes, group)
    global_flat = np.concatenate([p.numpy().reshape(-1) for p in pieces])

    if sampling == "random":  # rank 0 draws; the others receive its triplets
        if rank == 0:
            keys = _triplets.key_order(global_flat, sampling, generator)
            ai, pi, ni = _triplets.select_triplets(global_flat, keys, hierarchy, max_per_class)[:3]
            count = paddle.to_tensor([ai.size], dtype="int64")
        else:
            count = paddle.zeros([1], dtype="int64")
        dist.broadcast(count, src=src, group=group)
        n = int(count.numpy()[0])
        if n == 0:
            return zero
        chosen = paddle.to_tensor(np.stack([ai, pi, ni])) if rank == 0 else paddle.zeros([3, n], dtype="int64")
        dist.broadcast(chosen, src=src, group=group)
        ai, pi, ni = chosen.numpy()
    else:
        keys = _triplets.key_order(global_flat, sampling)
        ai, pi, ni = _triplets.select_triplets(global_flat, keys, hierarchy, max_per_class)[:3]
        if ai.size == 0:
            return zero

    # Only the rows the triplets use travel, split by owning rank.
    needed = np.unique(np.concatenate([ai, pi, ni]))
    owner_counts = np.diff(np.searchsorted(needed, offsets)).tolist()
    start = sum(owner_counts[:rank])
    mine = needed[start:start + owner_counts[rank]] - offsets[rank]
    emb = embeddings.astype(ct).reshape([B, C, -1]).transpose([0, 2, 1]).reshape([-1, C])
    own = paddle.index_select(emb, paddle.to_tensor(mine, dtype="int64"))
    own = own / paddle.clip(paddle.sqrt((own * own).sum(axis=1, keepdim=True)), min=NORM_EPS)
    rows = _all_gather_padded(own, owner_counts, group)
    table = paddle.concat([own if r == rank else rows[r] for r in range(world)])

    def at(positions: np.ndarray) -> paddle.Tensor:
        return paddle.index_select(table, paddle.to_tensor(np.searchsorted(needed, positions), dtype="int64"))

    ac, pc, nc = global_flat[ai], global_flat[pi], global_flat[ni]
    margin = paddle.to_tensor(_triplets.margins(hierarchy, ac, pc, nc, base_margin)).astype(ct)
    e_a, e_p, e_n = at(ai), at(pi), at(ni)
    per = F.relu((1.0 - (e_a * e_p).sum(axis=1)) - (1.0 - (e_a * e_n).sum(axis=1)) + margin)
    classes, inverse, per_class = np.unique(ac, return_inverse=True, return_counts=True)
    weight = 1.0 / (per_class[inverse] * classes.size)  # mean per class, then over classes
    return (per * paddle.to_tensor(weight).astype(ct)).sum() + zero
