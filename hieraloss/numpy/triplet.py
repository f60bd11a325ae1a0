"""Hierarchy-margin triplet loss (SPEC section 6) in numpy (forward only).

For each present anchor leaf class c (ascending id) with a present sibling class and a present
negative class: anchors are pixels of c, positives pixels of c's sibling leaves (same parent; the
implicit root counts as a parent), negatives pixels of leaves under another parent. With
``T = min(max_per_class, #anchors, #positives, #negatives)`` the i-th chosen anchor, positive and
negative form a triplet with margin ``m = m0 + (psi(c, c_n) - psi(c, c_p)) / (2 L)``; the class loss
is ``mean relu(d(a, p) - d(a, n) + m)`` with ``d(a, b) = 1 - <a, b>`` on L2-normalised embeddings,
and the total is the mean over classes that had triplets (0 when none).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..core import triplets as _core
from ..core.checks import (
    check_choice,
    check_embeddings_shape,
    check_hierarchy,
    check_ignore_index,
    check_max_per_class,
    check_triplet_label_shape,
    dtype_name,
    logits_dtype_error,
)
from ..core.rules import hssn_weights as hssn_weights  # the rules live in hieraloss.core.rules
from ..core.rules import triplet_weight as triplet_weight
from ..core.triplets import SAMPLING
from ..hierarchy import Hierarchy, LabelError
from .losses import check_label_dtype, compute_dtype

__all__ = [
    "triplet_margin",
    "sample_triplets",
    "resize_labels_nearest",
    "hierarchy_triplet_loss",
    "triplet_weight",
]

NORM_EPS = 1e-12


def _leaf_ids(values: Any, h: Hierarchy, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise LabelError(f"{name} must be integer leaf ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= h.num_leaves)
    if bad.any():
        raise LabelError(
            f"{name} must be leaf ids 0..{h.num_leaves - 1}; got {np.unique(arr[bad])[:10].tolist()}"
        )
    return arr.astype(np.int64)


def triplet_margin(
    hierarchy: Hierarchy,
    anchor_classes: Any,
    positive_classes: Any,
    negative_classes: Any,
    base_margin: float = 0.1,
) -> np.ndarray:
    """``base_margin + (psi(a, n) - psi(a, p)) / (2 * max_depth)`` elementwise over leaf-id arrays."""
    check_hierarchy(hierarchy)
    a = _leaf_ids(anchor_classes, hierarchy, "anchor_classes")
    p = _leaf_ids(positive_classes, hierarchy, "positive_classes")
    n = _leaf_ids(negative_classes, hierarchy, "negative_classes")
    return _core.margins(hierarchy, a, p, n, base_margin)


def _check_sampling(max_per_class: Any, sampling: Any, generator: Any) -> None:
    check_choice(sampling, SAMPLING, "sampling")
    check_max_per_class(max_per_class)
    if not _core.is_seed(generator):
        raise _core.generator_type_error(generator)


def sample_triplets(
    labels: Any,
    hierarchy: Hierarchy,
    *,
    max_per_class: int = 200,
    sampling: str = "random",
    generator: Any = None,
    ignore_index: int = 255,
) -> tuple[np.ndarray, ...]:
    """Triplets from a label map ``[B, *spatial]`` (already at the embedding resolution).

    Returns ``(anchor_idx, positive_idx, negative_idx, anchor_class, positive_class, negative_class)``:
    int64 flat indices into the ``(b, *spatial)`` flattening and the leaf ids there. Only leaf labels
    take part (ignore and partial labels are dropped). The rule is :mod:`hieraloss.core.triplets`:
    ``sampling="first"`` takes the first T of each set in memory order; ``"random"`` permutes the
    taking-part pixels once with ``generator`` (an int seed, a numpy Generator, or None for fresh
    entropy; :func:`hieraloss.core.triplets.random_order`) and takes the first T of each set in that
    order, so an int seed gives the same triplets in every backend.
    """
    check_hierarchy(hierarchy)
    _check_sampling(max_per_class, sampling, generator)
    h = hierarchy
    ch = h.label_channels(labels, ignore_index).reshape(-1)
    is_leaf_pixel = (ch >= 0) & h.is_leaf[np.maximum(ch, 0)]
    leaf = np.where(is_leaf_pixel, h.node_ids[np.maximum(ch, 0)], -1)
    keys = _core.key_order(leaf, sampling, generator)
    return _core.select_triplets(leaf, keys, h, int(max_per_class))


def resize_labels_nearest(labels: Any, size: Any) -> np.ndarray:
    """Nearest resampling of ``labels [B, *spatial]`` to ``size`` with torch's rule
    (``F.interpolate(mode="nearest")``): ``src = min(floor(dst * float32(in / out)), in - 1)``,
    evaluated in float32 exactly as torch does (it differs from exact ``floor(dst * in / out)``
    for some sizes)."""
    lab = np.asarray(labels)
    spatial = lab.shape[1:]
    size = (size,) * len(spatial) if isinstance(size, numbers.Integral) else tuple(int(s) for s in size)
    if lab.ndim < 2 or len(size) != len(spatial) or any(s < 1 for s in size):
        raise ValueError(f"cannot resize labels of shape {lab.shape} to size {size}")
    out = lab
    for axis, (n_in, n_out) in enumerate(zip(spatial, size, strict=False), start=1):
        if n_in == n_out:
            continue
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        out = np.take(out, np.minimum(src, n_in - 1), axis=axis)
    return out.copy() if out is lab else out


def hierarchy_triplet_loss(
    embeddings: Any,
    labels: Any,
    hierarchy: Hierarchy,
    *,
    max_per_class: int = 200,
    base_margin: float = 0.1,
    sampling: str = "random",
    generator: Any = None,
    ignore_index: int = 255,
) -> np.floating:
    """Triplet loss of ``embeddings [B, C, h, w]`` for node-id ``labels [B, H, W]`` (resampled nearest
    to ``h x w``). Returns a scalar (exact 0 when no triplet). ``generator``: an int seed (the same
    triplets as every backend draws for it), a numpy Generator or None (fresh entropy)."""
    check_hierarchy(hierarchy)
    e = np.asarray(embeddings)
    if e.dtype not in (np.float16, np.float32, np.float64):
        raise logits_dtype_error(dtype_name(e.dtype), "embeddings")
    check_embeddings_shape(e.shape)
    lab = check_label_dtype(labels)
    check_triplet_label_shape(lab.shape, e.shape)
    _check_sampling(max_per_class, sampling, generator)
    ignore_index = check_ignore_index(hierarchy, ignore_index)
    hierarchy.label_channels(lab, ignore_index)  # value check at full resolution
    cdt = compute_dtype(e.dtype)
    small = resize_labels_nearest(lab, e.shape[2:])
    ai, pi, ni, ac, pc, nc = sample_triplets(
        small,
        hierarchy,
        max_per_class=max_per_class,
        sampling=sampling,
        generator=generator,
        ignore_index=ignore_index,
    )
    if ai.size == 0:
        return cdt.type(0)
    flat = np.moveaxis(e.astype(cdt), 1, -1).reshape(-1, e.shape[1])
    flat = flat / np.maximum(np.sqrt((flat * flat).sum(axis=1, keepdims=True)), cdt.type(NORM_EPS))
    d_ap = 1 - (flat[ai] * flat[pi]).sum(axis=1)
    d_an = 1 - (flat[ai] * flat[ni]).sum(axis=1)
    margin = triplet_margin(hierarchy, ac, pc, nc, base_margin).astype(cdt)
    per = np.maximum(d_ap - d_an + margin, 0)
    classes, inverse = np.unique(ac, return_inverse=True)
    class_mean = np.bincount(inverse, weights=per) / np.bincount(inverse)
    return cdt.type(class_mean.mean())
