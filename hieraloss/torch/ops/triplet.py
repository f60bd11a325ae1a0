"""The hierarchy triplet loss in torch ops: selection of the triplets on the device, their score, the
cross-rank op (:func:`gathered_triplet_op`, whose rule :mod:`hieraloss.torch.distributed` states), and
the routing between them and the fused kernels."""

from __future__ import annotations

from typing import Any

import torch

from ...core import triplets as core_triplets
from ...hierarchy import Hierarchy
from .._tables import DeviceTables, cached_on
from . import route
from .device import compute_dtype, device_plan
from .labels import label_channels


# The local op runs without reading anything back to the host (except "random" with an int seed,
# which reads one count for the core's permutation): what depends only on the hierarchy is a cached
# table, and the data-dependent sizes are replaced by fixed-size buffers with a validity mask. The
# taking-part pixels come first in a length-P "sequence" (P = all pixels; the others follow as a
# sentinel class K in a sentinel group G), counts are read off sorted keys with searchsorted, and the
# triplets live in S = min(K * max_per_class, P) slots: class after class, the i-th triplet of a class
# in its i-th slot, the unused slots last (class K, invalid, contributing an exact 0).
def resize_labels_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resampling of ``[B, H, W]`` to ``size`` with ``F.interpolate(mode="nearest")``'s rule,
    computed in float32: row i takes ``min(floor(i * float32(H / h)), H - 1)`` (same as hieraloss.numpy)."""
    H, W = labels.shape[-2:]
    h, w = size

    def source(n_in: int, n_out: int) -> torch.Tensor:
        import numpy as np

        # float32(n_in / n_out) as a Python number (exact in float32): no host-to-device copy.
        scale = float(np.float32(n_in / n_out))
        idx = torch.arange(n_out, dtype=torch.float32, device=labels.device) * scale
        return idx.floor_().long().clamp_(max=n_in - 1)

    return labels.index_select(-2, source(H, h)).index_select(-1, source(W, w))


class TripletTables:
    """What the triplet selection needs of a hierarchy, built once per device on the host.

    ``group [K + 1]``: sibling group of each leaf (leaves sharing a parent, the implicit root counting
    as one; :func:`hieraloss.core.triplets.sibling_groups`) and ``G`` for the sentinel class K;
    ``num_groups``: G; ``leaf_distance [K + 1, K + 1]``: psi between leaves, 0 in the sentinel row
    and column; ``class_ids [K + 2]`` and ``group_ids [G + 2]``: ``arange`` for the searchsorted counts.
    """

    def __init__(self, tab: DeviceTables):
        import numpy as np

        h: Hierarchy = tab.hierarchy
        dev = tab.device
        K = h.num_leaves
        group = core_triplets.sibling_groups(h)
        self.num_leaves = K
        self.num_groups = G = int(group.max()) + 1 if K else 0
        self.group = torch.tensor(np.append(group, G), dtype=torch.int64, device=dev)
        psi = np.zeros((K + 1, K + 1), dtype=np.int64)
        psi[:K, :K] = np.asarray(h.leaf_distance)
        self.leaf_distance = torch.tensor(psi, device=dev)
        self.class_ids = torch.arange(K + 2, dtype=torch.int64, device=dev)
        self.group_ids = torch.arange(G + 2, dtype=torch.int64, device=dev)


def triplet_tables(hierarchy: Hierarchy, device: torch.device) -> TripletTables:
    return cached_on(hierarchy, device, "_triplet", TripletTables)


def triplet_op(embeddings: torch.Tensor, leaf: torch.Tensor, hierarchy: Hierarchy, *,
               max_per_class: int, base_margin: float, sampling: str,
               generator: Any) -> torch.Tensor:
    """Hierarchy-margin triplet loss; ``leaf`` ``[B, h, w]`` holds leaf ids, -1 where not taking part.

    No host sync, except for ``sampling="random"`` with a numpy Generator (an int seed): the number
    of taking-part pixels is read back for the core's permutation (:func:`key_order`).
    """
    ct = compute_dtype(embeddings.dtype)
    flat = leaf.reshape(-1)
    if flat.numel() == 0:
        return embeddings.reshape(-1)[:0].sum().to(ct)  # an exact 0 still connected to the embeddings
    pixels = key_order(flat, sampling, generator)
    chosen = triplet_select(flat, pixels, hierarchy, max_per_class=max_per_class)
    e_a, e_p, e_n = unit_rows(embeddings, (chosen.anchor, chosen.positive, chosen.negative), ct)
    return triplet_score(e_a, e_p, e_n, chosen, hierarchy, base_margin)


def unit_rows(embeddings: torch.Tensor, at: tuple[torch.Tensor, ...], ct: torch.dtype) -> list[torch.Tensor]:
    """``[S, C]`` rows of the embeddings ``[B, C, h, w]`` L2-normalised along C, at the flat pixel
    positions of each index tensor of ``at``; no sync.

    Only the pixels used are normalised, each once: ``min(#indices, P)`` distinct pixels are gathered
    (the used ones in ascending order, then unused ones as padding). Values and gradients are bitwise
    those of normalising the whole map and indexing its rows, on the CPU: the reduction over C runs
    in the same memory order as on the map (strided when C is not the innermost dimension of
    ``embeddings``), and the rows of a pixel used several times add up their gradients before the
    normalisation's backward, as indexing the whole map does.
    """
    B, C, h, w = embeddings.shape
    P = B * h * w
    idx = torch.cat(at)
    U = min(idx.numel(), P)
    if U == 0:
        return [embeddings.reshape(-1)[:0].to(ct).view(0, C) for _ in at]
    used = torch.zeros(P, dtype=torch.bool, device=embeddings.device).index_fill_(0, idx, True)
    order, ahead = _partition(used)
    pix = order[:U]
    maps = embeddings.reshape(B, C, h * w)  # a view unless the embeddings are a non-dense view
    columns = maps.stride(1) != 1  # C strided: reduce down columns [C, U], else along rows [U, C]
    x = _PixelVectors.apply(maps, pix // (h * w), pix % (h * w), columns).to(ct)
    unit = torch.nn.functional.normalize(x, dim=0 if columns else 1, eps=1e-12)
    if columns:
        unit = unit.t()
    row = ahead - 1  # row of each used pixel in ``unit``
    return [embedding_rows(unit, row[a]) for a in at]


class _PixelVectors(torch.autograd.Function):
    """The vectors of distinct pixels ``(b, q)`` of ``[B, C, h*w]`` maps: ``[C, U]`` (``columns``) or
    ``[U, C]``. The pixels being distinct, backward writes the gradient into zeros with a plain
    ``index_put_`` (no accumulation: no atomics on the CPU, no sort on CUDA)."""

    @staticmethod
    def forward(ctx, maps, b, q, columns):
        ctx.save_for_backward(b, q)
        dense = maps.is_contiguous() or maps.transpose(1, 2).is_contiguous()
        ctx.layout = (maps.shape, maps.stride() if dense else None, columns)
        return maps.transpose(0, 1)[:, b, q] if columns else maps[b, :, q]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        b, q = ctx.saved_tensors
        shape, stride, columns = ctx.layout
        if stride is None:  # the gradient of a non-dense view: contiguous, as autograd would make it
            out = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
        else:  # the embeddings' layout, so that AccumulateGrad takes it without a copy
            out = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).zero_()
        if columns:
            out.transpose(0, 1)[:, b, q] = grad
        else:
            out[b, :, q] = grad
        return out, None, None, None


def embedding_rows(emb: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``emb[at]`` with a deterministic backward: on the CPU through ``index_select`` (its backward,
    ``index_add_``, adds the rows in index order, where indexing's backward adds float32 rows from
    several threads with atomics), elsewhere by indexing (CUDA sorts the indices to accumulate)."""
    return emb.index_select(0, at) if emb.device.type == "cpu" else emb[at]


def taking_part_first(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [P], n)``: the flat positions of the taking-part pixels (``flat >= 0``) in flat order,
    then those of the others in flat order; ``n`` (a 1-element tensor) counts the former. No sync."""
    order, ahead = _partition(flat >= 0)
    return order, ahead[-1:]


def _partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, ahead)`` for a 1-d bool ``mask``: the positions where it holds in ascending order,
    then the others in ascending order; ``ahead = cumsum(mask)``. A scatter, no sort, no sync."""
    ahead = torch.cumsum(mask, 0)
    idx = torch.arange(mask.numel(), device=mask.device)
    slot = torch.where(mask, ahead - 1, idx - ahead + ahead[-1:])
    return torch.empty_like(idx).scatter_(0, slot, idx), ahead


def shuffle_taking_part(pixels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``pixels`` (from :func:`taking_part_first`) with its first ``n = order.numel()`` entries, the
    taking-part pixels, taken in ``order`` (a permutation of ``range(n)``)."""
    n = order.numel()
    return torch.cat([pixels[:n][order], pixels[n:]])


# Random sort keys are drawn in [0, KEY_RANGE); pixels that do not take part get KEY_RANGE.
KEY_RANGE = 1 << 62


def key_order(flat: torch.Tensor, sampling: str, generator: Any) -> torch.Tensor:
    """The key order ``[P]`` of the triplet selection for the flat leaf map ``flat`` (-1 = not taking
    part): the taking-part pixels in key order, then the others in flat order.

    ``"first"``: flat order. ``"random"`` with a ``torch.Generator`` or None (torch's default
    generator of ``flat``'s device): the pixels sorted by random int64 keys drawn from it, one per
    pixel (``torch.randint(0, 2**62, (P,))`` on the generator's device; ties, about P**2 / 2**63 likely,
    keep flat order) - a uniform random order with no host sync. With a numpy Generator (what the
    door makes of an int seed): the core's permutation of the n taking-part pixels
    (:func:`hieraloss.core.triplets.random_order`, the draw of every backend); n is read back.
    """
    if sampling == "first" or flat.numel() == 0:
        return taking_part_first(flat)[0]
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else flat.device
        keys = torch.randint(0, KEY_RANGE, (flat.numel(),), generator=generator, device=device).to(flat.device)
        keys = torch.where(flat >= 0, keys, KEY_RANGE)
        return torch.sort(keys, stable=True).indices
    pixels, n = taking_part_first(flat)
    order = torch.from_numpy(core_triplets.random_order(int(n), generator)).to(flat.device)
    return shuffle_taking_part(pixels, order)


def _ith_outside(members_pos: torch.Tensor, rank: torch.Tensor, seg_of_member: torch.Tensor,
                 seg_start: torch.Tensor, seg_of_query: torch.Tensor, i: torch.Tensor, stride: int) -> torch.Tensor:
    """Position of the i-th element (0-based) *outside* a segment of a sequence.

    ``members_pos`` holds, segment after segment (``seg_of_member`` ascending, segments starting at
    ``seg_start``), the ascending sequence positions q_k of each segment's members, ``rank`` their
    k (0-based within the segment); the i-th non-member sits at ``i + #{k : q_k - k <= i}``.
    Segments are made globally sortable by adding ``segment * stride`` (``stride`` > every position
    and every ``i``).
    """
    key = members_pos - rank + seg_of_member * stride
    found = torch.searchsorted(key, i + seg_of_query * stride, right=True) - seg_start[seg_of_query]
    return i + found


class Triplets:
    """Fixed-size triplet slots (``S = min(K * max_per_class, P)``; see :func:`triplet_select`).

    ``slot_cls [S]``: anchor class of each slot, K on the unused ones; ``anchor``, ``positive``,
    ``negative [S]``: flat positions of the three pixels (in range but arbitrary on unused slots);
    ``positive_cls``, ``negative_cls [S]``: their leaf ids (K on unused slots); ``valid [S]``: the
    slot holds a triplet (exactly the first ``T.sum()`` slots); ``T [K + 1]``: triplets per anchor
    class (0 for the sentinel class K).
    """

    __slots__ = ("slot_cls", "anchor", "positive", "negative", "positive_cls", "negative_cls", "valid", "T")

    def __init__(self, slot_cls, anchor, positive, negative, positive_cls, negative_cls, valid, T):
        self.slot_cls, self.anchor, self.positive, self.negative = slot_cls, anchor, positive, negative
        self.positive_cls, self.negative_cls, self.valid, self.T = positive_cls, negative_cls, valid, T

    def take(self, n: int) -> Triplets:
        """The first ``n`` slots (``n = T.sum()`` keeps exactly the triplets)."""
        return Triplets(*(getattr(self, f)[:n] for f in self.__slots__[:-1]), self.T)


def triplet_select(flat: torch.Tensor, pixels: torch.Tensor, hierarchy: Hierarchy, *,
                   max_per_class: int) -> Triplets:
    """Choose the triplets without a host sync: ``flat`` ``[P]`` holds a leaf id per pixel (-1 = not
    taking part); ``pixels`` ``[P]`` is the key order: the positions of the taking-part pixels (flat
    order for ``sampling="first"``, a random permutation otherwise), then all the others.

    Class c gets ``T[c] = min(max_per_class, #anchors, #positives, #negatives)`` triplets, the i-th
    pairing the i-th anchor, positive and negative in key order; they fill slots
    ``cumsum(T)[c - 1] + i`` of ``S = min(K * max_per_class, P)`` slots (a bound on ``sum(T)``
    known from shapes). All classes are handled at once: the i-th anchor / positive / negative of
    every class is located by sorting and searching, with no loop over classes.
    """
    tt = triplet_tables(hierarchy, flat.device)
    dev = flat.device
    K = tt.num_leaves
    P = flat.numel()
    S = min(K * max_per_class, P)
    stride = P + 1
    last = P - 1

    seq_cls = flat[pixels]  # key order; -1 (not taking part) only after the taking-part pixels
    seq_cls = torch.where(seq_cls >= 0, seq_cls, K)
    seq_grp = tt.group[seq_cls]
    cls_sorted, by_cls = torch.sort(seq_cls, stable=True)  # key order inside each class
    grp_sorted, by_grp = torch.sort(seq_grp, stable=True)  # key order inside each group
    cls_bound = torch.searchsorted(cls_sorted, tt.class_ids)  # [K + 2]
    grp_bound = torch.searchsorted(grp_sorted, tt.group_ids)  # [G + 2]
    cls_start, grp_start = cls_bound[:-1], grp_bound[:-1]
    n_cls = cls_bound[1:] - cls_start  # [K + 1], the sentinel class counts the others
    n_grp = grp_bound[1:] - grp_start  # [G + 1]
    n_pix = cls_bound[K]  # taking-part pixels
    grp_of_cls = n_grp[tt.group]
    n_pos = grp_of_cls - n_cls  # 0 for the sentinel class (its T is 0)
    n_neg = n_pix - grp_of_cls
    T = torch.minimum(torch.minimum(n_cls, n_pos), n_neg).clamp_(0, max_per_class)  # sentinel: n_neg may be < 0

    ends = torch.cumsum(T, 0)
    slot = torch.arange(S, device=dev)
    slot_cls = torch.searchsorted(ends, slot, right=True).clamp_(max=K)
    slot_i = slot - (ends - T)[slot_cls]
    valid = slot_cls < K
    slot_grp = tt.group[slot_cls]

    a_at = by_cls[(cls_start[slot_cls] + slot_i).clamp_(max=last)]

    # Negatives: the i-th pixel outside the anchor's group, in key order.
    idx = torch.arange(P, device=dev)
    grp_rank = idx - grp_start[grp_sorted]  # rank of by_grp[k] inside its group
    n_at = _ith_outside(by_grp, grp_rank, grp_sorted, grp_start, slot_grp, slot_i, stride).clamp_(max=last)

    # Positives: the i-th pixel of the anchor's group that is not of the anchor's class.
    in_grp = torch.empty_like(idx).scatter_(0, by_grp, grp_rank)  # per sequence position: rank in its group
    cls_rank = idx - cls_start[cls_sorted]
    pos_local = _ith_outside(in_grp[by_cls], cls_rank, cls_sorted, cls_start, slot_cls, slot_i, stride)
    p_at = by_grp[(grp_start[slot_grp] + pos_local).clamp_(max=last)]
    return Triplets(slot_cls, pixels[a_at], pixels[p_at], pixels[n_at], seq_cls[p_at], seq_cls[n_at], valid, T)


def triplet_score(e_a: torch.Tensor, e_p: torch.Tensor, e_n: torch.Tensor, chosen: Triplets,
                  hierarchy: Hierarchy, base_margin: float) -> torch.Tensor:
    """Mean over classes of the mean ``relu(d(a,p) - d(a,n) + m)`` of unit embedding rows (one row
    per slot of ``chosen``); unused slots contribute an exact 0, no triplet at all gives 0. No sync."""
    tt = triplet_tables(hierarchy, e_a.device)
    ct = e_a.dtype
    psi = tt.leaf_distance
    cls = chosen.slot_cls
    margin = base_margin + (psi[cls, chosen.negative_cls] - psi[cls, chosen.positive_cls]).to(ct) / (
        2.0 * hierarchy.max_depth)
    d_ap = 1.0 - (e_a * e_p).sum(dim=1)
    d_an = 1.0 - (e_a * e_n).sum(dim=1)
    per_triplet = torch.where(chosen.valid, torch.relu(d_ap - d_an + margin), 0.0)
    T = chosen.T
    # Class by class in slot order (index_add_ on the CPU adds in index order: unused slots, all in
    # the sentinel class K, add nothing to the real classes).
    per_class = torch.zeros(T.numel(), dtype=ct, device=e_a.device).index_add_(0, cls, per_triplet)
    has = T > 0
    # The mean over classes sums all K + 1 class means, 0 where a class has no triplet: the same
    # numbers as summing only the classes with triplets, but torch's vectorised sum may associate
    # them differently, so the value can differ from that in the last bit (the gradient cannot).
    class_mean = torch.where(has, per_class / T.clamp(min=1).to(ct), 0.0)
    return class_mean.sum() / has.sum().clamp(min=1).to(ct)


def fused_triplet(backend: str, embeddings: torch.Tensor, hierarchy: Hierarchy, gathered: bool) -> bool:
    """Whether the triplet loss runs on the fused kernels: asked for, or ``"auto"`` where
    :mod:`.route` picks them, the triplets are not gathered across ranks and deterministic
    algorithms are off (the kernels accumulate the gradient with atomic adds)."""
    if backend == "triton":
        if gathered:
            raise ValueError("backend='triton' does not gather triplets across ranks; use backend='auto'")
        kernels = route.kernels()
        if not kernels.triplet_supported(hierarchy, embeddings):
            reason = kernels.triplet.unsupported_reason(hierarchy, tuple(embeddings.shape))
            raise ValueError(f"backend='triton': {reason}")
        return True
    if backend != "auto" or gathered or torch.are_deterministic_algorithms_enabled():
        return False
    return route.use_triton(backend, embeddings) and route.kernels().triplet_supported(hierarchy, embeddings)


def leaf_labels(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int, size: tuple[int, ...]) -> torch.Tensor:
    """``[B, h, w]`` leaf ids of node-id ``labels`` resampled (nearest) to the embeddings' ``size``, -1
    where the pixel takes no part (ignored, or a partial label). Nearest resampling is a gather, so it
    commutes with the label mapping: only the embedding-sized labels are mapped."""
    small, _ = label_channels(resize_labels_nearest(labels, size), hierarchy, ignore_index, check=False)
    node_ids = device_plan(hierarchy, labels.device).node_ids
    leaf = torch.where(small >= 0, node_ids[small.clamp(min=0)], torch.full_like(small, -1))
    return torch.where(leaf < hierarchy.num_leaves, leaf, torch.full_like(leaf, -1))

# ---------------------------------------------------------------------------- across ranks
# The rule (one global batch of all ranks' pixels in rank order) is written in hieraloss.torch.distributed,
# the public face of these two functions.
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


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, max_per_class: int,
                 base_margin: float, sampling: str, generator: Any, ignore_index: int, gather_across_ranks: bool,
                 process_group: Any, backend: str, scale: float) -> tuple[torch.Tensor, bool]:
    """``(loss, scaled)`` of checked inputs: the fused kernels (the loss times ``scale``, ``scaled``
    True), the cross-rank op where ``gather_across_ranks`` and more than one rank of ``process_group``
    take part, or :func:`triplet_op` (both unscaled, ``scaled`` False). The fused kernels do not
    gather: ``backend="triton"`` refuses to."""
    gathered = gather_across_ranks and is_distributed(process_group)
    options = dict(max_per_class=max_per_class, base_margin=base_margin, sampling=sampling, generator=generator)
    if gathered and backend != "triton":
        leaf = leaf_labels(labels, hierarchy, ignore_index, tuple(embeddings.shape[2:]))
        return gathered_triplet_op(embeddings, leaf, hierarchy, process_group=process_group, **options), False
    if fused_triplet(backend, embeddings, hierarchy, gathered):
        kernels = route.kernels()
        codes = kernels.triplet_codes(labels, hierarchy, ignore_index=ignore_index, size=tuple(embeddings.shape[2:]))
        order = key_order(codes, sampling, generator) if sampling == "random" else None
        return kernels.fused_triplet_loss(embeddings, codes, hierarchy, max_per_class=max_per_class,
                                          base_margin=base_margin, order=order, scale=scale), True
    leaf = leaf_labels(labels, hierarchy, ignore_index, tuple(embeddings.shape[2:]))
    return triplet_op(embeddings, leaf, hierarchy, **options), False
