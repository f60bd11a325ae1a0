"""Hypothesis strategies and assertions for testing code that uses a :class:`Hierarchy`.

Requires ``hypothesis`` (``pip install hieraloss[testing]``)::

    from hypothesis import given
    from hieraloss.testing import hierarchies, label_maps

    @given(data=st.data())
    def test_mine(data):
        h = data.draw(hierarchies(max_depth=3))
        labels = data.draw(label_maps(h, (2, 5, 7), ignore_fraction=0.2))
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from .hierarchy import Hierarchy

__all__ = ["hierarchies", "label_maps", "logits", "assert_consistent"]


@st.composite
def hierarchies(draw: Any, max_depth: int = 3, max_children: int = 4, balanced: bool | None = None,
                min_depth: int = 1, order: str | None = "default") -> Hierarchy:
    """Random trees.

    ``balanced=True``: every leaf at the same depth; ``False``: leaves at two or more depths
    (needs ``max_depth >= 2``); ``None``: either. ``order``: a channel layout passed to the
    Hierarchy, or ``None`` to draw one of default, coarse-to-fine and a random permutation.
    Leaf ids are assigned in a random order, so ids and tree positions are unrelated.
    """
    if balanced is False:
        min_depth = max(min_depth, 2)
        if max_depth < 2:
            raise ValueError("an unbalanced tree needs max_depth >= 2")
    target = draw(st.integers(min_depth, max_depth))
    is_balanced = draw(st.booleans()) if balanced is None else balanced
    # nodes: parent positions (-1 = root) and leaf flags, in creation order.
    parent: list[int] = []
    leaf: list[bool] = []

    def grow(p: int, d: int, limit: int, spine: bool, min_children: int = 1) -> None:
        n = draw(st.integers(min_children, max_children))
        for i in range(n):
            parent.append(p)
            me = len(parent) - 1
            # Unbalanced: the root's last child is a short branch ending above the spine's depth.
            sub_limit = limit
            if balanced is False and p < 0 and i == n - 1:
                sub_limit = draw(st.integers(1, target - 1))
            if d == sub_limit:
                leaf.append(True)
                continue
            on_spine = spine and i == 0
            if is_balanced or on_spine or draw(st.booleans()):
                leaf.append(False)
                grow(me, d + 1, sub_limit, on_spine)
            else:
                leaf.append(True)

    if balanced is False and max_children < 2:
        raise ValueError("an unbalanced tree needs max_children >= 2")
    grow(-1, 1, target, True, min_children=2 if balanced is False else 1)

    pos_leaves = [i for i, lf in enumerate(leaf) if lf]
    pos_internal = [i for i, lf in enumerate(leaf) if not lf]
    k = len(pos_leaves)
    leaf_ids = draw(st.permutations(range(k)))
    new_id = {pos: int(lid) for pos, lid in zip(pos_leaves, leaf_ids, strict=True)}
    new_id.update({pos: k + j for j, pos in enumerate(pos_internal)})
    parents = [0] * len(parent)
    for pos, p in enumerate(parent):
        parents[new_id[pos]] = new_id[p] if p >= 0 else -1
    names = [f"n{i}" for i in range(len(parent))]
    if order is None:
        kind = draw(st.sampled_from(["default", "coarse_to_fine", "random"]))
        chosen: Any = kind if kind != "random" else list(draw(st.permutations(range(len(parent)))))
    else:
        chosen = order
    return Hierarchy.from_parents(parents, names, order=chosen)


def _shape(draw: Any, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, st.SearchStrategy):
        shape = draw(shape)
    return tuple(int(s) for s in shape)


@st.composite
def label_maps(draw: Any, hierarchy: Hierarchy, shape: Any, ignore_fraction: float | None = 0.0,
               partial_fraction: float | None = 0.0, ignore_index: int = 255,
               dtype: Any = np.int64) -> np.ndarray:
    """Label arrays of node ids with the given shape (``[B, *spatial]``, or a strategy for it).

    Each pixel is ignored with probability ``ignore_fraction``, else holds an internal node id
    (a partial label) with probability ``partial_fraction``, else a leaf id. ``None`` for
    either fraction draws it from [0, 0.5].
    """
    shape = _shape(draw, shape)
    ig = draw(st.floats(0, 0.5)) if ignore_fraction is None else ignore_fraction
    pa = draw(st.floats(0, 0.5)) if partial_fraction is None else partial_fraction
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k, n = hierarchy.num_leaves, hierarchy.num_nodes
    labels = rng.integers(0, k, size=shape)
    if n > k and pa > 0:
        partial = rng.random(shape) < pa
        labels = np.where(partial, rng.integers(k, n, size=shape), labels)
    if ig > 0:
        labels = np.where(rng.random(shape) < ig, ignore_index, labels)
    return labels.astype(dtype)


@st.composite
def logits(draw: Any, hierarchy: Hierarchy, shape: Any, scale: float = 4.0, dtype: Any = np.float64,
           ties: bool = False) -> np.ndarray:
    """Logits ``[B, N, *spatial]`` for a label shape ``[B, *spatial]``; ``ties=True`` rounds them
    to a few values so that min/max ties are common."""
    shape = _shape(draw, shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = rng.normal(0.0, scale, size=(shape[0], hierarchy.num_nodes, *shape[1:]))
    if ties:
        out = np.round(out / scale)
    return out.astype(dtype)


def assert_consistent(per_depth_labels: Any, hierarchy: Hierarchy, ignore_index: int = 255) -> None:
    """Assert that every pixel of ``[B, L, *spatial]`` per-depth node-id maps is a path of the tree
    (pixels that are ``ignore_index`` at every depth are skipped)."""
    if hasattr(per_depth_labels, "detach"):  # a torch tensor, possibly on a GPU: never np.asarray it there
        lab = per_depth_labels.detach().cpu().numpy()
    else:
        lab = np.asarray(per_depth_labels)
    ok = hierarchy.consistent_mask(lab, ignore_index)
    all_ignored = (lab.astype(np.int64) == ignore_index).all(axis=1)
    bad = ~ok & ~all_ignored
    if bad.any():
        where = np.argwhere(bad)[0]
        idx = (where[0], slice(None), *where[1:])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} pixels are not a path of the tree; first at "
            f"{tuple(int(w) for w in where)}: per-depth labels {lab[idx].tolist()}"
        )


