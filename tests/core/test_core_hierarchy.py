"""Hierarchy: tables against parent-pointer walks, psi as a metric, constructors, layouts, errors."""

from __future__ import annotations

import pickle

import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hieraloss import Hierarchy, HierarchyError, LabelError, presets
from hieraloss.testing import hierarchies, label_maps

any_tree = hierarchies(max_depth=4, max_children=3, order=None)


def walk(h, v):
    """A(v) root-first by following parent pointers."""
    out = []
    while v >= 0:
        out.append(int(v))
        v = h.parent[v]
    return out[::-1]


def kids(h, v):
    return [u for u in range(h.num_nodes) if h.parent[u] == v]


def preorder(h, v):
    out = [v]
    for c in kids(h, v):
        out += preorder(h, c)
    return out


def structure(h):
    """Layout-free description: leaf id -> names along its path, root-first."""
    return {k: tuple(h.node_names[c] for c in walk(h, int(h.leaf_channels[k]))) for k in range(h.num_leaves)}


# ---------------------------------------------------------------------------- tables
@given(any_tree)
def test_tables_agree_with_parent_walks(h):
    n, L = h.num_nodes, h.max_depth
    assert sorted(h.node_ids.tolist()) == list(range(n))
    np.testing.assert_array_equal(h.channel_of[h.node_ids], np.arange(n))
    for v in range(n):
        a = walk(h, v)
        assert h.depth[v] == len(a)
        assert h.ancestor_table[v].tolist() == a + [v] * (L - len(a))
        assert h.is_ancestor[:, v].tolist() == [u in a for u in range(n)]
        d = preorder(h, v)
        assert h.descendant_table[v, : len(d)].tolist() == d
        assert (h.descendant_table[v, len(d) :] == v).all()
        assert set(np.flatnonzero(h.is_ancestor[v]).tolist()) == set(d)
        c = kids(h, v)
        assert h.children[v].tolist() == c
        assert h.children_table[v, : len(c)].tolist() == c and (h.children_table[v, len(c) :] == v).all()
        assert bool(h.is_leaf[v]) == (not c) == (h.node_ids[v] < h.num_leaves)
    assert h.max_depth == int(h.depth.max())
    assert h.num_leaves == int(h.is_leaf.sum())


@given(any_tree)
def test_leaf_paths_are_root_to_leaf_paths(h):
    for k in range(h.num_leaves):
        ch = int(h.leaf_channels[k])
        assert h.channel_of[k] == ch and h.node_ids[ch] == k
        path = h.leaf_paths[k].tolist()
        depth = int(h.depth[ch])
        real = path[:depth]
        assert h.parent[real[0]] == -1 and real[-1] == ch
        assert all(h.parent[real[i]] == real[i - 1] for i in range(1, depth))
        assert path[depth:] == [ch] * (h.max_depth - depth)


@given(any_tree)
def test_depth_channels(h):
    for d in range(1, h.max_depth + 1):
        want = sorted(v for v in range(h.num_nodes) if h.depth[v] == d or (h.is_leaf[v] and h.depth[v] < d))
        assert h.depth_channels[d - 1].tolist() == want


@given(any_tree)
def test_psi_is_a_metric_and_matches_walks(h):
    psi = h.leaf_distance
    k = h.num_leaves
    t = oracle.tree(h)
    assert psi.shape == (k, k)
    np.testing.assert_array_equal(psi, psi.T)
    assert (np.diag(psi) == 0).all() and (psi[~np.eye(k, dtype=bool)] > 0).all()
    assert (psi[:, None, :] <= psi[:, :, None] + psi[None, :, :]).all()  # psi(a,c) <= psi(a,b) + psi(b,c)
    for a in range(k):
        for b in range(k):
            ca, cb = int(h.leaf_channels[a]), int(h.leaf_channels[b])
            assert psi[a, b] == h.psi(ca, cb) == t.psi(ca, cb)
            wa, wb = walk(h, ca), walk(h, cb)
            lca = sum(1 for x, y in zip(wa, wb, strict=False) if x == y)
            assert h.leaf_lca_height[a, b] == len(wa) - lca


@given(any_tree)
def test_height_and_node_leaf_distance_match_walks(h):
    t = oracle.tree(h)
    assert h.height.dtype == np.int64 and h.height.shape == (h.num_nodes,)
    assert h.node_leaf_distance.shape == (h.num_nodes, h.num_leaves)
    for v in range(h.num_nodes):
        assert h.height[v] == oracle.node_height(t, v)
        below = [u for u in preorder(h, v) if h.is_leaf[u]]
        assert h.height[v] == max(len(walk(h, u)) for u in below) - len(walk(h, v))
        for k in range(h.num_leaves):
            assert h.node_leaf_distance[v, k] == t.psi(v, int(h.leaf_channels[k])) == h.psi(v, int(h.leaf_channels[k]))
    np.testing.assert_array_equal(h.node_leaf_distance[h.leaf_channels], h.leaf_distance)
    # Cached, read-only, and rebuilt after a pickle round trip.
    assert h.height is h.height and not h.height.flags.writeable and not h.node_leaf_distance.flags.writeable
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(h)).height, h.height)


def test_quadratic_tables_wait_for_their_first_use():
    """A 10000-leaf taxonomy (100 groups of 100) builds in megabytes: the [N, N], [N, Dmax] and
    [K, K] tables are built on first use (all at once they took 3.5 GB), and then hold the walks'
    values."""
    import tracemalloc

    b = 100
    K = b * b
    tracemalloc.start()
    try:
        h = Hierarchy.from_parents(oracle.taxonomy_parents(b))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB to build the hierarchy"
    lazy = {"is_ancestor", "descendant_table", "leaf_distance", "leaf_lca_height", "node_leaf_distance", "height"}
    assert not lazy & set(vars(h))
    assert [h.node_names[c] for c in h.children[h.channel(str(K + 3))]] == [str(3 * b + i) for i in range(b)]
    for a, c in ((0, 1), (0, b), (b - 1, K - 1), (7, 7)):
        wa, wc = walk(h, int(h.leaf_channels[a])), walk(h, int(h.leaf_channels[c]))
        common = sum(1 for x, y in zip(wa, wc, strict=True) if x == y)
        assert h.leaf_distance[a, c] == len(wa) + len(wc) - 2 * common
        assert h.leaf_lca_height[a, c] == len(wa) - common
    v = h.channel(str(K + 5))
    assert h.descendant_table[v, : b + 1].tolist() == preorder(h, v) and h.is_ancestor[v].sum() == b + 1


@given(any_tree)
def test_psi_between_any_nodes(h):
    t = oracle.tree(h)
    for u in range(h.num_nodes):
        for v in range(h.num_nodes):
            assert h.psi(u, v) == t.psi(u, v)


# ---------------------------------------------------------------------------- constructors
def as_dict(h, v=None):
    """Nested mapping {internal name: {...}, leaf name: leaf id} for from_dict."""
    out = {}
    for c in kids(h, v) if v is not None else [u for u in range(h.num_nodes) if h.parent[u] < 0]:
        name = h.node_names[c]
        out[name] = int(h.node_ids[c]) if h.is_leaf[c] else as_dict(h, c)
    return out


@given(any_tree)
def test_constructors_agree(h):
    d = h.to_dict()
    same = Hierarchy.from_parents(d["parents"], d["names"], order=h._order_spec)
    assert same == h and hash(same) == hash(h) and same.fingerprint == h.fingerprint
    from_dict = Hierarchy.from_dict(as_dict(h))
    assert structure(from_dict) == structure(h)
    # Leaf names as '--' joined paths give the same tree (internal nodes named by prefix).
    names = ["--".join(structure(h)[k]) for k in range(h.num_leaves)]
    from_names = Hierarchy.from_names(names)
    assert {k: p[-1].split("--")[-1] for k, p in structure(from_names).items()} == {
        k: p[-1] for k, p in structure(h).items()
    }
    assert {k: len(p) for k, p in structure(from_names).items()} == {
        k: len(p) for k, p in structure(h).items()
    }
    # The canonical (default-layout) object is reached from every description.
    canon = Hierarchy.from_parents(from_dict.to_dict()["parents"], from_dict.to_dict()["names"])
    assert canon == from_dict == Hierarchy.from_dict(as_dict(from_dict))


@given(hierarchies(max_depth=3, min_depth=2, max_children=3, balanced=True, order=None))
def test_from_levels_for_balanced_trees(h):
    canon = Hierarchy.from_dict(as_dict(h))  # internal ids: deeper first, then order of appearance
    L = canon.max_depth
    levels = [[c for c in range(canon.num_nodes) if canon.depth[c] == d] for d in range(L, 0, -1)]
    levels[0] = [int(canon.leaf_channels[k]) for k in range(canon.num_leaves)]  # leaves in id order
    for d in range(1, L):  # internal levels in id order (matches from_levels' numbering)
        levels[d] = sorted(levels[d], key=lambda c: canon.node_ids[c])
    parent_of = [[levels[i + 1].index(int(canon.parent[c])) for c in levels[i]] for i in range(L - 1)]
    names = [[canon.node_names[c] for c in lv] for lv in levels]
    built = Hierarchy.from_levels(parent_of, names)
    assert built == canon
    assert structure(built) == structure(h)


@given(h=any_tree)
def test_json_and_pickle_round_trip(h, tmp_path_factory):
    assert Hierarchy.from_json(h.to_json()) == h
    path = tmp_path_factory.mktemp("json") / "h.json"
    h.to_json(path)
    back = Hierarchy.from_json(path)
    assert back == h and back.fingerprint == h.fingerprint and hash(back) == hash(h)
    np.testing.assert_array_equal(back.node_ids, h.node_ids)
    clone = pickle.loads(pickle.dumps(h))
    assert clone == h and clone.fingerprint == h.fingerprint
    np.testing.assert_array_equal(clone.descendant_table, h.descendant_table)


def test_presets_round_trip_and_hash():
    for name in presets.names():
        h = presets.get(name)
        assert Hierarchy.from_json(h.to_json()) == h == presets.get(name)
        assert len({h, presets.get(name)}) == 1
        assert h.with_order("coarse_to_fine") != h
        assert h.with_order("coarse_to_fine").fingerprint != h.fingerprint


@given(any_tree, st.data())
def test_with_order_layouts_are_consistent(h, data):
    perm = list(data.draw(st.permutations(range(h.num_nodes))))
    for order in ("default", "coarse_to_fine", perm):
        g = h.with_order(order)
        assert structure(g) == structure(h)
        for i in range(h.num_nodes):  # the same node, seen through both layouts
            ch, cg = int(h.channel_of[i]), int(g.channel_of[i])
            assert h.node_ids[h.ancestor_table[ch]].tolist() == g.node_ids[g.ancestor_table[cg]].tolist()
            assert sorted(h.node_ids[h.children[ch]].tolist()) == sorted(g.node_ids[g.children[cg]].tolist())
            assert g.node_names[cg] == h.node_names[ch]
        np.testing.assert_array_equal(g.leaf_distance, h.leaf_distance)
    assert h.with_order(perm).node_ids.tolist() == perm
    c2f = h.with_order("coarse_to_fine")
    assert (np.diff(c2f.depth) >= 0).all()
    default = h.with_order("default")
    k = h.num_leaves
    assert default.node_ids[:k].tolist() == list(range(k))
    assert (np.diff(default.depth[k:]) <= 0).all()


# ---------------------------------------------------------------------------- label helpers
@given(st.data())
def test_labels_at_depth_and_expand_targets_against_loops(data):
    h = data.draw(any_tree)
    labels = data.draw(label_maps(h, (2, 3, 2), ignore_fraction=None, partial_fraction=None))
    for d in range(1, h.max_depth + 1):
        np.testing.assert_array_equal(h.labels_at_depth(labels, d), oracle.labels_at_depth(labels, h, d))
    targets, mask = h.expand_targets(labels)
    want_t, want_m = oracle.expand_targets(labels, h)
    assert targets.dtype == np.uint8 and mask.dtype == bool
    np.testing.assert_array_equal(targets, want_t)
    np.testing.assert_array_equal(mask, want_m)


@given(st.data())
def test_consistent_mask_against_loops(data):
    h = data.draw(any_tree)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    leaves = rng.integers(0, h.num_leaves, size=(2, 5))
    per_depth = np.stack([h.labels_at_depth(leaves, d) for d in range(1, h.max_depth + 1)], axis=1)
    noisy = per_depth.copy()
    flip = rng.random(noisy.shape) < 0.3
    noisy[flip] = rng.integers(0, h.num_nodes + 2, size=int(flip.sum()))
    noisy[0, :, 0] = 255
    got = h.consistent_mask(noisy)
    t = oracle.tree(h)
    for b in range(2):
        for i in range(5):
            col = [int(v) for v in noisy[b, :, i]]
            ok = all(0 <= v < h.num_nodes for v in col)
            if ok:
                leaf_ch = int(h.channel_of[col[-1]])
                ok = not t.children[leaf_ch] and [t.node_id(c) for c in t.path_of(leaf_ch)] == col
            assert bool(got[b, i]) == ok
    assert h.consistent_mask(per_depth).all()


def test_label_helpers_reject_bad_input():
    h = presets.cityscapes()
    with pytest.raises(LabelError, match=r"-2.*30|30.*-2") as info:
        h.label_channels(np.array([[0, 30, -2, 255]]))
    assert "ignore_index=255" in str(info.value)
    with pytest.raises(LabelError, match="integers"):
        h.label_channels(np.array([0.0, 1.0]))
    with pytest.raises(LabelError, match="collides"):
        h.label_channels(np.array([0, 1]), ignore_index=3)
    with pytest.raises(LabelError, match="collides"):
        h.check_ignore_index(25)
    h.check_ignore_index(26)
    h.check_ignore_index(-1)
    assert h.label_channels(np.array([0, -1]), ignore_index=-1).tolist() == [0, -1]
    with pytest.raises(ValueError, match="depth"):
        h.labels_at_depth(np.array([0]), 3)
    with pytest.raises(ValueError, match="depth_labels"):
        h.consistent_mask(np.zeros((1, 3)))
    labels = np.array([[0, 20, 255]], dtype=np.int32)
    saved = labels.copy()
    h.expand_targets(labels)
    h.labels_at_depth(labels, 2)
    np.testing.assert_array_equal(labels, saved)


# ---------------------------------------------------------------------------- construction errors
@pytest.mark.parametrize(
    "parents, needle",
    [
        ([1, 0], "cycle"),
        ([0, -1], "cycle"),
        ([2, 3, 1, 2, -1], "cycle"),
        ([5, -1], "unknown parent"),
        ([-3, -1], "unknown parent"),
        ([], "empty"),
        ([-1, 0], "leaves must be node ids 0..K-1"),
        ([2, 2, -1, -1, 3], "leaves must be node ids 0..K-1"),
        ([[0, 1]], "flat"),
        ([0.5, -1], "integers"),
    ],
)
def test_from_parents_errors(parents, needle):
    with pytest.raises(HierarchyError, match=needle):
        Hierarchy.from_parents(parents)


def test_other_construction_errors():
    with pytest.raises(HierarchyError, match="duplicate node names"):
        Hierarchy.from_parents([2, 2, -1], ["a", "a", "b"])
    with pytest.raises(HierarchyError, match="names"):
        Hierarchy.from_parents([2, 2, -1], ["a", "b"])
    with pytest.raises(HierarchyError, match="two parents"):
        Hierarchy.from_dict({"x": {"a": 0, "b": 1}, "y": {"a": 0}})
    with pytest.raises(HierarchyError, match="non-empty"):
        Hierarchy.from_dict({})
    with pytest.raises(HierarchyError, match="no children"):
        Hierarchy.from_dict({"x": {}})
    with pytest.raises(HierarchyError, match="every leaf an id"):
        Hierarchy.from_dict({"x": {"a": 0}, "y": ["b"]})
    with pytest.raises(HierarchyError, match="0..1"):
        Hierarchy.from_dict({"x": {"a": 0, "b": 2}})
    with pytest.raises(HierarchyError, match="int"):
        Hierarchy.from_dict({"x": {"a": 0.0}})
    with pytest.raises(HierarchyError, match="empty"):
        Hierarchy.from_names([])
    with pytest.raises(HierarchyError, match="empty part"):
        Hierarchy.from_names(["a----b"])
    with pytest.raises(HierarchyError, match="both a leaf and a prefix"):
        Hierarchy.from_names(["a", "a--b"])
    with pytest.raises(HierarchyError, match="no children"):
        Hierarchy.from_levels([[0, 0, 2]])
    with pytest.raises(HierarchyError, match="level 1 has 2 nodes"):
        Hierarchy.from_levels([[0, 1, 2], [0, 0]])
    with pytest.raises(HierarchyError, match="order"):
        Hierarchy.from_parents([2, 2, -1], order="fine_to_coarse")
    with pytest.raises(HierarchyError, match="permutation"):
        Hierarchy.from_parents([2, 2, -1], order=[0, 0, 1])
    with pytest.raises(HierarchyError, match="format"):
        Hierarchy.from_json('{"parents": [-1]}')
    with pytest.raises(HierarchyError, match="JSON"):
        Hierarchy.from_json("{not json")


def test_small_trees_by_hand():
    h = Hierarchy.from_dict({"flat": {"road": 0, "sidewalk": 1}, "sky": {"sky!": 2}})
    assert h.num_nodes == 5 and h.num_leaves == 3 and h.max_depth == 2
    assert h.leaf_distance.tolist() == [[0, 2, 4], [2, 0, 4], [4, 4, 0]]
    assert h.node_names[3:] == ("flat", "sky")
    one = Hierarchy.from_parents([-1, -1])  # a flat tree: every node a leaf at depth 1
    assert one.max_depth == 1 and one.leaf_distance.tolist() == [[0, 2], [2, 0]]
    assert str(h).splitlines()[1].strip().startswith("[3] flat")
    assert h.channel("sky") == 4
    with pytest.raises(KeyError, match="nope"):
        h.channel("nope")


@given(h=hierarchies(max_depth=3, max_children=3, order=None), ignore_index=st.sampled_from([255, -1, 1000]))
def test_label_table_maps_like_label_channels(h, ignore_index):
    table, shift, bad, partial = h.label_table(ignore_index)
    values = np.arange(-10, max(h.num_nodes, ignore_index) + 10)
    slots = np.clip(values + shift, 0, table.size - 1)
    for v, slot in zip(values.tolist(), slots.tolist(), strict=True):
        valid = v == ignore_index or 0 <= v < h.num_nodes
        assert bad[slot] == (not valid)
        assert partial[slot] == (h.num_leaves <= v < h.num_nodes)
        if valid:
            assert table[slot] == h.label_channels(np.array([v]), ignore_index=ignore_index)[0]


def test_by_fingerprint_finds_any_live_equal_hierarchy():
    """Compiled ops receive a hierarchy's fingerprint and look the object up: while any hierarchy with
    that fingerprint lives, the lookup finds one, even after the first of several equal ones died
    (registering only the first lost the fingerprint then, and a kernel call on the survivor failed)."""
    import gc

    parents = [5, 5, 6, 6, 6, -1, -1]
    first, second = Hierarchy(parents), Hierarchy(parents)
    assert first == second and first is not second
    key = first.fingerprint
    assert Hierarchy.by_fingerprint(key) in (first, second)
    del first
    gc.collect()
    assert Hierarchy.by_fingerprint(key) is second
    del second
    gc.collect()
    with pytest.raises(KeyError, match="no live Hierarchy has fingerprint"):
        Hierarchy.by_fingerprint(key)


def test_the_live_registry_forgets_trees_no_hierarchy_holds():
    """The fingerprint registry keeps no entry for a tree once every hierarchy with it has died (a
    training job that builds many trees, e.g. a sweep over taxonomies, must not grow it for ever)."""
    import gc

    from hieraloss import hierarchy as module

    keys = []
    for n in range(3, 40):
        h = Hierarchy([n] * n + [-1])  # n leaves under one root: a distinct tree each time
        keys.append(h.fingerprint)
        del h
    gc.collect()
    Hierarchy([2, 2, -1])  # registering a hierarchy drops the entries nobody holds
    stale = [key for key in keys if key in module._LIVE and not module._LIVE[key]]
    assert stale == []
