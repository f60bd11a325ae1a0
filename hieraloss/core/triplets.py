"""The triplet selection rule, written once for every backend (numpy only; imports no backend).

Rule (DEVELOPING.md, "Triplet loss"). Only leaf pixels take part. The taking-part pixels are put in
a *key order*: flat ``(b, i, j)`` order for ``sampling="first"``, that order permuted by
:func:`random_order` for ``sampling="random"``. Per anchor class c (ascending leaf id) with a
present sibling class and a present negative class: anchors = its pixels, positives = pixels of its
sibling leaves (same parent; the implicit root counts as a parent), negatives = pixels of leaves
under another parent, each set in key order; ``T = min(max_per_class, #anchors, #positives,
#negatives)`` and the i-th triplet pairs the i-th anchor, positive and negative.

Seeds. ``generator`` is an int seed, a ``numpy.random.Generator`` or None (fresh entropy):
:func:`numpy_generator` turns it into a numpy Generator and :func:`random_order` draws the one
permutation of the ``n`` taking-part pixels from it (``Generator.permutation(n)``). Every backend
draws that permutation here for an int seed or a numpy Generator, so the same seed gives the same
triplets in numpy, torch and paddle. A framework's own generator (a ``torch.Generator``) gives that
framework's draw instead (``torch.randperm``), with the same selection on the permuted order.

:func:`select_triplets` is the selection on the host (the numpy and paddle backends use it); the
torch op implements the same rule with tensors and no host sync (``hieraloss.torch.ops.triplet``), and the
tests compare the chosen triplets of all three.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..hierarchy import Hierarchy

__all__ = ["SAMPLING", "is_seed", "numpy_generator", "generator_type_error", "random_order", "key_order",
           "sibling_groups", "select_triplets", "margins"]

SAMPLING = ("random", "first")


def generator_type_error(generator: Any, framework_generator: str | None = None) -> TypeError:
    """The error for a ``generator`` that is none of the accepted kinds (``framework_generator``
    names the backend's own generator class, e.g. ``"torch.Generator"``, when it takes one)."""
    kinds = "an int seed, a numpy Generator" + (f", a {framework_generator}" if framework_generator else "")
    return TypeError(f"generator must be {kinds} or None, got {type(generator).__name__}")


def is_seed(generator: Any) -> bool:
    """Whether ``generator`` is something :func:`numpy_generator` takes (None, an int, not a bool, or
    a numpy Generator)."""
    return (generator is None or isinstance(generator, np.random.Generator)
            or (isinstance(generator, numbers.Integral) and not isinstance(generator, bool)))


def numpy_generator(generator: Any, framework_generator: str | None = None) -> np.random.Generator:
    """A numpy Generator from an int seed (``default_rng(seed)``), a numpy Generator (itself: its
    state advances with each draw) or None (fresh entropy). Anything else raises
    :func:`generator_type_error`."""
    if isinstance(generator, np.random.Generator):
        return generator
    if not is_seed(generator):
        raise generator_type_error(generator, framework_generator)
    return np.random.default_rng(None if generator is None else int(generator))


def random_order(n: int, generator: Any) -> np.ndarray:
    """The random key order of ``n`` taking-part pixels: a permutation of ``range(n)`` (int64) drawn
    from ``generator`` (an int seed, a numpy Generator or None; see :func:`numpy_generator`)."""
    return numpy_generator(generator).permutation(int(n)).astype(np.int64, copy=False)


def key_order(leaf: np.ndarray, sampling: str, generator: Any = None) -> np.ndarray:
    """Flat positions of the taking-part pixels (``leaf >= 0`` in the flat leaf-id array ``leaf``) in
    key order: flat order (``"first"``), or flat order permuted by :func:`random_order` (``"random"``;
    one draw from ``generator``, also when there is no taking-part pixel)."""
    keys = np.flatnonzero(np.asarray(leaf).reshape(-1) >= 0)
    if sampling == "random":
        keys = keys[random_order(keys.size, generator)]
    return keys


def sibling_groups(hierarchy: Hierarchy) -> np.ndarray:
    """``[K]`` int64 sibling group of each leaf id: leaves sharing a parent (the implicit root counts
    as one) share a group; groups are numbered by ascending parent channel, the root (-1) first."""
    parent_of_leaf = np.asarray(hierarchy.parent)[np.asarray(hierarchy.leaf_channels)]
    return np.unique(parent_of_leaf, return_inverse=True)[1].reshape(-1).astype(np.int64)


def select_triplets(leaf: np.ndarray, keys: np.ndarray, hierarchy: Hierarchy,
                    max_per_class: int) -> tuple[np.ndarray, ...]:
    """The triplets of the flat leaf-id array ``leaf`` (-1 = not taking part) for the key order
    ``keys`` (from :func:`key_order`), by the rule of the module docstring.

    Returns ``(anchor, positive, negative, anchor_class, positive_class, negative_class)``: int64
    flat positions and their leaf ids, class after class (ascending), the i-th triplet of a class
    i-th in its run. No validation.
    """
    leaf = np.asarray(leaf).reshape(-1)
    keys = np.asarray(keys, dtype=np.int64)
    seq_leaf = leaf[keys].astype(np.int64)  # key order
    group = sibling_groups(hierarchy)
    seq_grp = group[seq_leaf]
    out: list[list[np.ndarray]] = [[] for _ in range(6)]
    for c in np.unique(seq_leaf).tolist():
        in_grp = seq_grp == group[c]
        is_c = seq_leaf == c
        anchors = keys[is_c]
        positives = keys[in_grp & ~is_c]
        negatives = keys[~in_grp]
        t = min(int(max_per_class), anchors.size, positives.size, negatives.size)
        if t == 0:
            continue
        for slot, idx in enumerate((anchors[:t], positives[:t], negatives[:t])):
            out[slot].append(idx)
            out[slot + 3].append(leaf[idx].astype(np.int64))
    return tuple(np.concatenate(o) if o else np.zeros(0, dtype=np.int64) for o in out)


def margins(hierarchy: Hierarchy, anchor_class: np.ndarray, positive_class: np.ndarray,
            negative_class: np.ndarray, base_margin: float) -> np.ndarray:
    """float64 ``base_margin + (psi(a, n) - psi(a, p)) / (2 * max_depth)`` elementwise over leaf-id
    arrays (psi = ``Hierarchy.leaf_distance``). No validation."""
    psi = hierarchy.leaf_distance
    return base_margin + (psi[anchor_class, negative_class] - psi[anchor_class, positive_class]) / (
        2.0 * hierarchy.max_depth)
