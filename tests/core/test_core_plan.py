"""The one plan per hierarchy (hieraloss.core.plan): every table against a plain-loop construction
from the parent pointers alone (tests/oracle.py's Tree), caching by fingerprint, read-only arrays."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import numpy as np
import oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hieraloss.presets
from hieraloss import Hierarchy, LabelError
from hieraloss.core import plan as core_plan
from hieraloss.core import plan_for
from hieraloss.testing import hierarchies


def _preorder(t: oracle.Tree) -> list[int]:
    out: list[int] = []
    for r in t.roots:
        out.extend(t.desc[r])  # D(r) in pre-order, children in channel order
    return out


def _postorder(t: oracle.Tree) -> list[int]:
    out: list[int] = []

    def walk(v):
        for c in t.children[v]:
            walk(c)
        out.append(v)

    for r in t.roots:
        walk(r)
    return out


def _arrays(plan):
    """Every numpy array the plan holds (in tuples too), with a name."""
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)

        def flat(name, v):
            if isinstance(v, np.ndarray):
                yield name, v
            elif isinstance(v, tuple):
                for i, u in enumerate(v):
                    yield from flat(f"{name}[{i}]", u)

        yield from flat(f.name, value)


def _eq(a, b) -> bool:
    return np.asarray(a).tolist() == list(b)


@settings(max_examples=40)
@given(h=hierarchies(max_depth=4, max_children=4, order=None))
def test_plan_tables_match_plain_loops(h):
    p = plan_for(h)
    t = oracle.tree(h)
    n, L = t.n, t.max_depth
    assert (p.num_nodes, p.num_leaves, p.max_depth) == (n, len(t.leaves), L)
    assert p.fingerprint == h.fingerprint
    assert _eq(p.parent, t.parent) and _eq(p.depth, t.depth)
    assert _eq(p.is_leaf, [not t.children[v] for v in range(n)])

    # channels per depth and their parents
    assert len(p.levels) == len(p.level_parents) == L
    for d in range(1, L + 1):
        at = [v for v in range(n) if t.depth[v] == d]
        assert _eq(p.levels[d - 1], at)
        assert _eq(p.level_parents[d - 1], [t.parent[v] for v in at])
        for i, v in enumerate(at):
            assert p.level_position[v] == i

    # children in channel order, CSR, counts, roots, ranks
    assert [c.tolist() for c in p.children] == t.children
    for v in range(n):
        assert _eq(p.child_channels[p.child_offsets[v]:p.child_offsets[v + 1]], t.children[v])
    assert _eq(p.num_children, [len(c) for c in t.children])
    assert p.max_children == max([len(c) for c in t.children if c], default=1)
    assert _eq(p.roots, t.roots)
    for v in range(n):
        siblings = t.roots if t.parent[v] < 0 else t.children[t.parent[v]]
        assert p.child_rank[v] == siblings.index(v)

    # rank-by-rank children per depth (numpy zmax sweep)
    assert len(p.level_child_ranks) == L
    for d in range(1, L + 1):
        at = [v for v in range(n) if t.depth[v] == d]
        most = max([len(t.children[v]) for v in at], default=0)
        ranks = p.level_child_ranks[d - 1]
        assert len(ranks) == most
        for r, (kids, parents) in enumerate(ranks):
            want = [t.children[v][r] for v in at if len(t.children[v]) > r]
            assert _eq(kids, want) and _eq(parents, [t.parent[c] for c in want])
            assert len(set(parents.tolist())) == len(want)  # one vectorized update per rank

    # bottom-up schedules: internal nodes and edges deepest first, ties (siblings) in channel order
    internal = [v for v in range(n) if t.children[v]]
    assert _eq(p.bottom_up, sorted(internal, key=lambda v: (-t.depth[v], v)))
    want_edges = []
    for d in range(L, 1, -1):
        for v in range(n):
            if t.depth[v] == d:
                want_edges.append([v, t.parent[v]])
    assert p.edges.shape == (len(want_edges), 2) and p.edges.tolist() == want_edges

    # depth-first orders, positions, subtree sizes and ends
    pre_list = _preorder(t)
    assert _eq(p.preorder, pre_list) and _eq(p.postorder, _postorder(t))
    for v in range(n):
        assert p.pre[v] == pre_list.index(v)
        assert p.size[v] == len(t.desc[v])
        assert p.end[v] == p.pre[v] + p.size[v]
        for u in range(n):
            assert (p.pre[v] <= p.pre[u] < p.end[v]) == (v in t.anc[u])

    # cross-entropy depth sets, their CSR, targets and the per-depth count tables
    for d in range(1, L + 1):
        classes = [v for v in range(n) if t.depth[v] == d or (not t.children[v] and t.depth[v] < d)]
        assert _eq(p.depth_channels[d - 1], classes)
        assert _eq(p.class_channels[p.class_offsets[d - 1]:p.class_offsets[d]], classes)
        for c in range(n):
            counts = not t.children[c] or t.depth[c] >= d
            assert p.ce_counted[c, d - 1] == float(counts)
            assert p.ce_target[c, d - 1] == (t.anc[c][min(d, t.depth[c]) - 1] if counts else -1)
            not_below = [v for v in range(n) if t.depth[v] == d and not (v != c and c in t.anc[v])]
            assert p.tree_min_counted[c, d - 1] == len(not_below)
            assert p.path_real[c, d - 1] == (d - 1 < t.depth[c])
    assert p.class_offsets.size == L + 1 and p.class_offsets[0] == 0
    assert p.tree_min_counted.dtype == p.ce_counted.dtype == np.float64

    assert _eq(p.leaf_channels_sorted, t.leaves)
    runs = []
    for c in range(n):
        leaf = not t.children[c]
        if runs and runs[-1][2] == leaf and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1, leaf])
    assert [list(r) for r in p.channel_runs] == runs


@settings(max_examples=25)
@given(h=hierarchies(max_depth=3, max_children=3, order=None), ignore_index=st.sampled_from([255, -1, 1000, None]))
def test_label_codes_match_plain_loops(h, ignore_index):
    p = plan_for(h)
    t = oracle.tree(h)
    assert ignore_index is None or not 0 <= ignore_index < h.num_nodes  # never a node id here
    codes = p.label_codes(ignore_index)
    assert codes is p.label_codes(ignore_index)  # cached
    S = codes.codes.size
    assert codes.codes.dtype == np.int32 and codes.tree_min_counts.shape == codes.ce_counts.shape == (S, t.max_depth)
    if ignore_index is None:
        values = range(-3, t.n + 3)  # channels; -1 and anything out of range are ignored
    else:
        values = sorted({-5, -1, 0, t.n - 1, t.n, ignore_index, 300, 10**6} | set(range(t.n)))
    for value in values:
        slot = min(max(value + codes.shift, 0), S - 1)
        if ignore_index is None:
            c = value if 0 <= value < t.n else None
        else:
            c = int(h.channel_of[value]) if 0 <= value < t.n else None
        if c is None:
            assert codes.codes[slot] == -1, value
            assert not codes.tree_min_counts[slot].any() and not codes.ce_counts[slot].any()
            continue
        pre, end = _preorder(t).index(c), _preorder(t).index(c) + len(t.desc[c])
        assert codes.codes[slot] == pre | end << 16, value
        assert codes.tree_min_counts[slot].tolist() == p.tree_min_counted[c].tolist()
        assert codes.ce_counts[slot].tolist() == p.ce_counted[c].tolist()


def test_label_codes_refuse_an_ignore_index_that_is_a_node_id():
    h = hieraloss.presets.cityscapes()
    with pytest.raises(LabelError, match="collides"):
        plan_for(h).label_codes(3)


def test_plans_are_cached_by_fingerprint():
    h = hieraloss.presets.cityscapes()
    again = Hierarchy.from_json(h.to_json())  # an equal hierarchy, another object
    assert again is not h and again.fingerprint == h.fingerprint
    assert plan_for(again) is plan_for(h)
    other = h.with_order("coarse_to_fine")  # same tree, another channel layout
    assert plan_for(other) is not plan_for(h)
    assert not np.array_equal(plan_for(other).pre, plan_for(h).pre)


def test_plan_for_is_thread_safe():
    h = Hierarchy.from_parents([6, 6, 7, 7, 8, 8, 9, 9, 9, -1], order="coarse_to_fine")
    core_plan._PLANS.pop(h.fingerprint, None)
    got, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        got.append(plan_for(h))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got) == 8 and all(g is got[0] for g in got)


def test_plan_is_frozen_and_its_arrays_read_only():
    h = hieraloss.presets.pascal_person_part()
    p = plan_for(h)
    named = list(_arrays(p))
    assert len(named) > 30
    for name, arr in named:
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError):
            arr.reshape(-1)[:1] = 0
    for arr in (*p.label_codes(255)[:1], *p.label_codes(255)[2:]):
        assert not arr.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.levels = ()  # type: ignore[misc]


def test_consumers_read_the_plan():
    """The count tables and the compiled kernel's int32 tables are views of the plan."""
    from hieraloss.core import plan as core_plan

    h = hieraloss.presets.lip()
    p = plan_for(h)
    assert core_plan.counted_entries_per_depth(h) is p.tree_min_counted
    assert core_plan.ce_counted_per_depth(h) is p.ce_counted
    for name in ("edges", "pre", "size", "class_offsets", "class_channels", "ce_target"):
        arr = p.int32(name)
        assert arr is p.int32(name), name  # made once
        assert arr.dtype == np.int32 and arr.flags.c_contiguous and not arr.flags.writeable, name
        assert np.array_equal(arr, getattr(p, name)), name


def test_core_imports_no_backend():
    code = ("import sys, hieraloss.core; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'paddle', 'triton') "
            "or m.startswith('hieraloss.numpy')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rules_live_in_core():
    import hieraloss.numpy as hnp
    from hieraloss.core import checks as _checks
    from hieraloss.core import rules

    assert rules.REDUCTIONS == ("mean", "sum", "none", "hssn") and rules.HSSN_SCALE == 5.0
    assert _checks.REDUCTIONS is rules.REDUCTIONS and hnp.REDUCTIONS is rules.REDUCTIONS


@settings(max_examples=30)
@given(h=hierarchies(max_depth=4, max_children=4, order=None))
def test_depth_blocks_read_the_core_plan(h):
    """The depth-block layout (core.blocks, built from the plan; the paddle and torch ops read it)
    against plain loops over the parent pointers."""
    from hieraloss.core.blocks import DepthBlocks

    b, p, t = DepthBlocks(h), plan_for(h), oracle.tree(h)
    L = t.max_depth
    at = [[v for v in range(t.n) if t.depth[v] == d] for d in range(1, L + 1)]
    pos = {v: i for lv in at for i, v in enumerate(lv)}
    assert b.counted_per_depth is p.tree_min_counted and b.leaf_sorted is p.leaf_channels_sorted
    assert _eq(b.num_children, [len(c) for c in t.children])
    for d in range(L):
        assert _eq(b.levels[d], at[d])
        if d:
            assert _eq(b.parent_pos[d], [pos[t.parent[v]] for v in at[d]])
            assert b.slot[d].dtype == np.int32
            assert _eq(b.slot[d], [t.children[t.parent[v]].index(v) for v in at[d]])
        kids = [t.children[v] for v in at[d]]
        assert len(b.child_ranks[d]) == max(len(k) for k in kids)
        for r, (index, valid) in enumerate(b.child_ranks[d]):
            ok = [len(k) > r for k in kids]
            assert index.dtype == np.int64 and _eq(index, [pos[k[r]] if len(k) > r else 0 for k in kids])
            assert (valid is None) == all(ok) and (valid is None or _eq(valid, ok))
        spans = []
        for k in kids:
            ps = [pos[c] for c in k]
            start = ps[0] if ps else 0
            spans.append((start, start + len(ps)) if ps == list(range(start, start + len(ps))) else None)
        want = None if d == L - 1 or None in spans else spans
        assert b.child_slices[d] == want
        assert want is None or all(type(x) is int for s in want for x in s)
    # The node-at-a-time sweep: every internal node once, deepest first, children in channel order,
    # a channel range exactly when they are consecutive leaves.
    internal = [v for v in range(t.n) if t.children[v]]
    assert sorted(v for v, *_ in b.bottom_up) == internal
    assert [t.depth[v] for v, *_ in b.bottom_up] == sorted((t.depth[v] for v in internal), reverse=True)
    for v, kids, kid_is_leaf, run in b.bottom_up:
        assert kids == sorted(t.children[v]) and kid_is_leaf == [not t.children[c] for c in kids]
        consecutive = all(kid_is_leaf) and kids == list(range(kids[0], kids[0] + len(kids)))
        assert run == ((kids[0], kids[-1] + 1) if consecutive else None)


def test_a_large_taxonomy_plans_in_linear_memory():
    """The per-depth counts of a 10000-leaf taxonomy come from the ancestor table, not an [N, N]
    table (which took 1.5 GB and 8 s for 40000 leaves): a few MiB, and the counts of a direct walk."""
    import tracemalloc

    h = Hierarchy.from_parents(oracle.taxonomy_parents(100))
    tracemalloc.start()
    try:
        p = core_plan._build(h)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB to plan"
    groups = np.flatnonzero(h.depth == 1)
    for c in (int(groups[0]), int(groups[-1]), int(h.leaf_channels[0]), int(h.leaf_channels[-1])):
        below_at_2 = int(((h.parent == c) & (h.depth == 2)).sum())
        assert p.tree_min_counted[c].tolist() == [float(groups.size), float(h.num_leaves - below_at_2)]
