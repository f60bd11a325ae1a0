"""The one plan per hierarchy: every integer table an op or a kernel reads, built once.

:func:`plan_for` walks the tree of a :class:`~hieraloss.hierarchy.Hierarchy` once and returns a
frozen :class:`Plan` of read-only numpy arrays, cached by ``Hierarchy.fingerprint``. Every backend
(the numpy reference, the torch and paddle sweeps, the compiled CPU kernel through
:meth:`Plan.int32`, the Triton code generator and its label codes) reads its schedules and tables from here; nothing
outside ``hieraloss.core`` walks the tree. The Hierarchy keeps its own tables (``parent``,
``depth``, ``ancestor_table``, ``descendant_table``, ``depth_channels``, ...); the plan refers to
them where it needs them and adds the derived ones.

Everything is in channel space (see DEVELOPING.md "Index spaces"); "channel order" means ascending
channel, which is the order that decides ``zmax`` ties (DEVELOPING.md "Targets, losses, ties").

numpy only: this module imports no backend and not ``hieraloss.numpy``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..hierarchy import Hierarchy

__all__ = ["Plan", "LabelCodes", "plan_for", "counted_entries_per_depth", "ce_counted_per_depth",
           "CODE_NODE_LIMIT", "code_node_limit_reason"]

# The label codes pack a pre-order position and a subtree end into 16 bits each.
CODE_NODE_LIMIT = 1 << 15


def code_node_limit_reason(num_nodes: int) -> str | None:
    """Why the label codes (and so the fused kernels) cannot take a ``num_nodes``-node tree, None when
    they can."""
    if num_nodes >= CODE_NODE_LIMIT:
        return (f"the fused kernels take hierarchies below {CODE_NODE_LIMIT} nodes (their label codes pack "
                f"16-bit node positions); got {num_nodes} nodes")
    return None


_CACHE_SIZE = 256

_LOCK = threading.Lock()
_PLANS: OrderedDict[str, Plan] = OrderedDict()


def _ro(a, dtype=np.int64) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    a.setflags(write=False)
    return a


class LabelCodes(NamedTuple):
    """What a label value's slot holds, for kernels that map raw labels themselves.

    Slot ``clamp(label + shift, 0, S - 1)`` of a label value: ``codes`` int32 ``[S]`` = ``pre | end
    << 16`` of its channel (pre-order position and subtree end, so node v is on the labelled path
    iff ``pre[v] <= pc < end[v]`` and a strict descendant of a partial label iff ``pc < pre[v] <
    ec``), -1 where the slot is ignored or not a node; ``tree_min_counts`` / ``ce_counts`` float64
    ``[S, L]``: the slot's row of :attr:`Plan.tree_min_counted` / :attr:`Plan.ce_counted` (0 where
    ignored), so a histogram of slots times them gives the per-depth counts; ``channels`` int32
    ``[S]``: the slot's channel, -1 where ignored (for kernels that read the plan's tables by channel)."""

    codes: np.ndarray | None
    shift: int
    tree_min_counts: np.ndarray
    ce_counts: np.ndarray
    channels: np.ndarray


@dataclass(frozen=True, eq=False)
class Plan:
    """Every integer table of one hierarchy that an op or kernel reads (channel space, read-only).

    Sizes: N nodes, K leaves, L depths, E = N - len(roots) edges.

    Attributes:
        fingerprint: the hierarchy's fingerprint (the cache key).
        num_nodes, num_leaves, max_depth: N, K, L.
        parent: ``[N]`` parent channel, -1 for depth-1 nodes (the Hierarchy's table).
        depth: ``[N]`` 1 for children of the root (the Hierarchy's table).
        is_leaf: ``[N]`` bool (the Hierarchy's table).
        levels: L arrays: ``levels[d-1]`` = channels at depth d (ascending) - the channels per depth.
        level_parents: L arrays: the parents of ``levels[d-1]``.
        level_position: ``[N]`` position of v in ``levels[depth[v]-1]`` (its index in its depth block).
        children: N arrays: the children of each channel in channel order.
        child_offsets, child_channels: the same as CSR: children of v are
            ``child_channels[child_offsets[v]:child_offsets[v + 1]]`` (``[N + 1]``, ``[E]``).
        num_children: ``[N]``; ``max_children``: the largest count of an internal node (1 if none).
        roots: depth-1 channels (the implicit root's children) in channel order.
        child_rank: ``[N]`` position of v among its parent's children (for depth-1 nodes: among
            ``roots``), 0-based: the zmax tie order.
        level_child_ranks: L tuples: for the nodes at depth d, one ``(children, parents)`` pair per
            rank r: the r-th children (channel order) of those nodes and their parents. Within a rank
            the parents are distinct (one vectorized update each); ranks in order keep "the earlier
            child wins a tie".
        bottom_up: internal channels deepest first, ties by channel (the tree-min zmax schedule).
        edges: ``[E, 2]`` (child, parent), deepest children first, siblings in channel order (a
            node's edges are consecutive, in ``child_rank`` order).
        preorder: ``[N]`` channels in depth-first pre-order (roots and children in channel order);
            ``pre``: ``[N]`` position of each channel in it; ``size``: ``[N]`` subtree sizes;
            ``end = pre + size``, so u is v or below v iff ``pre[v] <= pre[u] < end[v]``.
        postorder: ``[N]`` channels in depth-first post-order (children first, channel order).
        depth_channels: L arrays: the cross-entropy classes of depth d (the nodes at depth d and the
            leaves shallower than d, ascending; the Hierarchy's table).
        class_offsets, class_channels: ``depth_channels`` as CSR (``[L + 1]`` and the concatenation).
        ce_target: ``[N, L]`` the cross-entropy target at depth d of a pixel labelled c
            (``ancestor_table[c, d-1]``), -1 where it does not count (a partial label coarser than d).
        tree_min_counted: ``[N, L]`` float64 (integer values): for a valid pixel labelled c, how many
            of its (pixel, node) entries at depth d the reductions count (the depth-d nodes not
            strictly below c).
        ce_counted: ``[N, L]`` float64 0/1: whether a pixel labelled c counts for the cross-entropy
            at depth d (a leaf at every depth, a partial label down to its own depth).
        path_real: ``[N, L]`` bool: ``d < depth[c]`` (``ancestor_table[c, d]`` is a real path entry,
            not padding).
        leaf_channels_sorted: ``[K]`` the leaf channels, ascending.
        internal: channels with children, ascending (LogicSeg's "parent implies a child" clauses).
        children_by_rank: ``[max_children, len(internal)]``: row r holds the r-th child of each
            internal channel, padded with its last child (a max over the rows is the max over the
            children: repeating one is harmless).
        sibling_groups: the sibling groups of two or more channels: the roots, then the children of
            each internal channel in channel order (LogicSeg's exclusion clauses).
        channel_runs: maximal runs ``(start, stop, is_leaf)`` of consecutive channels that are all
            leaves or all internal nodes (one of each in the default layout).

    Methods: :meth:`label_codes` (the per-slot code and count tables for raw labels), :meth:`int32`
    (a table as the int32 copy that the compiled CPU kernel reads).
    """

    fingerprint: str
    num_nodes: int
    num_leaves: int
    max_depth: int
    parent: np.ndarray
    depth: np.ndarray
    is_leaf: np.ndarray
    levels: tuple[np.ndarray, ...]
    level_parents: tuple[np.ndarray, ...]
    level_position: np.ndarray
    children: tuple[np.ndarray, ...]
    child_offsets: np.ndarray
    child_channels: np.ndarray
    num_children: np.ndarray
    max_children: int
    roots: np.ndarray
    child_rank: np.ndarray
    level_child_ranks: tuple[tuple[tuple[np.ndarray, np.ndarray], ...], ...]
    bottom_up: np.ndarray
    edges: np.ndarray
    preorder: np.ndarray
    pre: np.ndarray
    size: np.ndarray
    end: np.ndarray
    postorder: np.ndarray
    depth_channels: tuple[np.ndarray, ...]
    class_offsets: np.ndarray
    class_channels: np.ndarray
    ce_target: np.ndarray
    tree_min_counted: np.ndarray
    ce_counted: np.ndarray
    path_real: np.ndarray
    leaf_channels_sorted: np.ndarray
    internal: np.ndarray
    children_by_rank: np.ndarray
    sibling_groups: tuple[np.ndarray, ...]
    channel_runs: tuple[tuple[int, int, bool], ...]
    _hierarchy: Hierarchy = field(repr=False)
    _codes: dict = field(default_factory=dict, repr=False)
    _codes_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _int32: dict = field(default_factory=dict, init=False, repr=False)

    def int32(self, name: str) -> np.ndarray:
        """The integer table ``name`` as a read-only C-contiguous int32 copy, made once per plan: what
        the compiled CPU kernel's C ABI reads (``edges`` ``[E, 2]``, ``pre``, ``size``,
        ``class_offsets``, ``class_channels``, ``ce_target``, ...)."""
        with self._codes_lock:
            arr = self._int32.get(name)
            if arr is None:
                arr = self._int32[name] = _ro(getattr(self, name), np.int32)
        return arr

    def label_codes(self, ignore_index: int | None) -> LabelCodes:
        """The :class:`LabelCodes` of raw labels holding node ids and ``ignore_index`` (which must
        not be a node id: ``Hierarchy.label_table`` raises the ``LabelError``), or, with
        ``ignore_index=None``, of labels that are already channels (-1 = ignored; any other value
        out of range counts as ignored too). Cached per ``ignore_index``. For hierarchies of
        ``CODE_NODE_LIMIT`` nodes or more ``codes`` is None (they pack 16-bit positions); the other
        tables are there."""
        key = None if ignore_index is None else int(ignore_index)
        with self._codes_lock:
            codes = self._codes.get(key)
            if codes is None:
                codes = self._codes[key] = self._build_label_codes(key)
        return codes

    def _build_label_codes(self, ignore_index: int | None) -> LabelCodes:
        if ignore_index is None:
            channel = np.concatenate([[-1], np.arange(self.num_nodes), [-1]])
            shift = 1
        else:
            table, shift, _, _ = self._hierarchy.label_table(ignore_index)
            channel = np.where(table >= 0, table, -1)
        valid = channel >= 0
        safe = np.where(valid, channel, 0)
        codes = None
        if code_node_limit_reason(self.num_nodes) is None:  # positions fit in 16 bits
            code = self.pre[safe].astype(np.int64) | (self.end[safe].astype(np.int64) << 16)
            codes = _ro(np.where(valid, code, -1), np.int32)
        return LabelCodes(
            codes=codes,
            shift=int(shift),
            tree_min_counts=_ro(np.where(valid[:, None], self.tree_min_counted[safe], 0.0), np.float64),
            ce_counts=_ro(np.where(valid[:, None], self.ce_counted[safe], 0.0), np.float64),
            channels=_ro(np.where(valid, channel, -1), np.int32),
        )


def _build(h: Hierarchy) -> Plan:
    n, k, L = h.num_nodes, h.num_leaves, h.max_depth
    parent = np.asarray(h.parent)
    depth = np.asarray(h.depth)
    is_leaf = np.asarray(h.is_leaf)
    par = [int(p) for p in parent]
    dep = [int(d) for d in depth]

    # Children in channel order (channels are visited ascending), roots likewise.
    kids: list[list[int]] = [[] for _ in range(n)]
    roots: list[int] = []
    for v in range(n):
        (kids[par[v]] if par[v] >= 0 else roots).append(v)
    child_rank = [0] * n
    for group in [roots, *kids]:
        for r, c in enumerate(group):
            child_rank[c] = r

    levels = [[v for v in range(n) if dep[v] == d] for d in range(1, L + 1)]
    level_position = [0] * n
    for lv in levels:
        for i, v in enumerate(lv):
            level_position[v] = i
    level_child_ranks = []
    for lv in levels:
        most = max((len(kids[v]) for v in lv), default=0)
        ranks = []
        for r in range(most):
            rk = [kids[v][r] for v in lv if len(kids[v]) > r]
            ranks.append((_ro(rk), _ro([par[c] for c in rk])))
        level_child_ranks.append(tuple(ranks))

    bottom_up = sorted((v for v in range(n) if kids[v]), key=lambda v: (-dep[v], v))
    edge_children = sorted((v for v in range(n) if par[v] >= 0), key=lambda v: (-dep[v], v))

    # Depth-first orders, iteratively (no recursion limit on deep trees).
    preorder: list[int] = []
    stack = roots[::-1]
    while stack:
        v = stack.pop()
        preorder.append(v)
        stack.extend(kids[v][::-1])
    postorder: list[int] = []
    stack2: list[tuple[int, bool]] = [(r, False) for r in roots[::-1]]
    while stack2:
        v, done = stack2.pop()
        if done:
            postorder.append(v)
            continue
        stack2.append((v, True))
        stack2.extend((c, False) for c in kids[v][::-1])
    pre = [0] * n
    for i, v in enumerate(preorder):
        pre[v] = i
    size = [1] * n
    for v in reversed(preorder):  # children come after their parent in pre-order
        if par[v] >= 0:
            size[par[v]] += size[v]

    # Per-depth count tables: tree-min entries not strictly below c, cross-entropy membership.
    anc = np.asarray(h.ancestor_table)
    below = np.zeros((n, L), dtype=np.int64)  # [c, d-1]: depth-d nodes strictly below c
    for j in range(L - 1):  # each node counts once under its ancestor at depth j + 1 above it
        deeper = np.flatnonzero(depth > j + 1)
        np.add.at(below, (anc[deeper, j], depth[deeper] - 1), 1)
    tree_min_counted = np.array([len(lv) for lv in levels], dtype=np.float64)[None, :] - below
    ce_counted = np.zeros((n, L), dtype=np.float64)
    ce_target = np.full((n, L), -1, dtype=np.int64)
    for d in range(1, L + 1):
        counts = is_leaf | (depth >= d)
        ce_counted[:, d - 1] = counts
        ce_target[counts, d - 1] = anc[counts, d - 1]

    classes = [np.asarray(dc, dtype=np.int64) for dc in h.depth_channels]
    runs: list[tuple[int, int, bool]] = []
    for c in range(n):
        leaf = bool(is_leaf[c])
        if runs and runs[-1][2] == leaf:
            runs[-1] = (runs[-1][0], c + 1, leaf)
        else:
            runs.append((c, c + 1, leaf))

    num_children = [len(c) for c in kids]
    internal = [v for v in range(n) if kids[v]]
    most = max((len(kids[v]) for v in internal), default=0)
    by_rank = [[kids[v][min(r, len(kids[v]) - 1)] for v in internal] for r in range(most)]
    siblings = [g for g in [roots, *(kids[v] for v in internal)] if len(g) >= 2]
    return Plan(
        fingerprint=h.fingerprint,
        num_nodes=n,
        num_leaves=k,
        max_depth=L,
        parent=_ro(parent),
        depth=_ro(depth),
        is_leaf=_ro(is_leaf, bool),
        levels=tuple(_ro(lv) for lv in levels),
        level_parents=tuple(_ro([par[v] for v in lv]) for lv in levels),
        level_position=_ro(level_position),
        children=tuple(_ro(c) for c in kids),
        child_offsets=_ro(np.cumsum([0] + num_children)),
        child_channels=_ro([c for group in kids for c in group]),
        num_children=_ro(num_children),
        max_children=max([c for c, v in zip(num_children, kids, strict=True) if v], default=1),
        roots=_ro(roots),
        child_rank=_ro(child_rank),
        level_child_ranks=tuple(level_child_ranks),
        bottom_up=_ro(bottom_up),
        edges=_ro(np.array([[c, par[c]] for c in edge_children], dtype=np.int64).reshape(-1, 2)),
        preorder=_ro(preorder),
        pre=_ro(pre),
        size=_ro(size),
        end=_ro(np.add(pre, size)),
        postorder=_ro(postorder),
        depth_channels=tuple(_ro(c) for c in classes),
        class_offsets=_ro(np.cumsum([0] + [c.size for c in classes])),
        class_channels=_ro(np.concatenate(classes)),
        ce_target=_ro(ce_target),
        tree_min_counted=_ro(tree_min_counted, np.float64),
        ce_counted=_ro(ce_counted, np.float64),
        path_real=_ro(np.arange(L)[None, :] < depth[:, None], bool),
        leaf_channels_sorted=_ro(np.sort(np.asarray(h.leaf_channels))),
        internal=_ro(internal),
        children_by_rank=_ro(np.array(by_rank, dtype=np.int64).reshape(most, len(internal))),
        sibling_groups=tuple(_ro(g) for g in siblings),
        channel_runs=tuple(runs),
        _hierarchy=h,
    )


def plan_for(h: Hierarchy) -> Plan:
    """The :class:`Plan` of ``h``, built once per fingerprint (thread-safe; the most recently used
    plans are kept)."""
    key = h.fingerprint
    plan = _PLANS.get(key)  # a hit takes no lock (torch.compile traces this path; locks break graphs)
    if plan is not None:
        return plan
    built = _build(h)  # outside the lock: a large tree does not block other hierarchies' lookups
    with _LOCK:
        plan = _PLANS.setdefault(key, built)  # two racing builders: the first one stored wins
        _PLANS.move_to_end(key)
        while len(_PLANS) > _CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def counted_entries_per_depth(h: Hierarchy) -> np.ndarray:
    """``[N, L]`` float64 (read-only): for a valid pixel labelled with channel c, how many of its
    (pixel, node) entries at depth d+1 the reductions count: the nodes at that depth that are not
    strictly below c (a partial label's unknown descendants are masked). A histogram of label
    channels times this table gives the per-depth counts of ``mean`` and ``hssn`` without a mask per
    pixel. :attr:`Plan.tree_min_counted`."""
    return plan_for(h).tree_min_counted


def ce_counted_per_depth(h: Hierarchy) -> np.ndarray:
    """``[N, L]`` float64 0/1 (read-only): for a valid pixel labelled with channel c, whether it
    counts for the cross-entropy at depth d+1 (the classes ``h.depth_channels[d]``, target
    ``ancestor_table[c, d]``): a leaf counts at every depth, a partial label down to its own depth
    only. A histogram of label channels times this table gives the per-depth counts of the
    cross-entropy's mean without a mask per pixel. :attr:`Plan.ce_counted`."""
    return plan_for(h).ce_counted
