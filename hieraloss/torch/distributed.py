"""Cross-rank triplet loss over ``torch.distributed`` (opt-in: ``gather_across_ranks=True``).

Rule (what every rank computes). The pixels of all ranks of the process group form one *global*
batch: rank 0's pixels in flat ``(b, i, j)`` order, then rank 1's, and so on. Triplets are chosen
on that global batch exactly as :func:`hieraloss.torch.hierarchy_triplet_loss` chooses them on one
batch, so class presence, the per-class counts ``T`` and the anchors / positives / negatives are
global and every rank computes the same triplets and the same loss value. When all ranks hold
embeddings of the same shape, that value equals the single-process loss on the batch concatenated
along dim 0 in rank order (``sampling="first"``, and ``sampling="random"`` with rank 0's generator:
rank 0 draws the permutation of the global pixels and broadcasts it; the other ranks' generators
are not used).

Gradients flow only into the calling rank's own embeddings (the standard all-gather behaviour: the
rows received from other ranks are constants). Summed over ranks, the local gradients are exactly
the gradient of the global loss; DistributedDataParallel *averages* over ranks, so the parameter
gradient of this term is the global gradient divided by the world size (multiply the loss by
``world_size`` to undo that). The result is always connected to the local embeddings (an exact
zero where no local pixel takes part), so DDP with ``find_unused_parameters=False`` works.

Communication: one all-gather of a few integers (sizes and checks), one of the leaf maps, one
broadcast of the permutation (``"random"`` only) and one of the embedding rows that the chosen
triplets use (at most ``3 * max_per_class`` rows per class, not the whole maps). Tensors travel on
the CPU for gloo and on the current CUDA device for nccl.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hierarchy import Hierarchy
from .ops.device import compute_dtype
from .ops.triplet import key_order, triplet_score, triplet_select, unit_rows

__all__ = ["is_distributed", "gathered_triplet_op"]

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}


def is_distributed(process_group: Any = None) -> bool:
    """True when ``torch.distributed`` is initialised and the group has more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _comm_device(dist, group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_padded(dist, group, x: torch.Tensor, sizes: list[int], comm: torch.device) -> list[torch.Tensor]:
    """All-gather tensors whose dim 0 differs per rank (``sizes``), padded to the largest."""
    longest = max(sizes)
    pad = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=comm)
    pad[: x.shape[0]] = x.detach().to(comm)
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad, group=group)
    return [o[:n] for o, n in zip(out, sizes, strict=True)]


def gathered_triplet_op(embeddings: torch.Tensor, leaf: torch.Tensor, hierarchy: Hierarchy, *,
                        max_per_class: int, base_margin: float, sampling: str,
                        generator: torch.Generator | None, process_group: Any = None) -> torch.Tensor:
    """Triplet loss over the global batch of all ranks (module docstring); a collective: every rank
    of ``process_group`` must call it. ``leaf`` ``[B, h, w]`` holds leaf ids, -1 where not taking part.

    Raises ``RuntimeError`` on every rank when the ranks disagree on the hierarchy, the embedding
    width C, the embedding dtype (after float16/bfloat16 -> float32), ``max_per_class``,
    ``base_margin`` or ``sampling``.
    """
    import torch.distributed as dist

    group = process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = embeddings.device
    comm = _comm_device(dist, group)
    C = embeddings.shape[1]
    ct = compute_dtype(embeddings.dtype)
    flat = leaf.reshape(-1)
    n_local = flat.numel()

    # Sizes and settings of every rank; any disagreement raises on all ranks alike (no hang later).
    margin_bits = torch.tensor([float(base_margin)], dtype=torch.float64).view(torch.int64).item()
    meta = torch.tensor([n_local, C, _DTYPE_CODES[ct], int(hierarchy.fingerprint[:15], 16),
                         int(max_per_class), margin_bits, int(sampling == "random")],
                        dtype=torch.int64, device=comm)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = torch.stack(metas).cpu()
    names = ("", "embedding width C", "embedding dtype", "hierarchy", "max_per_class", "base_margin", "sampling")
    differ = [names[k] for k in range(1, len(names)) if bool((metas[:, k] != metas[0, k]).any())]
    if differ:
        raise RuntimeError(
            f"gathered triplet loss: the ranks disagree on {', '.join(differ)} (rank {rank} of {world})")
    sizes = metas[:, 0].tolist()
    offsets = [sum(sizes[:r]) for r in range(world)]

    zero = embeddings.reshape(-1)[:0].sum().to(ct)  # see the end of this function
    if sum(sizes) == 0:
        return zero
    # The global leaf map, in rank order.
    pieces = _all_gather_padded(dist, group, flat.to(torch.int64).unsqueeze(1), sizes, comm)
    global_flat = torch.cat(pieces).squeeze(1).to(dev)
    if sampling == "random":  # rank 0's key order, so every rank selects the same triplets
        pixels = (key_order(global_flat, sampling, generator) if rank == 0
                  else torch.empty(global_flat.numel(), dtype=torch.int64, device=dev))
        pixels_comm = pixels.to(comm)
        dist.broadcast(pixels_comm, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        pixels = pixels_comm.to(dev)
    else:
        pixels = key_order(global_flat, sampling, generator)
    chosen = triplet_select(global_flat, pixels, hierarchy, max_per_class=int(max_per_class))
    total = int(chosen.T.sum())
    if total == 0:
        return zero
    chosen = chosen.take(total)  # the triplets fill the first slots
    anchor, positive, negative = chosen.anchor, chosen.positive, chosen.negative

    # Only the rows the triplets use travel: sorted global positions, split by owning rank.
    needed = torch.unique(torch.cat([anchor, positive, negative]))  # sorted
    bounds = torch.tensor(offsets + [offsets[-1] + sizes[-1]], device=dev)
    owner_counts = (torch.searchsorted(needed, bounds[1:]) - torch.searchsorted(needed, bounds[:-1])).tolist()
    start = sum(owner_counts[:rank])
    mine = needed[start:start + owner_counts[rank]] - offsets[rank]
    own = unit_rows(embeddings, (mine,), ct)[0]  # normalised along C, only the rows needed
    rows = _all_gather_padded(dist, group, own, owner_counts, comm)
    rows = [own if r == rank else rows[r].to(dev) for r in range(world)]
    table = torch.cat(rows)  # row k = unit embedding of global pixel needed[k]

    def at(positions: torch.Tensor) -> torch.Tensor:
        return table[torch.searchsorted(needed, positions)]

    loss = triplet_score(at(anchor), at(positive), at(negative), chosen, hierarchy, base_margin)
    # Plus an exact 0 connected to the local embeddings: DDP then sees every parameter of the
    # embedding head used even where none of this rank's pixels is in a triplet.
    return loss + zero
