"""The class hierarchy: one framework-agnostic object that every backend is driven by.

Two index spaces are used throughout:

* **node ids** (label values). Leaves are the data set's class ids ``0..K-1``; internal nodes
  are ``K..N-1``. Label maps hold node ids: a leaf id, or an internal node id for a *partial
  label* ("known only down to this node"), or ``ignore_index``.
* **channels**: the position of a node's logit in the network output ``[B, N, *spatial]``.
  The default layout is leaves in id order, then internal nodes by decreasing depth (ties by id).
  The name-based constructors (``from_dict``, ``from_names``, ``from_levels``) number internal
  nodes in that order, so there channels equal node ids; ``from_parents`` keeps the caller's ids.

Every table below is indexed by channel and holds channels, except where its name says
``label``/``leaf`` (those are indexed by node id / leaf id).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["Hierarchy", "HierarchyError", "LabelError"]

_FORMAT = "hieraloss.hierarchy"
# Every hierarchy alive, by fingerprint and then by identity: equal hierarchies are distinct objects, and
# any one that is still alive answers Hierarchy.by_fingerprint (registering only the first would lose
# the fingerprint when that one dies while an equal one lives on).
_LIVE: dict[str, weakref.WeakValueDictionary[int, Hierarchy]] = {}
_LIVE_LOCK = threading.Lock()
_FORMAT_VERSION = 1


class HierarchyError(ValueError):
    """The description of a hierarchy is not a valid rooted tree."""


class LabelError(ValueError):
    """A label map holds values that are neither node ids nor ``ignore_index``."""


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _lca_depth(paths_a: np.ndarray, depth_a: np.ndarray, paths_b: np.ndarray, depth_b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` int64: depth of the lowest common ancestor of each pair of root-first
    paths (rows of ``ancestor_table``), i.e. the length of their common prefix of genuine (not
    padded) entries. One depth at a time, so memory stays at the output's size."""
    lca = np.zeros((paths_a.shape[0], paths_b.shape[0]), dtype=np.int64)
    for d in range(paths_a.shape[1]):
        lca += (paths_a[:, d, None] == paths_b[None, :, d]) & (depth_a > d)[:, None] & (depth_b > d)[None, :]
    return lca


def _distance(paths_a: np.ndarray, depth_a: np.ndarray, paths_b: np.ndarray, depth_b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` int64: tree distance (edges through the LCA) between each pair, in place
    on one array of the output's size."""
    dist = _lca_depth(paths_a, depth_a, paths_b, depth_b)
    dist *= -2
    dist += depth_a[:, None]
    dist += depth_b[None, :]
    return dist


def _format_values(values: np.ndarray, limit: int = 10) -> str:
    values = np.asarray(values).ravel()
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return shown + (f", ... ({values.size} distinct values)" if values.size > limit else "")


class Hierarchy:
    """A rooted tree of classes with an implicit root that has no output channel.

    Build one with :meth:`from_parents`, :meth:`from_dict`, :meth:`from_names`,
    :meth:`from_levels` or :meth:`from_json`; the same tree gives an equal object whichever
    constructor made it.

    All table attributes are read-only numpy arrays, indexed by channel unless named otherwise.

    Attributes:
        num_nodes: N; ``num_leaves``: K; ``max_depth``: L.
        node_names: tuple of N names.
        node_ids: ``[N]`` node id (label value) of each channel; ``channel_of`` is its inverse.
        parent: ``[N]`` parent channel, -1 under the root.
        depth: ``[N]`` 1 for children of the root.
        is_leaf: ``[N]`` bool.
        children: tuple of N arrays of child channels (in channel order).
        leaf_channels: ``[K]`` channel of leaf id k.
        ancestor_table: ``[N, L]``; row v holds ``A(v)`` root-first (column d-1 = ancestor at
            depth d), padded with v itself for d > depth(v).
        children_table: ``[N, Cmax]`` child channels, padded with v itself (Cmax >= 1).
        leaf_paths: ``[K, L]`` = ``ancestor_table[leaf_channels]``: the channel at every depth of
            leaf k's path; a shallow leaf repeats itself below its depth.
        depth_channels: tuple of L arrays; entry d-1 lists the channels that are classes at
            depth d: the nodes at depth d plus the leaves shallower than d (ascending channel).

    Derived tables computed on first use (cached, read-only):
        descendant_table: ``[N, Dmax]``; row v holds ``D(v)`` in depth-first pre-order (v first,
            children visited in channel order), padded with v.
        is_ancestor: ``[N, N]`` bool, ``is_ancestor[u, v]`` is True iff u is in ``A(v)`` (u is v
            or an ancestor of v). Row u is therefore ``D(u)`` and column v is ``A(v)``.
        leaf_distance: ``[K, K]``, indexed by leaf id: tree distance psi between leaves (edges via
            the LCA; the implicit root counts).
        leaf_lca_height: ``[K, K]``, indexed by leaf id; entry ``[t, p]`` is the number of edges from the lowest
            common ancestor of leaves t and p down to t (0 if equal, 1 for siblings).
        height: ``[N]`` edges from node v down to the deepest leaf below it (0 for a leaf).
        node_leaf_distance: ``[N, K]``, rows by channel, columns by leaf id: tree distance psi
            between node v and leaf k (edges via their LCA); ``node_leaf_distance[leaf_channels]``
            is ``leaf_distance``.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, parents: Sequence[int], names: Sequence[str] | None = None,
                 order: str | Sequence[int] = "default"):
        parents_arr = self._check_parents(parents)
        n = parents_arr.size
        if names is None:
            names = [str(i) for i in range(n)]
        names = [str(s) for s in names] if not isinstance(names, str) else names
        if isinstance(names, str) or len(names) != n:
            raise HierarchyError(f"expected {n} node names, got {len(names)}")
        dups = sorted(name for name, count in Counter(names).items() if count > 1)
        if dups:
            raise HierarchyError(f"duplicate node names: {dups[:10]}")

        depth_by_id = self._depths(parents_arr)
        has_child = np.zeros(n, dtype=bool)
        has_child[parents_arr[parents_arr >= 0]] = True
        leaf_ids = np.flatnonzero(~has_child)
        k = leaf_ids.size
        if not np.array_equal(leaf_ids, np.arange(k)):
            bad = np.concatenate([leaf_ids[leaf_ids >= k], np.flatnonzero(has_child[:k])])
            raise HierarchyError(
                f"leaves must be node ids 0..K-1 (K={k} leaves here); these ids break that: "
                f"{_format_values(np.unique(bad))}"
            )

        self._parent_ids = _readonly(parents_arr)
        self._names_by_id = tuple(names)
        self._set_order(order, depth_by_id, k)
        self._build_tables(depth_by_id, k)
        with _LIVE_LOCK:
            for key in [key for key, alive in _LIVE.items() if not alive]:  # trees no hierarchy holds any more
                del _LIVE[key]
            _LIVE.setdefault(self.fingerprint, weakref.WeakValueDictionary())[id(self)] = self

    @staticmethod
    def by_fingerprint(fingerprint: str) -> Hierarchy:
        """A live hierarchy with this :attr:`fingerprint` (compiled ops receive the fingerprint, a
        plain string, instead of the object). Raises ``KeyError`` if none is alive."""
        for hierarchy in list(_LIVE.get(fingerprint, {}).values()):
            return hierarchy
        raise KeyError(f"no live Hierarchy has fingerprint {fingerprint!r}")

    @staticmethod
    def _check_parents(parents: Sequence[int]) -> np.ndarray:
        arr = np.asarray(parents)
        if arr.ndim != 1:
            raise HierarchyError(f"parents must be a flat list of ints, got shape {arr.shape}")
        if arr.size == 0:
            raise HierarchyError("the hierarchy is empty: it needs at least one node")
        if not (np.issubdtype(arr.dtype, np.integer)
                or (arr.dtype == object and all(isinstance(p, (int, np.integer)) for p in arr))):
            raise HierarchyError(f"parents must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        n = arr.size
        bad = np.flatnonzero((arr < -1) | (arr >= n))
        if bad.size:
            raise HierarchyError(
                f"unknown parent: nodes {_format_values(bad)} name parents "
                f"{_format_values(arr[bad])}, but node ids are 0..{n - 1} (-1 is the root)"
            )
        selfp = np.flatnonzero(arr == np.arange(n))
        if selfp.size:
            raise HierarchyError(f"cycle: nodes {_format_values(selfp)} are their own parent")
        return arr

    @staticmethod
    def _depths(parents: np.ndarray) -> np.ndarray:
        n = parents.size
        depth = np.zeros(n, dtype=np.int64)
        # Walk up all nodes at once: after n steps every node not in a cycle has reached the root.
        cur = parents.copy()
        alive = cur >= 0
        depth[:] = 1
        for _ in range(n):
            if not alive.any():
                break
            depth[alive] += 1
            cur[alive] = parents[cur[alive]]
            alive = cur >= 0
        if alive.any():
            raise HierarchyError(
                f"cycle: nodes {_format_values(np.flatnonzero(alive))} never reach the root"
            )
        return depth

    def _set_order(self, order: str | Sequence[int], depth_by_id: np.ndarray, k: int) -> None:
        n = depth_by_id.size
        ids = np.arange(n)
        if isinstance(order, str):
            if order == "default":
                internal = ids[k:]
                internal = internal[np.lexsort((internal, -depth_by_id[internal]))]
                node_ids = np.concatenate([ids[:k], internal])
            elif order == "coarse_to_fine":
                node_ids = np.lexsort((ids, depth_by_id))
            else:
                raise HierarchyError(
                    f"order must be 'default', 'coarse_to_fine' or a list of node ids, got {order!r}"
                )
            self._order_spec: str | tuple[int, ...] = order
        else:
            node_ids = np.asarray(order, dtype=np.int64)
            if node_ids.shape != (n,) or not np.array_equal(np.sort(node_ids), ids):
                raise HierarchyError(
                    f"an explicit order must be a permutation of the node ids 0..{n - 1}"
                )
            self._order_spec = tuple(int(i) for i in node_ids)
        channel_of = np.empty(n, dtype=np.int64)
        channel_of[node_ids] = ids
        self.node_ids = _readonly(node_ids.astype(np.int64))
        self.channel_of = _readonly(channel_of)

    def _build_tables(self, depth_by_id: np.ndarray, k: int) -> None:
        n = depth_by_id.size
        ch = self.channel_of
        ids = self.node_ids
        self.num_nodes = n
        self.num_leaves = k
        self.max_depth = int(depth_by_id.max())
        L = self.max_depth

        pid = self._parent_ids[ids]
        parent = np.where(pid >= 0, ch[np.maximum(pid, 0)], -1)
        self.parent = _readonly(parent)
        self.depth = _readonly(depth_by_id[ids])
        self.node_names = tuple(self._names_by_id[i] for i in ids)
        self.is_leaf = _readonly(ids < k)
        self.leaf_channels = _readonly(ch[:k].copy())

        anc = np.repeat(np.arange(n)[:, None], L, axis=1)
        cur = np.arange(n)
        while True:
            ok = cur >= 0
            if not ok.any():
                break
            anc[np.flatnonzero(ok), self.depth[cur[ok]] - 1] = cur[ok]
            cur = np.where(ok, parent[np.maximum(cur, 0)], -1)
        self.ancestor_table = _readonly(anc)
        self.leaf_paths = _readonly(anc[self.leaf_channels])

        # Children of each node in channel order: a stable sort by parent keeps channels ascending.
        by_parent = np.argsort(parent, kind="stable")
        starts = np.searchsorted(parent[by_parent], np.arange(n + 1))
        children = [by_parent[starts[v]:starts[v + 1]] for v in range(n)]
        self.children = tuple(_readonly(c) for c in children)
        cmax = max(1, max(len(c) for c in children))
        ctab = np.repeat(np.arange(n)[:, None], cmax, axis=1)
        for v, c in enumerate(children):
            ctab[v, : len(c)] = c
        self.children_table = _readonly(ctab)

        self.depth_channels = tuple(
            _readonly(np.unique(self.leaf_paths[:, d])) for d in range(L)
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parents(cls, parents: Sequence[int], names: Sequence[str] | None = None, *,
                     order: str | Sequence[int] = "default") -> Hierarchy:
        """Build from ``parents[i]`` = parent id of node id i (-1 under the root).

        Leaves must be ids ``0..K-1``; internal ids ``K..N-1`` are what partial labels use.
        """
        return cls(parents, names, order)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any], *, order: str | Sequence[int] = "default") -> Hierarchy:
        """Build from a nested mapping.

        Internal nodes are mapping keys. A value is a nested mapping, a mapping ``{leaf name: leaf
        id}`` or a list of leaf names (ids are then assigned in order of appearance) - the two
        leaf forms cannot be mixed in one tree. Example: ``{"flat": {"road": 0, "sidewalk": 1},
        "sky": {"sky": 2}}``.
        """
        if not isinstance(tree, Mapping) or not tree:
            raise HierarchyError("from_dict needs a non-empty mapping of top-level nodes")
        internal: list[tuple[str, int]] = []  # (name, parent index in `internal` or -1)
        leaves: list[tuple[str, int | None, int]] = []  # (name, given id, parent internal index)

        def walk(node: Any, parent: int, path: str) -> None:
            if isinstance(node, Mapping):
                if not node:
                    raise HierarchyError(f"node {path!r} has no children")
                for key, sub in node.items():
                    if isinstance(sub, (bool, float)) or sub is None:
                        raise HierarchyError(f"leaf {key!r} under {path!r}: id must be an int, got {sub!r}")
                    if isinstance(sub, (int, np.integer)):
                        leaves.append((str(key), int(sub), parent))
                    else:
                        internal.append((str(key), parent))
                        walk(sub, len(internal) - 1, f"{path}/{key}")
            elif isinstance(node, (list, tuple)):
                if not node:
                    raise HierarchyError(f"node {path!r} has no children")
                for leaf in node:
                    if not isinstance(leaf, str):
                        raise HierarchyError(f"leaf lists hold names; got {leaf!r} under {path!r}")
                    leaves.append((leaf, None, parent))
            else:
                raise HierarchyError(f"node {path!r}: expected a mapping or a list, got {type(node).__name__}")

        walk(tree, -1, "")
        given = [leaf_id for _, leaf_id, _ in leaves]
        if all(g is None for g in given):
            leaf_ids = list(range(len(leaves)))
        elif any(g is None for g in given):
            raise HierarchyError("from_dict: give every leaf an id, or none (lists of names)")
        else:
            leaf_ids = given  # type: ignore[assignment]
            counts: dict[int, int] = {}
            for g in leaf_ids:
                counts[g] = counts.get(g, 0) + 1
            twice = sorted(g for g, c in counts.items() if c > 1)
            if twice:
                raise HierarchyError(f"a node with two parents: leaf ids {twice[:10]} appear more than once")
        return cls._from_flat(leaves, leaf_ids, internal, order)

    @classmethod
    def _from_flat(cls, leaves, leaf_ids, internal, order) -> Hierarchy:
        """Assign internal ids in default channel order and build; shared by the name-based constructors."""
        k = len(leaves)
        ids = sorted(leaf_ids)
        if ids != list(range(k)):
            missing = sorted(set(range(k)) - set(ids))
            extra = sorted(set(ids) - set(range(k)))
            raise HierarchyError(
                f"leaf ids must be exactly 0..{k - 1}; missing {missing[:10]}, unexpected {extra[:10]}"
            )
        m = len(internal)
        idepth = [0] * m
        for i, (_, p) in enumerate(internal):  # parents are listed before their children
            idepth[i] = 1 if p < 0 else idepth[p] + 1
        # Default layout: deeper internal nodes first; within a depth, order of appearance.
        rank = sorted(range(m), key=lambda i: (-idepth[i], i))
        new_id = {old: k + pos for pos, old in enumerate(rank)}
        parents = [0] * (k + m)
        names = [""] * (k + m)
        for (name, _, p), lid in zip(leaves, leaf_ids, strict=True):
            parents[lid] = new_id[p] if p >= 0 else -1
            names[lid] = name
        for old, (name, p) in enumerate(internal):
            parents[new_id[old]] = new_id[p] if p >= 0 else -1
            names[new_id[old]] = name
        return cls(parents, names, order)

    @classmethod
    def from_names(cls, names: Sequence[str], sep: str = "--", *,
                   order: str | Sequence[int] = "default") -> Hierarchy:
        """Read the tree off hierarchical leaf names: ``names[i]`` is leaf id i.

        ``"construction--flat--road"`` makes leaf ``road`` under ``construction--flat`` under
        ``construction``. Internal nodes are named by their full prefix.
        """
        names = list(names)
        if not names:
            raise HierarchyError("the hierarchy is empty: no names given")
        prefixes: dict[str, int] = {}
        internal: list[tuple[str, int]] = []
        leaves: list[tuple[str, int | None, int]] = []
        for i, name in enumerate(names):
            parts = str(name).split(sep)
            if any(p == "" for p in parts):
                raise HierarchyError(f"name {i} ({name!r}) has an empty part between {sep!r}")
            parent = -1
            for j in range(1, len(parts)):
                prefix = sep.join(parts[:j])
                if prefix not in prefixes:
                    internal.append((prefix, parent))
                    prefixes[prefix] = len(internal) - 1
                parent = prefixes[prefix]
            leaves.append((str(name), i, parent))
        clash = sorted(set(prefixes) & {str(n) for n in names})
        if clash:
            raise HierarchyError(f"names {clash[:10]} are both a leaf and a prefix of other names")
        return cls._from_flat(leaves, list(range(len(names))), internal, order)

    @classmethod
    def from_levels(cls, parent_of: Sequence[Sequence[int]],
                    names: Sequence[Sequence[str]] | None = None, *,
                    order: str | Sequence[int] = "default") -> Hierarchy:
        """Build a balanced tree from the published per-level parent lists, finest level first.

        ``parent_of[0][k]`` is the index, among the next coarser level's nodes, of leaf k's parent;
        ``parent_of[1][j]`` the same for node j of that level, and so on; the last list's targets are
        the depth-1 nodes. ``names``, if given, has one list per level, finest first (``len(parent_of)
        + 1`` lists). Cityscapes: ``from_levels([[0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]])``.
        """
        if len(parent_of) == 0:
            raise HierarchyError("from_levels needs at least one list (leaf -> parent)")
        levels = [np.asarray(p, dtype=np.int64) for p in parent_of]
        sizes = [lv.size for lv in levels]
        for i, lv in enumerate(levels):
            if lv.ndim != 1 or lv.size == 0:
                raise HierarchyError(f"level {i} must be a non-empty flat list")
            if lv.min() < 0:
                raise HierarchyError(f"level {i} has negative parent indices")
        counts = [lv.size for lv in levels] + [int(levels[-1].max()) + 1]
        for i in range(len(levels) - 1):
            if int(levels[i].max()) >= sizes[i + 1]:
                raise HierarchyError(
                    f"level {i} names parent {int(levels[i].max())}, but level {i + 1} has {sizes[i + 1]} nodes"
                )
        for i, lv in enumerate(levels):
            unused = sorted(set(range(counts[i + 1])) - set(lv.tolist()))
            if unused:
                raise HierarchyError(f"level {i + 1} nodes {unused[:10]} have no children")
        offsets = np.concatenate([[0], np.cumsum(counts)])
        parents = np.full(offsets[-1], -1, dtype=np.int64)
        for i, lv in enumerate(levels):
            parents[offsets[i]: offsets[i + 1]] = lv + offsets[i + 1]
        if names is None:
            flat_names = [f"leaf{j}" for j in range(counts[0])] + [
                f"d{len(levels) - i}_{j}" for i in range(1, len(counts)) for j in range(counts[i])
            ]
        else:
            if len(names) != len(counts) or any(len(nl) != c for nl, c in zip(names, counts, strict=False)):
                raise HierarchyError(f"names must have one list per level with sizes {counts}")
            flat_names = [str(s) for nl in names for s in nl]
        return cls(parents, flat_names, order)

    # ------------------------------------------------------------------ JSON, equality, hashing
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "names": list(self._names_by_id),
            "parents": self._parent_ids.tolist(),
            "order": self._order_spec if isinstance(self._order_spec, str) else list(self._order_spec),
        }

    def to_json(self, path: str | os.PathLike | None = None, **kwargs: Any) -> str:
        """Serialise (node ids, names, parents, channel order); also writes ``path`` if given."""
        text = json.dumps(self.to_dict(), **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Hierarchy:
        """Inverse of :meth:`to_json`; ``source`` is JSON text or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HierarchyError(f"not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise HierarchyError(f"not a hieraloss hierarchy JSON (missing format={_FORMAT!r})")
        if data.get("version") != _FORMAT_VERSION:
            raise HierarchyError(f"unsupported hierarchy JSON version {data.get('version')!r}")
        return cls(data["parents"], data["names"], data.get("order", "default"))

    def with_order(self, order: str | Sequence[int]) -> Hierarchy:
        """The same tree with another channel layout."""
        return type(self)(self._parent_ids, self._names_by_id, order)

    @property
    def fingerprint(self) -> str:
        """A stable hex digest of tree, names and layout (equal objects have equal fingerprints)."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            # The explicit layout, not the order spec: "default" and the same list are equal trees.
            key = {"names": list(self._names_by_id), "parents": self._parent_ids.tolist(),
                   "channels": self.node_ids.tolist()}
            fp = hashlib.sha256(json.dumps(key).encode()).hexdigest()
            self.__dict__["_fingerprint"] = fp
        return fp

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hierarchy):
            return NotImplemented
        return (
            self._names_by_id == other._names_by_id
            and np.array_equal(self._parent_ids, other._parent_ids)
            and np.array_equal(self.node_ids, other.node_ids)
        )

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):
        return (type(self), (self._parent_ids.tolist(), list(self._names_by_id), self._order_spec))

    def __repr__(self) -> str:
        return (f"Hierarchy(num_nodes={self.num_nodes}, num_leaves={self.num_leaves}, "
                f"max_depth={self.max_depth})")

    def __str__(self) -> str:
        lines = [repr(self)]

        def show(ch: int, indent: int) -> None:
            kind = f"leaf {self.node_ids[ch]}" if self.is_leaf[ch] else f"node {self.node_ids[ch]}"
            lines.append(f"{'  ' * indent}[{ch}] {self.node_names[ch]} ({kind})")
            for c in self.children[ch]:
                show(int(c), indent + 1)

        for top in np.flatnonzero(self.parent < 0):
            show(int(top), 1)
        return "\n".join(lines)

    # ------------------------------------------------------------------ derived tables (lazy)
    # The [N, N], [N, Dmax] and [K, K] tables are built on first use: a 10000-leaf taxonomy would
    # otherwise take gigabytes before any of them is needed.
    @cached_property
    def is_ancestor(self) -> np.ndarray:
        """``[N, N]`` bool: ``is_ancestor[u, v]`` iff u is in ``A(v)``."""
        n, L = self.num_nodes, self.max_depth
        table = np.zeros((n, n), dtype=bool)
        table[self.ancestor_table.ravel(), np.repeat(np.arange(n), L)] = True
        return _readonly(table)

    @cached_property
    def descendant_table(self) -> np.ndarray:
        """``[N, Dmax]`` int64: row v holds ``D(v)`` in depth-first pre-order, padded with v."""
        # v comes first, and "first maximum in row order" equals the recursive rule
        # zmax_v = max(x_v, zmax of children in order).
        def preorder(v: int, out: list[int]) -> list[int]:
            out.append(v)
            for c in self.children[v]:
                preorder(int(c), out)
            return out

        n = self.num_nodes
        rows = [preorder(v, []) for v in range(n)]
        table = np.repeat(np.arange(n)[:, None], max(len(r) for r in rows), axis=1)
        for v, r in enumerate(rows):
            table[v, : len(r)] = r
        return _readonly(table)

    @cached_property
    def leaf_distance(self) -> np.ndarray:
        """``[K, K]`` int64 by leaf id: tree distance psi between leaves."""
        leaf_depth = self.depth[self.leaf_channels]
        return _readonly(_distance(self.leaf_paths, leaf_depth, self.leaf_paths, leaf_depth))

    @cached_property
    def leaf_lca_height(self) -> np.ndarray:
        """``[K, K]`` int64 by leaf id: edges from the LCA of leaves t and p down to t."""
        leaf_depth = self.depth[self.leaf_channels]
        height = _lca_depth(self.leaf_paths, leaf_depth, self.leaf_paths, leaf_depth)
        np.subtract(leaf_depth[:, None], height, out=height)
        return _readonly(height)

    @cached_property
    def height(self) -> np.ndarray:
        """``[N]`` int64: edges from node v down to the deepest leaf below it (0 for a leaf)."""
        h = np.zeros(self.num_nodes, dtype=np.int64)
        for d in range(self.max_depth, 1, -1):  # children before parents
            at = np.flatnonzero(self.depth == d)
            np.maximum.at(h, self.parent[at], h[at] + 1)
        return _readonly(h)

    @cached_property
    def node_leaf_distance(self) -> np.ndarray:
        """``[N, K]`` int64: tree distance psi between node v (row, channel) and leaf k (column,
        leaf id): edges on the path through their lowest common ancestor (the root counts)."""
        leaf_depth = self.depth[self.leaf_channels]
        return _readonly(_distance(self.ancestor_table, self.depth, self.leaf_paths, leaf_depth))

    # ------------------------------------------------------------------ queries
    @property
    def leaf_names(self) -> tuple[str, ...]:
        return self._names_by_id[: self.num_leaves]

    def channel(self, name: str) -> int:
        """Channel of the node called ``name``."""
        try:
            return self.node_names.index(name)
        except ValueError:
            raise KeyError(f"no node named {name!r}") from None

    def psi(self, u: int, v: int) -> int:
        """Tree distance between channels u and v (edges through their LCA; the root counts)."""
        au = set(self.ancestor_table[u, : self.depth[u]].tolist())
        common = [a for a in self.ancestor_table[v, : self.depth[v]].tolist() if a in au]
        lca_depth = len(common)
        return int(self.depth[u] + self.depth[v] - 2 * lca_depth)

    def check_ignore_index(self, ignore_index: int) -> None:
        """Raise if ``ignore_index`` is also a node id (it would silently drop a class)."""
        if 0 <= int(ignore_index) < self.num_nodes:
            raise LabelError(
                f"ignore_index={ignore_index} collides with node id {ignore_index} "
                f"({self._names_by_id[int(ignore_index)]!r}); use a value >= {self.num_nodes} or < 0"
            )

    def label_channels(self, labels: Any, ignore_index: int = 255) -> np.ndarray:
        """Validate a label array of node ids and map it to channels (-1 at ignored pixels).

        Raises :class:`LabelError` for float labels or values that are neither a node id nor
        ``ignore_index`` (listing them). The input is never modified.
        """
        labels = np.asarray(labels)
        self.check_ignore_index(ignore_index)
        if not np.issubdtype(labels.dtype, np.integer):
            raise LabelError(f"labels must be integers, got dtype {labels.dtype}")
        lab = labels.astype(np.int64)
        error = self.invalid_label_error(lab, ignore_index)
        if error is not None:
            raise error
        ignored = lab == ignore_index
        return np.where(ignored, -1, self.channel_of[np.where(ignored, 0, lab)])

    def invalid_label_error(self, labels: Any, ignore_index: int = 255) -> LabelError | None:
        """The :class:`LabelError` listing the values of an integer label array that are neither a
        node id nor ``ignore_index``, or None if there are none (backends build theirs with it)."""
        lab = np.asarray(labels).astype(np.int64)
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= self.num_nodes))
        if not bad.any():
            return None
        return LabelError(
            f"labels hold values that are neither node ids 0..{self.num_nodes - 1} nor "
            f"ignore_index={ignore_index}: {_format_values(np.unique(lab[bad]))}. {self.label_fix_hint()}"
        )

    def label_fix_hint(self) -> str:
        """What to do about label values outside the node ids (part of every backend's message)."""
        return (f"Labels hold leaf ids 0..{self.num_leaves - 1} (a data set's train ids, in the hierarchy's "
                f"leaf order), internal node ids {self.num_leaves}..{self.num_nodes - 1} for partial labels, "
                f"or ignore_index. If these are a data set's raw ids (e.g. Cityscapes label ids 0..33), map "
                f"them to train ids first (a lookup table: train_id = table[raw_id]) and send void classes to "
                f"ignore_index")

    def label_table(self, ignore_index: int = 255) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """A lookup table for mapping labels to channels in a few vectorized passes.

        Returns ``(table, shift, bad, partial)``. For a label value v in ``[lo, hi]`` =
        ``[min(0, ignore_index), max(N - 1, ignore_index)]``, slot ``v + shift`` (``shift = 1 - lo``)
        holds v's channel, -1 for ``ignore_index``, -2 for a value that is neither. Slot 0 and the
        last slot stand for every value below / above the range, so ``table[clip(labels + shift, 0,
        len(table) - 1)]`` maps any label array. ``bad`` / ``partial`` (bool, same length) flag the
        slots of invalid values / of internal nodes (partial labels).
        """
        ignore_index = int(ignore_index)
        self.check_ignore_index(ignore_index)
        lo, hi = min(0, ignore_index), max(self.num_nodes - 1, ignore_index)
        shift = 1 - lo
        table = np.full(hi - lo + 3, -2, dtype=np.int64)
        table[shift: shift + self.num_nodes] = self.channel_of
        table[ignore_index + shift] = -1
        partial = np.zeros(table.size, dtype=bool)
        partial[shift + self.num_leaves: shift + self.num_nodes] = True
        return table, shift, table == -2, partial

    def labels_at_depth(self, labels: Any, depth: int, ignore_index: int = 255) -> np.ndarray:
        """Map node-id labels to the node id of their class at ``depth`` (1..L).

        A leaf shallower than ``depth`` is its own class there. A partial label (internal node)
        is unknown below its depth and becomes ``ignore_index`` there.
        """
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in 1..{self.max_depth}, got {depth}")
        ch = self.label_channels(labels, ignore_index)
        valid = ch >= 0
        safe = np.where(valid, ch, 0)
        at = self.ancestor_table[safe, depth - 1]
        known = valid & (self.is_leaf[safe] | (self.depth[safe] >= depth))
        return np.where(known, self.node_ids[at], ignore_index).astype(np.int64)

    def consistent_mask(self, depth_labels: Any, ignore_index: int = 255) -> np.ndarray:
        """For per-depth node-id maps ``[B, L, *spatial]``, True where the L labels form a path.

        The depth-L label must be a class at depth L (a leaf) and every coarser label its ancestor
        at that depth. Pixels holding ``ignore_index`` or out-of-range values at any depth are False.
        """
        lab = np.asarray(depth_labels)
        if lab.ndim < 2 or lab.shape[1] != self.max_depth:
            raise ValueError(
                f"depth_labels must be [B, {self.max_depth}, *spatial], got shape {lab.shape}"
            )
        lab = lab.astype(np.int64)
        in_range = ((lab >= 0) & (lab < self.num_nodes)).all(axis=1)
        safe = np.where((lab >= 0) & (lab < self.num_nodes), lab, 0)
        deepest = self.channel_of[safe[:, -1]]
        ok = in_range & self.is_leaf[deepest]
        for d in range(self.max_depth):
            ok &= self.node_ids[self.ancestor_table[deepest, d]] == safe[:, d]
        return ok

    def expand_targets(self, labels: Any, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
        """Per-node targets and loss mask for a label array ``[B, *spatial]``.

        Returns ``(targets, mask)``, both ``[B, N, *spatial]`` in channel order: ``targets`` is
        uint8, 1 on the path of the labelled node; ``mask`` is bool, False at ignored pixels and,
        for a partial label at node c, on c's strict descendants (unknown), True elsewhere.
        """
        ch = self.label_channels(labels, ignore_index)
        if ch.ndim == 0:
            raise LabelError("labels need a batch dimension: [B, *spatial]")
        valid = ch >= 0
        safe = np.where(valid, ch, 0)
        # Node v is positive iff the labelled node's ancestor at depth(v) is v.
        d = self.depth - 1  # [N]
        anc_at = self.ancestor_table[safe[:, None, ...], d.reshape((1, -1) + (1,) * (ch.ndim - 1))]
        v = np.arange(self.num_nodes).reshape((1, -1) + (1,) * (ch.ndim - 1))
        positive = anc_at == v
        # Strict descendants of an internal labelled node are unknown.
        label_depth = self.depth[safe][:, None, ...]
        below = self.ancestor_table[v, np.minimum(label_depth, self.max_depth) - 1] == safe[:, None, ...]
        unknown = below & (v != safe[:, None, ...]) & ~self.is_leaf[safe][:, None, ...]
        mask = valid[:, None, ...] & ~unknown
        targets = (positive & valid[:, None, ...]).astype(np.uint8)
        return targets, mask
