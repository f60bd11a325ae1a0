"""Deliberately naive references: Python loops per pixel and per node, in float64.

Written independently of ``hieraloss.numpy``: the tree is only read through ``parent`` pointers
(plus ``channel_of``/``node_ids``/``depth``/``is_leaf`` to name things), never through the padded
tables. Everything works in channel space; label values are converted once per pixel.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from hieraloss import Hierarchy

IGNORE = 255


# ---------------------------------------------------------------------------- tree walking
class Tree:
    """A Hierarchy seen through its parent pointers only."""

    def __init__(self, h: Hierarchy):
        self.h = h
        self.n = h.num_nodes
        self.parent = [int(p) for p in h.parent]
        self.children = [[u for u in range(self.n) if self.parent[u] == v] for v in range(self.n)]
        self.roots = [u for u in range(self.n) if self.parent[u] < 0]
        self.anc = [self._ancestors(v) for v in range(self.n)]  # root-first, v last
        self.desc = [self._preorder(v) for v in range(self.n)]  # v first, children in channel order
        self.depth = [len(a) for a in self.anc]
        self.max_depth = max(self.depth)
        self.leaves = sorted(u for u in range(self.n) if not self.children[u])  # leaf channels

    def _ancestors(self, v):
        out = []
        while v >= 0:
            out.append(v)
            v = self.parent[v]
        return out[::-1]

    def _preorder(self, v):
        out = [v]
        for c in self.children[v]:
            out.extend(self._preorder(c))
        return out

    def channel(self, label, ignore_index=IGNORE):
        """Channel of a label value, None if ignored; raises on anything else."""
        label = int(label)
        if label == ignore_index:
            return None
        if not 0 <= label < self.n:
            raise ValueError(f"bad label {label}")
        return int(self.h.channel_of[label])

    def node_id(self, channel):
        return int(self.h.node_ids[channel])

    def psi(self, u, v):
        """Tree distance between channels u and v, from the root-first paths."""
        a, b = self.anc[u], self.anc[v]
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        return len(a) + len(b) - 2 * common

    def leaf_psi(self, leaf_a, leaf_b):
        return self.psi(int(self.h.channel_of[leaf_a]), int(self.h.channel_of[leaf_b]))

    def path_of(self, channel):
        """Node channels at depths 1..L of ``channel``'s path, a shallow node repeating itself."""
        a = self.anc[channel]
        return a + [channel] * (self.max_depth - len(a))


def taxonomy_parents(branching: int) -> list[int]:
    """Parent ids of a two-level taxonomy: ``branching`` groups under the root, each holding
    ``branching`` leaves (leaf ids first, then the groups)."""
    k = branching * branching
    return [k + i // branching for i in range(k)] + [-1] * branching


@functools.lru_cache(maxsize=32)
def tree(h: Hierarchy) -> Tree:
    return Tree(h)


def pixels(shape):
    """Every (b, *spatial) index of a label shape."""
    return list(np.ndindex(*shape))


def at(arr, pix, channel):
    """arr[b, channel, *spatial] for pixel pix = (b, *spatial)."""
    return arr[(pix[0], channel) + tuple(pix[1:])]


def index(pix, channel):
    return (pix[0], channel) + tuple(pix[1:])


# ---------------------------------------------------------------------------- scalar math
def softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def sigmoid(z):
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


# ---------------------------------------------------------------------------- targets
def node_targets(t: Tree, c):
    """For labelled channel c: lists y[v] (0/1) and known[v] (False on strict descendants of an
    internal c: unknown)."""
    y = [1 if v in t.anc[c] else 0 for v in range(t.n)]
    known = [True] * t.n
    if t.children[c]:
        for v in t.desc[c][1:]:
            known[v] = False
    return y, known


def expand_targets(labels, h, ignore_index=IGNORE):
    t = tree(h)
    labels = np.asarray(labels)
    targets = np.zeros((labels.shape[0], t.n) + labels.shape[1:], dtype=np.uint8)
    mask = np.zeros(targets.shape, dtype=bool)
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        y, known = node_targets(t, c)
        for v in range(t.n):
            targets[index(pix, v)] = y[v] if known[v] else 0
            mask[index(pix, v)] = known[v]
    return targets, mask


def labels_at_depth(labels, h, depth, ignore_index=IGNORE):
    t = tree(h)
    labels = np.asarray(labels)
    out = np.full(labels.shape, ignore_index, dtype=np.int64)
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        if t.children[c] and t.depth[c] < depth:
            continue  # a partial label is unknown below its own depth
        out[pix] = t.node_id(t.path_of(c)[depth - 1])
    return out


# ---------------------------------------------------------------------------- tree-min losses
def _zmin(t, x, pix, v):
    """(value, argmin channel): shallowest ancestor wins a tie."""
    best, arg = None, None
    for u in t.anc[v]:
        val = float(at(x, pix, u))
        if best is None or val < best:
            best, arg = val, u
    return best, arg


def _zmax(t, x, pix, v):
    """(value, argmax channel): first in depth-first pre-order wins a tie."""
    best, arg = None, None
    for u in t.desc[v]:
        val = float(at(x, pix, u))
        if best is None or val > best:
            best, arg = val, u
    return best, arg


def _term(y, z, gamma):
    """(loss, d loss / d z) of one node; gamma None = tree-min, else focal."""
    if y:
        p = sigmoid(z)
        sp = softplus(-z)
        if gamma is None:
            return sp, -(1.0 - p)
        g = gamma
        loss = (1.0 - p) ** g * sp
        d = -((1.0 - p) ** (g + 1)) - (g * p * (1.0 - p) ** g * sp if g else 0.0)
        return loss, d
    q = sigmoid(z)
    sp = softplus(z)
    if gamma is None:
        return sp, q
    g = gamma
    loss = q**g * sp
    d = q ** (g + 1) + (g * q**g * (1.0 - q) * sp if g else 0.0)
    return loss, d


def loss_map(logits, labels, h, gamma=None, ignore_index=IGNORE, node_weight=None):
    """``(l [B, N, *spatial] float64, mask bool)``: per-node loss (0 where masked)."""
    t = tree(h)
    x = np.asarray(logits).astype(np.float64)
    labels = np.asarray(labels)
    out = np.zeros(x.shape)
    mask = np.zeros(x.shape, dtype=bool)
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        y, known = node_targets(t, c)
        for v in range(t.n):
            if not known[v]:
                continue
            z = _zmin(t, x, pix, v)[0] if y[v] else _zmax(t, x, pix, v)[0]
            w = 1.0 if node_weight is None else float(node_weight[v])
            out[index(pix, v)] = w * _term(y[v], z, gamma)[0]
            mask[index(pix, v)] = True
    return out, mask


def reduce(lmap, mask, h, reduction):
    t = tree(h)
    if reduction == "none":
        return lmap
    if reduction == "sum":
        return float(lmap.sum())
    if reduction == "mean":
        count = int(mask.sum())
        return float(lmap.sum()) / count if count else 0.0
    if reduction == "hssn":
        total = 0.0
        for d in range(1, t.max_depth + 1):
            nodes = [v for v in range(t.n) if t.depth[v] == d]
            count = int(mask[:, nodes].sum())
            if count:
                total += float(lmap[:, nodes].sum()) / count
        return 5.0 * total
    raise ValueError(reduction)


def tree_min_loss(logits, labels, h, *, gamma=None, ignore_index=IGNORE, reduction="mean", node_weight=None):
    """gamma None: tree-min; a number: focal tree-min."""
    lmap, mask = loss_map(logits, labels, h, gamma, ignore_index, node_weight)
    return reduce(lmap, mask, h, reduction)


def _entry_weights(mask, h, reduction, upstream):
    """d reduced / d l[b, v, pix] for every entry (before the mask)."""
    t = tree(h)
    if reduction == "none":
        return np.ones(mask.shape) if upstream is None else np.asarray(upstream, dtype=np.float64)
    up = 1.0 if upstream is None else float(np.asarray(upstream))
    if reduction == "sum":
        return np.full(mask.shape, up)
    if reduction == "mean":
        count = int(mask.sum())
        return np.full(mask.shape, up / count if count else 0.0)
    w = np.zeros(mask.shape)
    for d in range(1, t.max_depth + 1):
        nodes = [v for v in range(t.n) if t.depth[v] == d]
        count = int(mask[:, nodes].sum())
        if count:
            w[:, nodes] = 5.0 * up / count
    return w


def tree_min_grad(
    logits, labels, h, *, gamma=None, ignore_index=IGNORE, reduction="mean", node_weight=None, upstream=None
):
    """Analytic d(sum(reduced * upstream)) / d logits, routed to the arg-min/max by the tie rule."""
    t = tree(h)
    x = np.asarray(logits).astype(np.float64)
    labels = np.asarray(labels)
    _, mask = loss_map(x, labels, h, gamma, ignore_index, node_weight)
    ew = _entry_weights(mask, h, reduction, upstream)
    grad = np.zeros(x.shape)
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        y, known = node_targets(t, c)
        for v in range(t.n):
            if not known[v]:
                continue
            z, arg = _zmin(t, x, pix, v) if y[v] else _zmax(t, x, pix, v)
            w = 1.0 if node_weight is None else float(node_weight[v])
            grad[index(pix, arg)] += ew[index(pix, v)] * w * _term(y[v], z, gamma)[1]
    return grad


# ---------------------------------------------------------------------------- decoding
def _argmax(candidates, score):
    """First candidate (in the given order) with the largest score."""
    best, arg = None, None
    for c in candidates:
        s = score(c)
        if best is None or s > best:
            best, arg = s, c
    return arg


def leaf_scores(logits, h, pix, method):
    """{leaf channel: score} for the path / hssn decoders at one pixel."""
    t = tree(h)
    x = np.asarray(logits).astype(np.float64)
    vals = [float(at(x, pix, v)) for v in range(t.n)]
    if method == "hssn":
        m = max(vals)
        e = [math.exp(v - m) for v in vals]
        s = sum(e)
        vals = [v / s for v in e]
    out = {}
    for leaf in t.leaves:
        total = 0.0
        for u in t.anc[leaf]:  # root-first
            total += vals[u]
        out[leaf] = total
    return out


def decode(logits, h, method="path"):
    """Brute force: ``(leaf node ids [B, *spatial], depth node ids [B, L, *spatial])``."""
    t = tree(h)
    x = np.asarray(logits).astype(np.float64)
    shape = (x.shape[0],) + x.shape[2:]
    leaf_out = np.zeros(shape, dtype=np.int64)
    depth_out = np.zeros((shape[0], t.max_depth) + shape[1:], dtype=np.int64)
    for pix in pixels(shape):
        if method in ("path", "hssn"):
            scores = leaf_scores(x, h, pix, method)
            chosen = _argmax(t.leaves, scores.__getitem__)
            path = t.path_of(chosen)
        elif method == "top_down":
            chosen = _argmax(t.roots, lambda u, pix=pix: float(at(x, pix, u)))
            while t.children[chosen]:
                chosen = _argmax(t.children[chosen], lambda u, pix=pix: float(at(x, pix, u)))
            path = t.path_of(chosen)
        elif method == "independent":
            path = []
            for d in range(1, t.max_depth + 1):
                cands = sorted(
                    v for v in range(t.n) if t.depth[v] == d or (not t.children[v] and t.depth[v] < d)
                )
                path.append(_argmax(cands, lambda u, pix=pix: float(at(x, pix, u))))
            chosen = path[-1]
        else:
            raise ValueError(method)
        leaf_out[pix] = t.node_id(chosen)
        for d, v in enumerate(path):
            depth_out[index(pix, d)] = t.node_id(v)
    return leaf_out, depth_out


# ---------------------------------------------------------------------------- triplet loss
def nearest_source(n_in, n_out, dst):
    """torch F.interpolate(mode="nearest") source index, with its float32 arithmetic."""
    if n_in == n_out:
        return dst
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    return min(int(math.floor(float(np.float32(np.float32(dst) * scale)))), n_in - 1)


def resize_nearest(labels, size):
    labels = np.asarray(labels)
    out = np.zeros((labels.shape[0],) + tuple(size), dtype=labels.dtype)
    for pix in pixels(out.shape):
        src = (pix[0],) + tuple(
            nearest_source(labels.shape[i + 1], size[i], pix[i + 1]) for i in range(len(size))
        )
        out[pix] = labels[src]
    return out


def margin(h, a, p, n, base_margin=0.1):
    t = tree(h)
    return base_margin + (t.leaf_psi(a, n) - t.leaf_psi(a, p)) / (2.0 * t.max_depth)


def first_triplets(labels, h, max_per_class=200, ignore_index=IGNORE):
    """[(class, [(a, p, n) flat pixel indices])] with the first-K rule; labels at embedding size."""
    t = tree(h)
    flat = [int(v) for v in np.asarray(labels).reshape(-1)]
    leaf_of = []  # leaf id per pixel or None
    for v in flat:
        c = t.channel(v, ignore_index)
        leaf_of.append(None if c is None or t.children[c] else v)
    present = sorted({v for v in leaf_of if v is not None})

    def parent_of_leaf(k):
        return t.parent[int(h.channel_of[k])]

    out = []
    for c in present:
        pc = parent_of_leaf(c)
        anchors = [i for i, v in enumerate(leaf_of) if v == c]
        positives = [i for i, v in enumerate(leaf_of) if v is not None and v != c and parent_of_leaf(v) == pc]
        negatives = [i for i, v in enumerate(leaf_of) if v is not None and parent_of_leaf(v) != pc]
        k = min(max_per_class, len(anchors), len(positives), len(negatives))
        if k:
            out.append((c, list(zip(anchors[:k], positives[:k], negatives[:k], strict=False))))
    return out


def triplet_loss_from(embeddings, labels_small, h, triplets_by_class, base_margin=0.1):
    """Loss for explicit triplets; embeddings [B, C, *spatial] at the labels' size."""
    e = np.asarray(embeddings).astype(np.float64)
    vecs = np.moveaxis(e, 1, -1).reshape(-1, e.shape[1])
    flat = np.asarray(labels_small).reshape(-1)
    unit = []
    for v in vecs:
        norm = math.sqrt(sum(float(a) * float(a) for a in v))
        unit.append([float(a) / max(norm, 1e-12) for a in v])

    def dist(i, j):
        return 1.0 - sum(a * b for a, b in zip(unit[i], unit[j], strict=False))

    class_losses = []
    for _c, trips in triplets_by_class:
        per = [
            max(
                dist(a, p) - dist(a, n) + margin(h, int(flat[a]), int(flat[p]), int(flat[n]), base_margin),
                0.0,
            )
            for a, p, n in trips
        ]
        class_losses.append(sum(per) / len(per))
    return sum(class_losses) / len(class_losses) if class_losses else 0.0


def triplet_loss_first(embeddings, labels, h, max_per_class=200, base_margin=0.1, ignore_index=IGNORE):
    """The whole triplet loss with sampling="first": resize, sample, score."""
    size = np.asarray(embeddings).shape[2:]
    small = resize_nearest(labels, size)
    trips = first_triplets(small, h, max_per_class, ignore_index)
    return triplet_loss_from(embeddings, small, h, trips, base_margin)


def triplet_weight(step, total):
    return 0.5 if step >= total else 0.25 * (1 + math.cos(math.pi * (step - total) / total))


# ---------------------------------------------------------------------------- published formula
# Cityscapes (26 channels: 19 train-id leaves, then the 7 categories). Category j owns the leaves in
# CITYSCAPES_GROUPS[j] (contiguous ranges in the published code).
CITYSCAPES_GROUPS = [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9], [10], [11, 12], [13, 14, 15, 16, 17, 18]]


def published_cityscapes_hssn(logits, labels, eps=1e-8):
    """Clean-room restatement of the published Cityscapes tree-min loss (SPEC sections 4 and 9):
    probabilities, per-class loops, log(p + eps), per-level normalisation, times 5. Does not
    overwrite the caller's labels."""
    x = np.asarray(logits).astype(np.float64)
    labels = np.asarray(labels)
    s = 1.0 / (1.0 + np.exp(-x))
    b = x.shape[0]
    spatial = x.shape[2:]
    n_leaf, n_cat = 19, 7
    cat_of = {leaf: j for j, group in enumerate(CITYSCAPES_GROUPS) for leaf in group}
    valid = labels != 255
    leaf_lab = np.where(valid, labels, 0)
    cat_lab = np.vectorize(lambda v: cat_of[int(v)])(leaf_lab) if leaf_lab.size else leaf_lab
    # negative scores: leaves themselves; a category: max over itself and its leaves
    neg_leaf = s[:, :n_leaf]
    neg_cat = np.zeros((b, n_cat) + spatial)
    for j, group in enumerate(CITYSCAPES_GROUPS):
        neg_cat[:, j] = np.max(np.stack([s[:, n_leaf + j]] + [s[:, k] for k in group]), axis=0)
    # positive scores: categories themselves; a leaf: min over itself and its category
    pos_cat = s[:, n_leaf:]
    pos_leaf = np.zeros((b, n_leaf) + spatial)
    for j, group in enumerate(CITYSCAPES_GROUPS):
        for k in group:
            pos_leaf[:, k] = np.minimum(s[:, k], s[:, n_leaf + j])
    num = valid.sum()
    leaf_total = 0.0
    for k in range(n_leaf):
        y = (leaf_lab == k).astype(np.float64)
        term = -y * np.log(pos_leaf[:, k] + eps) - (1 - y) * np.log(1 - neg_leaf[:, k] + eps)
        leaf_total += float((term * valid).sum())
    cat_total = 0.0
    for j in range(n_cat):
        y = (cat_lab == j).astype(np.float64)
        term = -y * np.log(pos_cat[:, j] + eps) - (1 - y) * np.log(1 - neg_cat[:, j] + eps)
        cat_total += float((term * valid).sum())
    return 5.0 * (leaf_total / num / n_leaf + cat_total / num / n_cat)


# ---------------------------------------------------------------------------- leaf-logit objectives
# Leaf logits [B, K, *spatial] in leaf-id order: leaf channel v is logit column t.node_id(v).
def node_height(t: Tree, v):
    """Edges from channel v down to its deepest leaf, by recursion over children."""
    return 0 if not t.children[v] else 1 + max(node_height(t, c) for c in t.children[v])


def _leaf_log_probs(t: Tree, leaf_logits, pix):
    """{leaf channel: log softmax over the K leaves} at one pixel."""
    vals = {v: float(at(leaf_logits, pix, t.node_id(v))) for v in t.leaves}
    m = max(vals.values())
    log_z = m + math.log(sum(math.exp(s - m) for s in vals.values()))
    return {v: s - log_z for v, s in vals.items()}


def _log_p_node(t: Tree, logp, v):
    """log of the summed leaf probabilities under channel v (log-sum-exp over its leaves)."""
    under = [logp[u] for u in t.desc[v] if not t.children[u]]
    m = max(under)
    return m + math.log(sum(math.exp(s - m) for s in under))


def _leaf_reduce(out, valid, reduction):
    if reduction == "none":
        return out
    if reduction == "sum":
        return float(out.sum())
    count = int(valid.sum())
    return float(out.sum()) / count if count else 0.0


def hxe_weight(t: Tree, node, alpha, weighting="depth", normalize=False):
    """The weight of the edge into channel ``node``: exp(-alpha * depth) (depth: the number of nodes on
    its root path, 1 for a top-level node; the published weighting) or exp(-alpha * height);
    ``normalize`` divides by the sum of the weights of every node, the root included (the released
    code's ``get_exponential_weighting`` sums over all tree positions)."""
    def level(v):
        return len(t.anc[v]) if weighting == "depth" else node_height(t, v)

    w = math.exp(-alpha * level(node))
    if normalize:
        tops = [v for v in range(len(t.anc)) if len(t.anc[v]) == 1]
        root_level = 0 if weighting == "depth" else 1 + max(node_height(t, v) for v in tops)
        w /= sum(math.exp(-alpha * level(v)) for v in range(len(t.anc))) + math.exp(-alpha * root_level)
    return w


def hierarchical_cross_entropy(leaf_logits, labels, h, *, alpha=0.1, ignore_index=IGNORE, reduction="mean",
                               weighting="depth", normalize=False):
    """Per pixel: -sum over the edges (parent, C) of the label's root path of
    w(C) * (log p(C) - log p(parent)), log p(root) = 0, w from :func:`hxe_weight`."""
    t = tree(h)
    x = np.asarray(leaf_logits).astype(np.float64)
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.float64)
    valid = np.zeros(labels.shape, dtype=bool)
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        logp = _leaf_log_probs(t, x, pix)
        total, parent_logp = 0.0, 0.0
        for node in t.anc[c]:  # root-first
            node_logp = _log_p_node(t, logp, node)
            total -= hxe_weight(t, node, alpha, weighting, normalize) * (node_logp - parent_logp)
            parent_logp = node_logp
        out[pix] = total
        valid[pix] = True
    return _leaf_reduce(out, valid, reduction)


def soft_label_cross_entropy(leaf_logits, labels, h, *, beta=1.0, ignore_index=IGNORE, reduction="mean"):
    """Per pixel: -sum_l q(l) log p(l), q(l) proportional to exp(-beta * psi(label node, leaf l))."""
    t = tree(h)
    x = np.asarray(leaf_logits).astype(np.float64)
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.float64)
    valid = np.zeros(labels.shape, dtype=bool)
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        logp = _leaf_log_probs(t, x, pix)
        dist = {v: t.psi(c, v) for v in t.leaves}
        dmin = min(dist.values())
        weights = {v: math.exp(-beta * (d - dmin)) for v, d in dist.items()}
        z = sum(weights.values())
        out[pix] = -sum(weights[v] / z * logp[v] for v in t.leaves)
        valid[pix] = True
    return _leaf_reduce(out, valid, reduction)


def decode_leaf_logits(leaf_logits, h, method="argmax"):
    """``argmax``: the leaf with the largest logit (first in leaf-id order); ``top_down``: at each
    depth the child (channel order, first wins) with the largest sum of leaf softmax probabilities."""
    t = tree(h)
    x = np.asarray(leaf_logits).astype(np.float64)
    shape = (x.shape[0],) + x.shape[2:]
    leaf_out = np.zeros(shape, dtype=np.int64)
    depth_out = np.zeros((shape[0], t.max_depth) + shape[1:], dtype=np.int64)
    for pix in pixels(shape):
        if method == "argmax":
            k = _argmax(range(h.num_leaves), lambda k, pix=pix: float(at(x, pix, k)))
            chosen = int(h.channel_of[k])
        elif method == "top_down":
            vals = [float(at(x, pix, k)) for k in range(h.num_leaves)]
            m = max(vals)
            e = [math.exp(s - m) for s in vals]
            prob = {int(h.channel_of[k]): e[k] / sum(e) for k in range(h.num_leaves)}

            def mass(v, prob=prob):
                return sum(prob[u] for u in t.desc[v] if not t.children[u])

            chosen = _argmax(t.roots, mass)
            while t.children[chosen]:
                chosen = _argmax(t.children[chosen], mass)
        else:
            raise ValueError(method)
        leaf_out[pix] = t.node_id(chosen)
        for d, v in enumerate(t.path_of(chosen)):
            depth_out[index(pix, d)] = t.node_id(v)
    return leaf_out, depth_out


# ---------------------------------------------------------------------------- LogicSeg
def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _pixels(x):
    """Per pixel, the list of node logits (channel order), pixels in (batch, spatial) order."""
    b, n = x.shape[:2]
    flat = x.reshape(b, n, -1)
    return [[float(flat[i, v, j]) for v in range(n)] for i in range(b) for j in range(flat.shape[2])]


def _pmean(values, p):
    m = sum(v**p for v in values) / len(values) if values else 0.0
    return m ** (1.0 / p) if m > 0 else 0.0


def logicseg_parts(x, labels, h, p=5.0, exclusion="siblings", easy_filter=False, rule_logits=None,
                   gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8, ignore_index=IGNORE):
    """LogicSeg's unweighted parts by loops over pixels and nodes (float64)."""
    t = Tree(h)
    # asymmetric loss: positives on the path, strict descendants of a partial label skipped
    total, valid = 0.0, 0
    lab = np.asarray(labels).reshape(-1)
    for pix, lv in zip(_pixels(np.asarray(x, dtype=np.float64)), lab, strict=True):
        c = t.channel(lv, ignore_index)
        if c is None:
            continue
        valid += 1
        for v in range(t.n):
            s = _sigmoid(pix[v])
            s_neg = min(1.0 - s + clip, 1.0)
            if v in t.anc[c]:
                total -= (1.0 - s) ** gamma_pos * math.log(max(s, eps))
            elif v in t.desc[c]:
                continue
            else:
                total -= (1.0 - s_neg) ** gamma_neg * math.log(max(s_neg, eps))
    asl = total / max(valid, 1)
    r = np.asarray(x if rule_logits is None else rule_logits, dtype=np.float64)
    scores = [[_sigmoid(z) for z in pix] for pix in _pixels(r)]
    with_parent = [v for v in range(t.n) if t.parent[v] >= 0]
    c_rule = (sum(_pmean([s[v] * (1 - s[t.parent[v]]) for s in scores], p) for v in with_parent) / len(with_parent)
              if with_parent else 0.0)
    internal = [v for v in range(t.n) if t.children[v]]
    d_rule = (sum(_pmean([s[v] * (1 - max(s[u] for u in t.children[v])) for s in scores], p) for v in internal)
              / len(internal) if internal else 0.0)
    if exclusion == "siblings":
        groups = [g for g in [t.roots, *t.children] if len(g) >= 2]
    else:
        groups = [g for g in ([v for v in range(t.n) if t.depth[v] == d] for d in range(1, t.max_depth + 1))
                  if len(g) >= 2]
    e_sum = 0.0
    for g in groups:
        kept = scores
        if easy_filter:
            kept = [s for s in scores
                    if not (sum(s[v] > 0.7 for v in g) == 1 and sum(s[v] < 0.3 for v in g) == len(g) - 1)]
        for a in g:
            for b in g:
                if a != b:
                    e_sum += _pmean([s[a] * s[b] for s in kept], p)
    e_rule = e_sum / sum(len(g) ** 2 for g in groups) if groups else 0.0
    return {"asl": asl, "child_implies_parent": c_rule, "parent_implies_child": d_rule, "exclusion": e_rule}


# ---------------------------------------------------------------------------- the HSSN objective
def depth_classes(t: Tree, d: int) -> list[int]:
    """The classes at depth d: the nodes at depth d and the leaves shallower than d (channel order)."""
    return [v for v in range(t.n) if t.depth[v] == d or (not t.children[v] and t.depth[v] < d)]


def objective_reference(x, labels, h, *, gamma=0.0, node_weight=None, tree_min_weight=5.0, ce_weights=None,
                        ignore_index=255):
    """``(total, tm, ce [L], grad)`` in float64 by plain loops: ``tm`` = the oracle's hssn tree-min / 5,
    ``ce[d-1]`` = mean over counted pixels of ``logsumexp(x[classes]) - x[target]`` (0 if none count),
    ``grad`` = d total / d x with ``total = tree_min_weight * tm + sum_d ce_weights[d-1] * ce[d-1]``."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    t = tree(h)
    L = t.max_depth
    ce_weights = [1.0] * L if ce_weights is None else list(ce_weights)
    tm = tree_min_loss(x, labels, h, gamma=gamma, reduction="hssn", node_weight=node_weight,
                              ignore_index=ignore_index) / 5.0
    tm_grad = tree_min_grad(x, labels, h, gamma=gamma, reduction="hssn", node_weight=node_weight,
                                   ignore_index=ignore_index) / 5.0
    classes = [depth_classes(t, d) for d in range(1, L + 1)]
    sums, counts = np.zeros(L), np.zeros(L)
    raw = np.zeros((L, *x.shape))  # per depth: sum over counted pixels of d ce / d x
    for pix in pixels(labels.shape):
        c = t.channel(labels[pix], ignore_index)
        if c is None:
            continue
        for d in range(1, L + 1):
            if t.children[c] and t.depth[c] < d:
                continue  # a partial label coarser than d
            target = t.path_of(c)[d - 1]
            z = {v: float(at(x, pix, v)) for v in classes[d - 1]}
            top = max(z.values())
            lse = top + math.log(sum(math.exp(zv - top) for zv in z.values()))
            sums[d - 1] += lse - z[target]
            counts[d - 1] += 1
            for v, zv in z.items():
                raw[(d - 1, *index(pix, v))] += math.exp(zv - lse) - (1.0 if v == target else 0.0)
    ce = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    total = tree_min_weight * tm + float(np.dot(ce_weights, ce))
    grad = tree_min_weight * tm_grad
    for d in range(L):
        if counts[d]:
            grad = grad + ce_weights[d] / counts[d] * raw[d]
    return total, tm, ce, grad
