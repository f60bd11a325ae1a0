"""Hierarchical cross-entropy against a port of the authors' released code.

Reference: Bertinetto et al., "Making Better Mistakes", CVPR 2020, released as
fiveai/making-better-mistakes: ``better_mistakes/trees.py`` (``get_exponential_weighting``) and
``better_mistakes/model/losses.py`` (``HierarchicalLLLoss``, ``HierarchicalCrossEntropyLoss``).
The port below rebuilds their construction on tree positions (tuples of child indices, the root
being ``()``) without nltk: a weight per position ``exp(-alpha * len(position))``, optionally divided
by the sum over every position (root included); per class, one-hot numerator and denominator
matrices over the edges of its root path, and ``mean_b sum_j w_j * -log(num_j / den_j)`` over the
softmax probabilities. One release bug is fixed in the port: the root-level denominator is put at the
last edge of each class's own path (the release uses a loop variable that is stale for a class whose
path has a single edge, a leaf directly under the root).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import hieraloss.numpy as hnp
from hieraloss import Hierarchy, presets
from hieraloss.testing import hierarchies

torch = pytest.importorskip("torch")


def tree_positions(h: Hierarchy) -> dict[int, tuple[int, ...]]:
    """The position of every channel: the child indices along its root path."""
    out: dict[int, tuple[int, ...]] = {}
    tops = [c for c in range(h.num_nodes) if h.parent[c] < 0]
    stack = [(c, (i,)) for i, c in enumerate(tops)]
    while stack:
        c, pos = stack.pop()
        out[c] = pos
        stack += [(int(k), pos + (i,)) for i, k in enumerate(h.children[c])]
    return out


def published_weights(positions: list[tuple[int, ...]], alpha: float, normalize: bool) -> dict:
    """get_exponential_weighting: every position, the root included, weighs exp(-alpha * depth)."""
    weights = {p: math.exp(-alpha * len(p)) for p in [(), *positions]}
    if normalize:
        total = math.fsum(weights.values())
        weights = {p: w / total for p, w in weights.items()}
    return weights


class PublishedHXE:
    """HierarchicalCrossEntropyLoss as released (numerators, denominators and weights per class as
    [K, K, E] one-hot tensors, then bmm), on float64 tensors."""

    def __init__(self, h: Hierarchy, alpha: float, normalize: bool):
        pos = tree_positions(h)
        leaf_pos = [pos[int(h.leaf_channels[k])] for k in range(h.num_leaves)]  # classes in leaf-id order
        edges = sorted(pos.values())
        weights = published_weights(edges, alpha, normalize)
        edge_index = {p: i for i, p in enumerate(edges)}
        leaf_index = {p: k for k, p in enumerate(leaf_pos)}
        k_count = len(leaf_pos)
        paths = [[edge_index[p[:i]] for i in range(len(p), 0, -1)] for p in leaf_pos]  # leaf edge first
        num_edges = max(len(p) for p in paths)
        under = [[leaf_index[q] for q in leaf_pos if q[:len(e)] == e] for e in edges]
        self.num = torch.zeros(k_count, k_count, num_edges, dtype=torch.float64)
        self.den = torch.zeros(k_count, k_count, num_edges, dtype=torch.float64)
        self.w = torch.zeros(k_count, num_edges, dtype=torch.float64)
        for i in range(k_count):
            for j, e in enumerate(paths[i]):
                self.num[i, under[e], j] = 1.0
                self.w[i, j] = weights[edges[e]]
            for j, e in enumerate(paths[i][1:]):
                self.den[i, under[e], j] = 1.0
            self.den[i, :, len(paths[i]) - 1] = 1.0  # the root: every leaf

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, 1).unsqueeze(1)
        num = torch.bmm(p, self.num[target]).squeeze(1)
        den = torch.bmm(p, self.den[target]).squeeze(1)
        nz = num != 0
        num[nz] = -torch.log(num[nz] / den[nz])
        return torch.sum(torch.flip(self.w[target] * num, dims=[1]), dim=1).mean()


def _check(h: Hierarchy, alpha: float, normalize: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(12, h.num_leaves))
    target = rng.integers(0, h.num_leaves, size=12)
    want = float(PublishedHXE(h, alpha, normalize)(torch.from_numpy(logits), torch.from_numpy(target)))
    got = float(hnp.hierarchical_cross_entropy(logits, target, h, alpha=alpha, normalize=normalize))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    import hieraloss.torch as ht

    got_torch = float(ht.hierarchical_cross_entropy(torch.from_numpy(logits), torch.from_numpy(target), h,
                                                    alpha=alpha, normalize=normalize))
    assert got_torch == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["cityscapes", "mapillary_vistas_v2", "pascal_person_part"])
@pytest.mark.parametrize("alpha, normalize", [(0.1, False), (0.5, True), (0.0, False), (0.9, True)])
def test_presets_equal_the_published_loss(name, alpha, normalize):
    _check(presets.get(name), alpha, normalize, seed=0)


@given(h=hierarchies(max_depth=4, balanced=None), alpha=st.sampled_from([0.1, 0.4, 1.0]),
       normalize=st.booleans(), seed=st.integers(0, 2**31))
def test_random_balanced_and_unbalanced_trees_equal_the_published_loss(h, alpha, normalize, seed):
    _check(h, alpha, normalize, seed)


def test_the_height_form_differs_from_the_published_one():
    h = presets.cityscapes()
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, h.num_leaves))
    target = rng.integers(0, h.num_leaves, size=8)
    depth = hnp.hierarchical_cross_entropy(logits, target, h, alpha=0.5)
    height = hnp.hierarchical_cross_entropy(logits, target, h, alpha=0.5, weighting="height")
    assert not math.isclose(float(depth), float(height), rel_tol=1e-3)
    with pytest.raises(ValueError, match="weighting must be one of"):
        hnp.hierarchical_cross_entropy(logits, target, h, weighting="published")
