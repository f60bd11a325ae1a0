"""The hierarchy triplet loss in paddle ops: eager (triplets chosen on the host by the core rule) and
inside a static program (chosen with paddle ops), and its routing to the fused kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F

from ...core import triplets as _triplets
from ...core.triplets import numpy_generator
from ...hierarchy import Hierarchy
from .. import _bridge
from .._tables import PlaceTables, building_program, place_of, tables_for, vec
from . import collective, route
from .device import NORM_EPS, compute_dtype
from .labels import label_channels


def resize_labels_nearest(labels: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """Nearest resampling of ``[B, H, W]`` with the reference rule (``hieraloss.numpy``)."""
    out = labels
    for axis, (n_in, n_out) in enumerate(zip(labels.shape[1:], size, strict=True), start=1):
        if n_in == n_out:
            continue
        src = np.floor(np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out)))
        index = paddle.to_tensor(np.minimum(src.astype(np.int64), n_in - 1), place=place_of(labels))
        out = paddle.index_select(out, index, axis=axis)
    return out


def triplet_op(embeddings, leaf, hierarchy, *, max_per_class, base_margin, sampling, generator):
    """Hierarchy-margin triplet loss; ``leaf`` is a host ``[B, h, w]`` array of leaf ids (-1 elsewhere).

    Triplets are chosen on the host by the core rule (:mod:`hieraloss.core.triplets`; ``generator``
    a numpy Generator, so an int seed gives the triplets of every backend); the distances are
    paddle ops, so autograd reaches ``embeddings``.
    """
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[:2]
    flat = np.asarray(leaf).reshape(-1)
    keys = _triplets.key_order(flat, sampling, generator)
    ai, pi, ni, ac, pc, nc = _triplets.select_triplets(flat, keys, hierarchy, max_per_class)
    if ai.size == 0:
        flat = embeddings.reshape([-1])[:1]
        return (
            paddle.where(paddle.zeros_like(flat, dtype="bool"), flat, paddle.zeros_like(flat))
            .sum()
            .astype(ct)
        )
    emb = embeddings.astype(ct).reshape([B, C, -1]).transpose([0, 2, 1]).reshape([-1, C])
    place = place_of(embeddings)
    index = paddle.to_tensor(np.concatenate([ai, pi, ni]), place=place)
    rows = paddle.index_select(emb, index)
    rows = rows / paddle.clip(paddle.sqrt((rows * rows).sum(axis=1, keepdim=True)), min=NORM_EPS)
    t = ai.size
    e_a, e_p, e_n = rows[:t], rows[t : 2 * t], rows[2 * t :]
    margin = paddle.to_tensor(_triplets.margins(hierarchy, ac, pc, nc, base_margin), place=place).astype(ct)
    per = F.relu((1.0 - (e_a * e_p).sum(axis=1)) - (1.0 - (e_a * e_n).sum(axis=1)) + margin)
    classes, inverse, per_class = np.unique(ac, return_inverse=True, return_counts=True)
    weight = 1.0 / (per_class[inverse] * classes.size)  # mean per class, then over classes
    return (per * paddle.to_tensor(weight, place=place).astype(ct)).sum()


def _triplet_tables(tab: PlaceTables, hierarchy: Hierarchy) -> dict[str, paddle.Tensor]:
    """The selection's tables (as ``hieraloss.torch.ops.triplet.TripletTables``): ``group [K + 1]`` (sibling group of
    each leaf, G for the sentinel class K), ``class_ids [K + 2]``, ``group_ids [G + 2]`` and the
    flattened ``leaf_distance [(K + 1)**2]`` (0 in the sentinel row and column)."""
    K = hierarchy.num_leaves
    group = _triplets.sibling_groups(hierarchy)
    G = int(group.max()) + 1 if K else 0
    psi = np.zeros((K + 1, K + 1))
    psi[:K, :K] = hierarchy.leaf_distance
    return {
        "group": tab.get("triplet_group", lambda: np.append(group, G).astype(np.int64)),
        "class_ids": tab.get("triplet_class_ids", lambda: np.arange(K + 2, dtype=np.int64)),
        "group_ids": tab.get("triplet_group_ids", lambda: np.arange(G + 2, dtype=np.int64)),
        "psi": tab.get("triplet_psi", lambda: psi.reshape(-1)),
    }


def _partition_order(mask: paddle.Tensor) -> paddle.Tensor:
    """The positions where ``mask`` holds in ascending order, then the others in ascending order."""
    ahead = paddle.cumsum(mask.astype("int64"), axis=0)
    idx = paddle.arange(mask.shape[0], dtype="int64")
    slot = paddle.where(mask, ahead - 1, idx - ahead + ahead[-1:])
    return paddle.put_along_axis(paddle.zeros_like(idx), slot, idx, axis=0)


def _ith_outside(members_pos, rank, seg_of_member, seg_start, seg_of_query, i, stride):
    """As ``hieraloss.torch.ops.triplet._ith_outside``: the position of the i-th element outside a segment."""
    key = members_pos - rank + seg_of_member * stride
    found = paddle.searchsorted(key, i + seg_of_query * stride, right=True) - paddle.gather(seg_start, seg_of_query)
    return i + found


def triplet_program_op(embeddings, label_channels, hierarchy, *, max_per_class, base_margin, sampling):
    """The triplet loss inside a static program (``to_static(full_graph=True)``), where nothing is
    read back: the selection of ``hieraloss.torch.ops.triplet.triplet_select`` in paddle ops, on fixed-size slots
    ``S = min(K * max_per_class, P)``, and the score of ``hieraloss.torch.ops.triplet.triplet_score``. The same
    triplets as the eager path for ``sampling="first"``; ``"random"`` orders the taking-part pixels by
    float64 keys drawn from paddle's generator in the program (not the numpy draw of an int seed;
    ties keep flat order)."""
    tab = tables_for(hierarchy, place_of(embeddings))
    tt = _triplet_tables(tab, hierarchy)
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[:2]
    small = resize_labels_nearest(label_channels, embeddings.shape[2:])
    safe = paddle.clip(small, min=0).reshape([-1])
    is_leaf = (small.reshape([-1]) >= 0) & paddle.gather(vec(tab, "is_leaf"), safe)
    flat = paddle.where(is_leaf, paddle.gather(vec(tab, "node_ids"), safe), paddle.full_like(safe, -1))
    K, P = hierarchy.num_leaves, flat.shape[0]
    S, stride, last = min(K * max_per_class, P), P + 1, P - 1
    if sampling == "first":
        pixels = _partition_order(flat >= 0)
    else:
        keys = paddle.rand([P], dtype="float64")  # in [0, 1); the others sort after them at 2
        pixels = paddle.argsort(paddle.where(flat >= 0, keys, paddle.full_like(keys, 2.0)), stable=True)
    seq_cls = paddle.gather(flat, pixels)
    seq_cls = paddle.where(seq_cls >= 0, seq_cls, paddle.full_like(seq_cls, K))
    seq_grp = paddle.gather(tt["group"], seq_cls)
    by_cls = paddle.argsort(seq_cls, stable=True)
    by_grp = paddle.argsort(seq_grp, stable=True)
    cls_sorted, grp_sorted = paddle.gather(seq_cls, by_cls), paddle.gather(seq_grp, by_grp)
    cls_bound = paddle.searchsorted(cls_sorted, tt["class_ids"])
    grp_bound = paddle.searchsorted(grp_sorted, tt["group_ids"])
    cls_start, grp_start = cls_bound[:-1], grp_bound[:-1]
    n_cls, n_grp = cls_bound[1:] - cls_start, grp_bound[1:] - grp_start
    grp_of_cls = paddle.gather(n_grp, tt["group"])
    n_neg = cls_bound[K] - grp_of_cls
    T = paddle.clip(paddle.minimum(paddle.minimum(n_cls, grp_of_cls - n_cls), n_neg), 0, max_per_class)
    ends = paddle.cumsum(T, axis=0)
    slot = paddle.arange(S, dtype="int64")
    slot_cls = paddle.clip(paddle.searchsorted(ends, slot, right=True), max=K)
    slot_i = slot - paddle.gather(ends - T, slot_cls)
    slot_grp = paddle.gather(tt["group"], slot_cls)
    a_at = paddle.gather(by_cls, paddle.clip(paddle.gather(cls_start, slot_cls) + slot_i, max=last))
    idx = paddle.arange(P, dtype="int64")
    grp_rank = idx - paddle.gather(grp_start, grp_sorted)
    n_at = paddle.clip(_ith_outside(by_grp, grp_rank, grp_sorted, grp_start, slot_grp, slot_i, stride), max=last)
    in_grp = paddle.put_along_axis(paddle.zeros_like(idx), by_grp, grp_rank, axis=0)
    cls_rank = idx - paddle.gather(cls_start, cls_sorted)
    pos_local = _ith_outside(paddle.gather(in_grp, by_cls), cls_rank, cls_sorted, cls_start, slot_cls, slot_i,
                             stride)
    p_at = paddle.gather(by_grp, paddle.clip(paddle.gather(grp_start, slot_grp) + pos_local, max=last))
    emb = embeddings.astype(ct).reshape([B, C, -1]).transpose([0, 2, 1]).reshape([-1, C])

    def unit_rows(at):
        rows = paddle.gather(emb, paddle.gather(pixels, at))
        return rows / paddle.clip(paddle.sqrt((rows * rows).sum(axis=1, keepdim=True)), min=NORM_EPS)

    e_a, e_p, e_n = unit_rows(a_at), unit_rows(p_at), unit_rows(n_at)
    p_cls, n_cls_of = paddle.gather(seq_cls, p_at), paddle.gather(seq_cls, n_at)
    psi = tt["psi"]
    margin = base_margin + (paddle.gather(psi, slot_cls * (K + 1) + n_cls_of)
                            - paddle.gather(psi, slot_cls * (K + 1) + p_cls)).astype(ct) / (2.0 * hierarchy.max_depth)
    per = F.relu((1.0 - (e_a * e_p).sum(axis=1)) - (1.0 - (e_a * e_n).sum(axis=1)) + margin)
    per = paddle.where(slot_cls < K, per, paddle.zeros_like(per))
    per_class = paddle.put_along_axis(paddle.zeros([K + 1], dtype=ct), slot_cls, per, axis=0, reduce="add")
    has = T > 0
    class_mean = paddle.where(has, per_class / paddle.clip(T, min=1).astype(ct), paddle.zeros_like(per_class))
    return class_mean.sum() / paddle.clip(has.astype("int64").sum(), min=1).astype(ct)


def fused_triplet(backend: str, x: paddle.Tensor, hierarchy: Hierarchy, gathered: bool) -> bool:
    """Whether the triplet loss runs on the fused kernels: asked for, or ``"auto"`` on a GPU where they
    run and take the tree, unless the triplets are gathered across ranks or deterministic kernels were
    asked for (the kernels add their gradient with atomic adds)."""
    if backend == "triton":
        reason = _bridge.unavailable_reason(x)
        if reason:
            raise RuntimeError(f"backend='triton' was asked for, but {reason}")
        if gathered:
            raise ValueError("backend='triton' does not gather triplets across ranks; use backend='auto'")
        reason = _bridge.triplet_unsupported_reason(x, hierarchy)
        if reason:
            raise ValueError(f"backend='triton': {reason}")
        return True
    if backend != "auto" or gathered or not route.is_gpu(x) or route.deterministic():
        return False
    return _bridge.unavailable_reason(x) is None and _bridge.triplet_unsupported_reason(x, hierarchy) is None


def triplet_loss(embeddings: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, *, max_per_class: int,
                 base_margin: float, sampling: str, generator: Any, ignore_index: int, gathered: bool,
                 process_group: Any, check_labels: bool, backend: str, scale: float) -> tuple[paddle.Tensor, bool]:
    """``(loss, scaled)`` of checked inputs (``generator`` an int seed, a numpy Generator or None):
    the static program's op, the fused kernels (the loss times ``scale``, ``scaled`` True), the
    cross-rank op (``gathered``) or :func:`triplet_op` (unscaled, ``scaled`` False)."""
    rng = numpy_generator(generator) if sampling == "random" else None
    if building_program():
        if gathered or (sampling == "random" and generator is not None):
            raise NotImplementedError(
                "inside paddle.jit.to_static(full_graph=True) the triplet term draws its random order with "
                "paddle's generator and does not gather across ranks: pass generator=None and "
                "gather_across_ranks=False there, or use the default SOT mode (full_graph=False)")
        lc, _ = label_channels(labels, hierarchy, ignore_index, check_labels)
        return triplet_program_op(embeddings, lc, hierarchy, max_per_class=max_per_class, base_margin=base_margin,
                                  sampling=sampling), False
    if fused_triplet(backend, embeddings, hierarchy, gathered) and embeddings.size > 0:
        if check_labels:  # raises LabelError for a bad value (one read-back); the channels are not needed
            label_channels(labels, hierarchy, ignore_index, True)
        return _bridge.fused_triplet_loss(
            embeddings, labels, hierarchy, ignore_index=ignore_index, max_per_class=max_per_class,
            base_margin=base_margin, sampling=sampling, generator=rng, scale=scale), True
    lc, _ = label_channels(labels, hierarchy, ignore_index, check_labels)
    small = resize_labels_nearest(lc, embeddings.shape[2:]).numpy()  # host copy at the embedding resolution
    is_leaf = (small >= 0) & hierarchy.is_leaf[np.maximum(small, 0)]
    leaf = np.where(is_leaf, hierarchy.node_ids[np.maximum(small, 0)], -1)
    options = dict(max_per_class=max_per_class, base_margin=base_margin, sampling=sampling, generator=rng)
    if gathered:
        return collective.gathered_triplet_op(embeddings, leaf, hierarchy, process_group=process_group,
                                              **options), False
    return triplet_op(embeddings, leaf, hierarchy, **options), False
