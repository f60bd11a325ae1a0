"""Evaluation metrics for hierarchical segmentation (SPEC section 8), in numpy.

:class:`HierarchicalSegMetrics` accumulates integer counts over a whole data set and computes,
per depth, IoU per class, mIoU and pixel accuracy, plus the consistency rate, the mistake
severity and hierarchical precision / recall / F1, and, when confidences are given, the expected
calibration error per depth. The state is a flat ``int64`` vector of counts, so two metric
objects (or several processes) combine by plain summation.

Predictions and targets may be numpy arrays, torch tensors or paddle tensors; this module never
imports torch or paddle itself (tensors are recognised by their type's module name).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, NamedTuple

import numpy as np

from .hierarchy import Hierarchy, LabelError

__all__ = ["HierarchicalSegMetrics"]

# Pixels per block: bounds the temporaries of one update to a few MB whatever the batch size.
_CHUNK = 1 << 19
# Widest raw-value row range handled by direct indexing; wider ones (an exotic ignore_index) are
# remapped to compact rows first.
_MAX_DIRECT_ROWS = 4096

_SCALARS = ("num_pixels", "num_consistent", "num_mistakes", "severity_sum",
            "hier_intersection", "hier_predicted", "hier_true")
# Confidence sums are kept as integers in units of 2^-20 (each confidence rounded to the nearest
# unit, an error below 5e-7), so that the state stays exact int64 counts that merge in any order.
# A bin then holds up to 2^43 pixels (~8.8e12) before the int64 sum could overflow.
CONFIDENCE_SCALE = 1 << 20
_ECE_FIELDS = 3  # per (depth, bin): pixels, sum of confidence (fixed point), correct pixels


def _to_numpy(x: Any, what: str) -> np.ndarray:
    """A numpy view or copy of an array, torch tensor or paddle tensor (never written to)."""
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return x.detach().cpu().numpy()
    if module == "paddle":
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(
            f"{what} must be a numpy array, torch or paddle tensor, got {type(x).__name__}"
        ) from exc


def _as_int_labels(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise LabelError(f"{what} must hold integer node ids, got dtype {a.dtype}")
    return a


def _show(values: np.ndarray, limit: int = 10) -> str:
    values = np.unique(np.asarray(values))
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return shown + (f", ... ({values.size} distinct values)" if values.size > limit else "")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


class _Rows(NamedTuple):
    """Target pixels as joint-count rows: node id v is row ``v + node_offset``."""

    rows: np.ndarray
    num_rows: int
    node_offset: int
    ignore_row: int


class _Stats(NamedTuple):
    """One batch's counts: confusion matrices, valid and consistent pixels, joint counts of
    target and depth-L prediction [N, K], and the hierarchical intersection / predicted sizes."""

    confs: list[np.ndarray]
    valid: int
    consistent: int
    leaf_joint: np.ndarray
    inter: int
    predicted: int


class _Tables:
    """Lookup tables in node-id space, built once per metric object from the Hierarchy tables.

    Rows of every joint table are target node ids (0..N-1); columns are predicted values
    (leaf ids 0..K-1 for leaf predictions, node ids 0..N-1 for per-depth predictions).
    """

    def __init__(self, h: Hierarchy):
        n, k, L = h.num_nodes, h.num_leaves, h.max_depth
        ch = h.channel_of  # node id -> channel
        depth = h.depth[ch]  # [N] depth of node id
        is_leaf = h.is_leaf[ch]
        # Depth of knowledge of a target: a leaf is fully known, a partial label down to its depth.
        known = np.where(is_leaf, L, depth)

        self.class_ids: list[np.ndarray] = []  # node ids of the classes at each depth
        self.class_names: list[tuple[str, ...]] = []
        # (source, destination) flat positions that fold joint counts [N, K] (leaf predictions)
        # or [N, N] (per-depth predictions) into the [C_d, C_d] confusion matrix at depth d.
        self.leaf_fold: list[tuple[np.ndarray, np.ndarray]] = []
        self.node_fold: list[tuple[np.ndarray, np.ndarray]] = []
        self.is_class: list[np.ndarray] = []  # [N] bool
        self.path_node: list[np.ndarray] = []  # [K] node id at depth d of leaf k's path
        self.target_node: list[np.ndarray] = []  # [N] node id of target v's class at depth d, -1 unknown
        self.has_leaf = [bool(h.is_leaf[c].any()) for c in h.depth_channels]  # leaf among classes
        for d in range(L):
            chans = h.depth_channels[d]
            ids = h.node_ids[chans]
            c = ids.size
            index = np.full(n, -1, dtype=np.int64)
            index[ids] = np.arange(c)
            self.class_ids.append(ids)
            self.class_names.append(tuple(h.node_names[i] for i in chans))
            self.is_class.append(index >= 0)
            anc = h.node_ids[h.ancestor_table[ch, d]]  # [N] node id at depth d+1 of each node id
            tcls = np.where(is_leaf | (depth >= d + 1), index[anc], -1)
            self.target_node.append(np.where(is_leaf | (depth >= d + 1), anc, -1))
            path = h.node_ids[h.leaf_paths[:, d]]
            self.path_node.append(path)
            self.leaf_fold.append(self._fold(tcls, index[path], c))
            self.node_fold.append(self._fold(tcls, index, c))

        # Number of common nodes of A(u) and A(v) (the depth of their LCA), node-id space:
        # count the depths at which both genuine (unpadded) ancestors are the same node.
        table = h.ancestor_table[ch]
        real = np.arange(L)[None, :] < depth[:, None]
        common = np.zeros((n, n), dtype=np.int64)
        for d in range(L):
            common += ((table[:, None, d] == table[None, :, d])
                       & real[:, None, d] & real[None, :, d])
        tv = np.arange(k)
        # Leaf predictions, [N targets, K leaves].
        self.severity = np.zeros((n, k), dtype=np.int64)
        self.severity[:k] = h.leaf_lca_height
        self.mistake = np.zeros((n, k), dtype=np.int64)
        self.mistake[:k] = 1
        self.mistake[tv, tv] = 0
        self.hier_intersection = common[:, :k].copy()
        self.hier_predicted = np.minimum(depth[None, :k], known[:, None])
        # Per-depth predictions, [N targets, N predicted nodes]: one predicted node's contribution.
        self.node_intersection = h.is_ancestor[np.ix_(ch, ch)].T.astype(np.int64)
        self.node_predicted = (depth[None, :] <= known[:, None]).astype(np.int64)
        self.hier_true = depth.astype(np.int64)  # |A(t)| counts only known nodes: all of them

    @staticmethod
    def _fold(target_class: np.ndarray, pred_class: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        ok = (target_class[:, None] >= 0) & (pred_class[None, :] >= 0)
        dst = target_class[:, None] * c + pred_class[None, :]
        return np.flatnonzero(ok), dst[ok]

    @staticmethod
    def confusion(joint: np.ndarray, fold: tuple[np.ndarray, np.ndarray], c: int) -> np.ndarray:
        """The ``[c, c]`` confusion matrix of joint counts (exact int64 scatter-add)."""
        out = np.zeros(c * c, dtype=np.int64)
        np.add.at(out, fold[1], joint.ravel()[fold[0]])
        return out.reshape(c, c)


class HierarchicalSegMetrics:
    """Data-set level metrics of hierarchical segmentation, accumulated as mergeable counts.

    ``update(pred, target)`` takes a target label map ``[B, *spatial]`` of node ids (leaf ids,
    internal ids for partial labels, or ``ignore_index``) and either

    * a leaf prediction ``[B, *spatial]`` (leaf ids; its label at depth d is its path's node), or
    * per-depth predictions ``[B, L, *spatial]`` (``pred[:, d-1]`` holds classes of depth d:
      nodes at depth d or leaves shallower than d), which need not form paths of the tree.

    The two forms are told apart by shape: ``pred.ndim == target.ndim + 1`` with
    ``pred.shape[1] == L`` means per-depth. ``pred`` must hold such classes at every pixel, the
    ignored ones included. Labels are never modified; a batch with a bad value raises
    :class:`~hieraloss.LabelError` naming the values and leaves the counts untouched.

    Definitions (all counts are summed over the whole data set before any division):

    * Classes at depth d: ``hierarchy.depth_channels[d-1]`` (ascending channel order). A target is
      mapped to depth d through its path; a shallow leaf is its own class below its depth; a
      partial label (internal node c) is unknown below ``depth(c)`` and ignored at those depths.
    * Confusion matrix at depth d: ``conf[i, j]`` = pixels whose target is class i and whose
      prediction is class j at depth d, over pixels whose target is known at depth d.
    * ``IoU_c = TP / (TP + FP + FN)`` from that matrix; ``mIoU`` = mean over classes with
      ``TP + FP + FN > 0`` (classes absent from both truth and prediction are excluded);
      ``pixel_accuracy = trace / total``.
    * Valid pixels: target not ``ignore_index``.
    * ``consistency_rate``: fraction of valid pixels whose per-depth predictions form a path
      (``Hierarchy.consistent_mask``); 1.0 for leaf predictions.
    * ``mistake_severity`` (Bertinetto et al.): over pixels with a leaf target and a different
      predicted leaf (the depth-L prediction for per-depth input), the mean of
      ``leaf_lca_height[true, pred]`` (1 = siblings). Partial targets are not scored.
    * Hierarchical precision / recall (Kiritchenko et al.), micro-averaged over valid pixels:
      ``hP = sum |A(pred) & A(true)| / sum |A(pred)|``, ``hR = sum |A(pred) & A(true)| /
      sum |A(true)|``, ``hF = 2 hP hR / (hP + hR)``. ``A(pred)`` is the leaf's path, or for
      per-depth input the set of distinct predicted nodes over all depths. For a partial target c
      the truth is known only down to ``depth(c)``: ``A(true) = A(c)`` and predicted nodes deeper
      than ``depth(c)`` are not counted.

    * Calibration (optional): ``update(pred, target, confidence)`` with ``confidence`` of the
      per-depth shape ``[B, L, *spatial]`` (floats in [0, 1]: the model's confidence in its class
      at each depth; for a leaf prediction the per-depth classes are its path). Per depth, over the
      pixels whose target is known there (as for the confusion matrix), a histogram of ``ece_bins``
      equal-width bins on [0, 1] (bin ``min(floor(conf * ece_bins), ece_bins - 1)``) accumulates the
      pixel count, the sum of confidences and the number of correct predictions.
      ``ece = sum_b n_b / n * |accuracy_b - mean confidence_b|``. Without any confidence (the
      label-only updates) ``ece`` is NaN (``None`` in :meth:`to_dict`), like every other undefined
      ratio; :meth:`calibration` gives the histogram (reliability diagram).

    Undefined ratios (zero denominators) are NaN in :meth:`compute` and ``None`` in :meth:`to_dict`.

    Combine states with :meth:`merge` (same process) or :meth:`all_reduce` (torch.distributed).
    Confidence sums are stored in fixed point (units of ``2**-20``), so merged states are exact.

    Cost: one ``np.bincount`` of (target value, predicted leaf) pairs per update, from which every
    count is folded with precomputed tables; per-depth pixels that are paths of the tree are
    counted the same way, the others with one bincount per depth. uint8 inputs are fastest.
    ``ignore_index`` must not be a node id.
    """

    def __init__(self, hierarchy: Hierarchy, ignore_index: int = 255, ece_bins: int = 15):
        if not isinstance(hierarchy, Hierarchy):
            raise TypeError(f"hierarchy must be a hieraloss.Hierarchy, got {type(hierarchy).__name__}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if isinstance(ece_bins, bool) or not isinstance(ece_bins, (int, np.integer)) or ece_bins < 1:
            raise ValueError(f"ece_bins must be a positive int, got {ece_bins!r}")
        hierarchy.check_ignore_index(int(ignore_index))
        self._h = hierarchy
        self._ignore = int(ignore_index)
        self._bins = int(ece_bins)
        self._t = _Tables(hierarchy)
        self._sizes = sizes = [ids.size for ids in self._t.class_ids]
        offsets = np.concatenate([[0], np.cumsum([c * c for c in sizes])]).astype(int)
        start = int(offsets[-1])
        ece_size = hierarchy.max_depth * self._bins * _ECE_FIELDS
        self._state = np.zeros(start + len(_SCALARS) + ece_size, dtype=np.int64)
        self._conf = [self._state[offsets[d]: offsets[d + 1]].reshape(c, c) for d, c in enumerate(sizes)]
        self._scalars = self._state[start: start + len(_SCALARS)]
        # [L, bins, 3]: pixels, confidence sum (units of 1 / CONFIDENCE_SCALE), correct pixels
        self._ece = self._state[start + len(_SCALARS):].reshape(hierarchy.max_depth, self._bins, _ECE_FIELDS)
        # Rows of the raw joint counts: target value - lo for values in [lo, hi).
        n = hierarchy.num_nodes
        self._lo = min(0, self._ignore)
        self._hi = max(n, self._ignore + 1)

    # ------------------------------------------------------------------ properties
    @property
    def hierarchy(self) -> Hierarchy:
        return self._h

    @property
    def ignore_index(self) -> int:
        return self._ignore

    @property
    def ece_bins(self) -> int:
        return self._bins

    def class_names(self, depth: int) -> tuple[str, ...]:
        """Names of the classes at ``depth`` (1..L), in confusion-matrix order."""
        return self._t.class_names[self._check_depth(depth) - 1]

    def class_ids(self, depth: int) -> np.ndarray:
        """Node ids of the classes at ``depth`` (1..L), in confusion-matrix order."""
        return self._t.class_ids[self._check_depth(depth) - 1].copy()

    def confusion_matrix(self, depth: int) -> np.ndarray:
        """A copy of the accumulated ``[C_d, C_d]`` int64 confusion matrix (rows = truth)."""
        return self._conf[self._check_depth(depth) - 1].copy()

    def _check_depth(self, depth: int) -> int:
        if not 1 <= int(depth) <= self._h.max_depth:
            raise ValueError(f"depth must be in 1..{self._h.max_depth}, got {depth}")
        return int(depth)

    def _scalar(self, name: str) -> int:
        return int(self._scalars[_SCALARS.index(name)])

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._state[:] = 0

    def state(self) -> np.ndarray:
        """A copy of the flat int64 count vector (sum these across workers to combine)."""
        return self._state.copy()

    def load_state(self, state: Any) -> None:
        """Replace the counts by a vector from :meth:`state` (e.g. after a custom all-reduce)."""
        vec = _to_numpy(state, "state")
        if vec.shape != self._state.shape or not np.issubdtype(vec.dtype, np.integer):
            raise ValueError(
                f"state must be an integer vector of shape {self._state.shape}, got {vec.dtype} {vec.shape}"
            )
        self._state[:] = vec

    def merge(self, other: HierarchicalSegMetrics) -> HierarchicalSegMetrics:
        """Add ``other``'s counts to this object's (same hierarchy required); returns ``self``."""
        if not isinstance(other, HierarchicalSegMetrics):
            raise TypeError(f"can only merge HierarchicalSegMetrics, got {type(other).__name__}")
        if other._h != self._h:
            raise ValueError(f"cannot merge metrics of different hierarchies: {self._h!r} vs {other._h!r}")
        if other._bins != self._bins:
            raise ValueError(f"cannot merge metrics with different ece_bins: {self._bins} vs {other._bins}")
        self._state += other._state
        return self

    def all_reduce(self, group: Any = None) -> HierarchicalSegMetrics:
        """Sum the counts over all ranks of ``torch.distributed`` (in place); returns ``self``.

        A no-op when torch.distributed is not initialised. Every rank must call it (it is a
        collective), once: afterwards each rank holds the global counts. Raises if the ranks hold
        metrics of different hierarchies.
        """
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return self
        import torch

        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        sig = int(self._h.fingerprint[:15], 16)
        size = self._state.size
        check = torch.tensor([sig, -sig, size, -size], dtype=torch.int64, device=device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
        got = check.cpu().tolist()
        if got[0] != -got[1] or got[2] != -got[3] or got[0] != sig:
            raise RuntimeError("all_reduce: ranks hold HierarchicalSegMetrics of different hierarchies")
        buf = torch.from_numpy(self._state.copy()).to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        self._state[:] = buf.cpu().numpy()
        return self

    # ------------------------------------------------------------------ update
    def update(self, pred: Any, target: Any, confidence: Any = None) -> None:
        """Accumulate one batch: ``pred`` ``[B, *spatial]`` leaf ids or ``[B, L, *spatial]``
        per-depth node ids; ``target`` ``[B, *spatial]`` node ids or ``ignore_index``.

        ``confidence`` (optional): ``[B, L, *spatial]`` floats in [0, 1], the confidence of the
        predicted class at every depth; it feeds the per-depth calibration histograms (``ece``).
        """
        t = _to_numpy(target, "target")
        if t.dtype == bool:
            raise LabelError("target must hold integer node ids, got dtype bool")
        p = _as_int_labels(_to_numpy(pred, "pred"), "pred")
        t = _as_int_labels(t, "target")
        L = self._h.max_depth
        if t.ndim < 1:
            raise ValueError("target needs a batch dimension: [B, *spatial]")
        if p.shape == t.shape:
            per_depth = False
        elif p.ndim == t.ndim + 1 and p.shape[0] == t.shape[0] and p.shape[2:] == t.shape[1:]:
            if p.shape[1] != L:
                raise ValueError(
                    f"pred {p.shape} has one more dimension than target {t.shape}, so it would be "
                    f"per-depth labels [B, L, *spatial], but shape[1]={p.shape[1]} != max_depth={L}"
                )
            per_depth = True
        else:
            raise ValueError(
                f"pred shape {p.shape} matches neither target shape {t.shape} (leaf labels) nor "
                f"[B, L={L}, *spatial] = {(t.shape[0], L, *t.shape[1:])} (per-depth labels)"
            )
        rows = self._target_rows(t.reshape(-1))
        ece = None if confidence is None else self._calibration_counts(p, per_depth, rows, confidence)
        if per_depth:
            self._update_per_depth(p, rows)
        else:
            self._update_leaf(p.reshape(-1), rows)
        if ece is not None:  # only once every check has passed
            self._ece += ece

    def _calibration_counts(self, p: np.ndarray, per_depth: bool, rows: _Rows, confidence: Any) -> np.ndarray:
        """``[L, bins, 3]`` counts of one batch (pixels, fixed-point confidence sum, correct)."""
        h, tab, bins = self._h, self._t, self._bins
        L = h.max_depth
        c = _to_numpy(confidence, "confidence")
        if not np.issubdtype(c.dtype, np.floating):
            raise TypeError(f"confidence must hold floats in [0, 1], got dtype {c.dtype}")
        B = p.shape[0]
        spatial = p.shape[2:] if per_depth else p.shape[1:]
        if c.shape != (B, L, *spatial):
            raise ValueError(f"confidence must have the per-depth shape [B, L, *spatial] = {(B, L, *spatial)}, "
                             f"got {c.shape}")
        outside = ~((c >= 0) & (c <= 1))  # NaN included
        if outside.any():
            raise ValueError(f"confidence must hold values in [0, 1]; got {int(outside.sum())} outside "
                             f"(e.g. {float(c[outside].flat[0])})")
        out = np.zeros((L, bins, _ECE_FIELDS), dtype=np.int64)
        n = h.num_nodes
        for d in range(L):
            # Target class at depth d+1 per joint-count row (-1: ignored, unknown or not a node id).
            row_node = np.full(rows.num_rows, -1, dtype=np.int64)
            row_node[rows.node_offset: rows.node_offset + n] = tab.target_node[d]
            row_node[rows.ignore_row] = -1
            pred_d = p[:, d].reshape(-1) if per_depth else np.take(tab.path_node[d], p.reshape(-1), mode="clip")
            conf_d = c[:, d].reshape(-1)
            for start in range(0, pred_d.size, _CHUNK):
                stop = start + _CHUNK
                truth = row_node[rows.rows[start:stop]]
                counted = truth >= 0
                cf = conf_d[start:stop][counted].astype(np.float64)
                b = np.minimum((cf * bins).astype(np.int64), bins - 1)
                correct = pred_d[start:stop][counted].astype(np.int64) == truth[counted]
                out[d, :, 0] += np.bincount(b, minlength=bins)
                # Fixed-point sums below 2^53 per chunk: exact in float64.
                out[d, :, 1] += np.bincount(b, weights=np.rint(cf * CONFIDENCE_SCALE), minlength=bins).astype(np.int64)
                out[d, :, 2] += np.bincount(b[correct], minlength=bins)
        return out

    def _target_rows(self, t: np.ndarray) -> _Rows:
        """Joint-count row of every target pixel, after a range check (a uint8 target needs none:
        every uint8 value has a row)."""
        lo, hi, n = self._lo, self._hi, self._h.num_nodes
        if t.dtype == np.uint8 and lo == 0 and hi <= 256:
            return _Rows(t, 256, 0, self._ignore)
        if t.size:
            tmin, tmax = int(t.min()), int(t.max())
            if tmin < lo or tmax >= hi:
                raise LabelError(self._bad_target_message(t[(t < lo) | (t >= hi)]))
        if hi - lo <= _MAX_DIRECT_ROWS:
            return _Rows(t if lo == 0 else t.astype(np.int64) - lo, hi - lo, -lo, self._ignore - lo)
        # An ignore_index far from the node ids: compact rows, 0..N-1 for nodes and N for ignore.
        ignored = t == self._ignore
        bad = ~ignored & ((t < 0) | (t >= n))
        if bad.any():
            raise LabelError(self._bad_target_message(t[bad]))
        return _Rows(np.where(ignored, n, t).astype(np.int64), n + 1, 0, n)

    def _bad_target_message(self, bad: np.ndarray) -> str:
        return (f"target holds values that are neither node ids 0..{self._h.num_nodes - 1} nor "
                f"ignore_index={self._ignore}: {_show(bad)}. {self._h.label_fix_hint()}")

    @staticmethod
    def _pred_width(p: np.ndarray, limit: int, what: str) -> int:
        """Number of joint-count columns for pred values; checks the range unless uint8."""
        if p.dtype == np.uint8:
            return 256
        if p.size:
            pmin, pmax = int(p.min()), int(p.max())
            if pmin < 0 or pmax >= limit:
                raise LabelError(f"{what}: {_show(p[(p < 0) | (p >= limit)])}")
        return limit

    def _node_rows(self, joint: np.ndarray, rows: _Rows) -> np.ndarray:
        """The node-id rows ``[N, W]`` of raw joint counts ``[rows, W]``, after checking that no
        pixel has a target value other than a node id or ignore_index."""
        n = self._h.num_nodes
        other = np.ones(joint.shape[0], dtype=bool)
        other[rows.node_offset: rows.node_offset + n] = False
        other[rows.ignore_row] = False
        bad_rows = np.flatnonzero(other & joint.any(axis=1))
        if bad_rows.size:
            raise LabelError(self._bad_target_message(bad_rows - rows.node_offset))
        return joint[rows.node_offset: rows.node_offset + n]

    @staticmethod
    def _joint_counts(rows: np.ndarray, nrows: int, cols: np.ndarray, width: int) -> np.ndarray:
        """``[nrows, width]`` counts of (row, col) pairs, block by block."""
        total = np.zeros(nrows * width, dtype=np.int64)
        buf = np.empty(min(rows.size, _CHUNK), dtype=np.int64)
        for start in range(0, rows.size, _CHUNK):
            r = rows[start: start + _CHUNK]
            b = buf[: r.size]
            np.multiply(r, width, out=b, dtype=np.int64, casting="unsafe")
            np.add(b, cols[start: start + _CHUNK], out=b, casting="unsafe")
            total += np.bincount(b, minlength=nrows * width)
        return total.reshape(nrows, width)

    def _update_leaf(self, p: np.ndarray, rows: _Rows) -> None:
        k = self._h.num_leaves
        width = self._pred_width(p, k, f"pred holds values that are not leaf ids 0..{k - 1}")
        joint = self._node_rows(self._joint_counts(rows.rows, rows.num_rows, p, width), rows)
        if width > k and joint[:, k:].any():
            raise LabelError(f"pred holds values that are not leaf ids 0..{k - 1}: "
                             f"{_show(np.flatnonzero(joint[:, k:].sum(axis=0)) + k)}")
        stats = self._leaf_stats(joint[:, :k])
        self._commit(*stats)

    def _leaf_stats(self, joint: np.ndarray) -> _Stats:
        """Counts of pixels whose prediction is a leaf's path, from joint counts [N, K]."""
        tab = self._t
        confs = [tab.confusion(joint, tab.leaf_fold[d], c) for d, c in enumerate(self._sizes)]
        valid = int(joint.sum())
        inter = int((joint * tab.hier_intersection).sum())
        predicted = int((joint * tab.hier_predicted).sum())
        return _Stats(confs, valid, valid, joint, inter, predicted)

    def _update_per_depth(self, p: np.ndarray, rows: _Rows) -> None:
        """Pixels whose per-depth labels form a path are counted like leaf predictions (one joint
        count of target and depth-L label); only the others need counts per depth."""
        h, tab = self._h, self._t
        n, k, L = h.num_nodes, h.num_leaves, h.max_depth
        slots = [p[:, d].reshape(-1) for d in range(L)]
        width = 256 if p.dtype == np.uint8 else n
        for d, s in enumerate(slots):
            self._pred_width(s, n, f"pred[:, {d}] (depth {d + 1}) holds values that are not node ids "
                                   f"0..{n - 1}")
        # path_at[d][v]: node id at depth d+1 of leaf v's path (only read where v is a leaf).
        path_at = []
        for d in range(L - 1):
            tbl = np.zeros(width, dtype=p.dtype)
            tbl[:k] = tab.path_node[d]
            path_at.append(tbl)
        nrows, total = rows.num_rows, rows.rows.size
        # Joint counts of (target, depth-L label); off-path pixels land in a second, unused half
        # (cheaper than compressing the arrays by a scattered mask).
        half = nrows * width
        path_joint = np.zeros(2 * half, dtype=np.int64)
        off_path = np.empty(total, dtype=bool)
        size = min(total, _CHUNK)
        leaf_buf, idx_buf, tmp_buf = (np.empty(size, np.int64) for _ in range(3))
        for start in range(0, total, _CHUNK):
            stop = min(start + _CHUNK, total)
            leaf, idx, off = leaf_buf[: stop - start], idx_buf[: stop - start], off_path[start:stop]
            np.copyto(leaf, slots[-1][start:stop], casting="unsafe")
            ok = leaf < k
            for d in range(L - 1):
                ok &= path_at[d][leaf] == slots[d][start:stop]
            np.multiply(rows.rows[start:stop], width, out=idx, dtype=np.int64, casting="unsafe")
            np.add(idx, leaf, out=idx)
            np.logical_not(ok, out=off)
            if off.any():
                tmp = tmp_buf[: stop - start]
                np.multiply(off, half, out=tmp, dtype=np.int64)
                np.add(idx, tmp, out=idx)
            path_joint += np.bincount(idx, minlength=path_joint.size)
        joint = self._node_rows(path_joint[:half].reshape(nrows, width), rows)[:, :k]
        stats = self._leaf_stats(joint)
        if path_joint[half:].any():
            where = np.flatnonzero(off_path)
            other = self._off_path_stats([s[where] for s in slots], rows._replace(rows=rows.rows[where]),
                                         width)
            stats = _Stats([a + b for a, b in zip(stats.confs, other.confs, strict=True)],
                           stats.valid + other.valid, stats.consistent, stats.leaf_joint + other.leaf_joint,
                           stats.inter + other.inter, stats.predicted + other.predicted)
        self._commit(*stats)

    def _off_path_stats(self, slots: list[np.ndarray], rows: _Rows, width: int) -> _Stats:
        """Counts of pixels whose per-depth labels are not a path: one joint count per depth."""
        tab, L = self._t, self._h.max_depth
        nrows, total = rows.num_rows, rows.rows.size
        joints = [np.zeros(nrows * width, dtype=np.int64) for _ in range(L)]
        # Pairs (target, predicted node) of slots whose node already appeared at a coarser depth.
        dups = [np.zeros(nrows * width, dtype=np.int64) for _ in range(L)]
        size = min(total, _CHUNK)
        base_buf, idx_buf = np.empty(size, np.int64), np.empty(size, np.int64)
        for start in range(0, total, _CHUNK):
            stop = min(start + _CHUNK, total)
            base, idx = base_buf[: stop - start], idx_buf[: stop - start]
            np.multiply(rows.rows[start:stop], width, out=base, dtype=np.int64, casting="unsafe")
            ps = [s[start:stop] for s in slots]
            for d in range(L):
                np.add(base, ps[d], out=idx, casting="unsafe")
                joints[d] += np.bincount(idx, minlength=joints[d].size)
                # Only leaves repeat across depths, so slots without leaves need no comparison.
                earlier = [e for e in range(d) if tab.has_leaf[e]]
                if earlier:
                    dup = ps[earlier[0]] == ps[d]
                    for e in earlier[1:]:
                        dup |= ps[e] == ps[d]
                    if dup.any():
                        dups[d] += np.bincount(idx[dup], minlength=dups[d].size)
        return self._fold_off_path([self._node_rows(j.reshape(nrows, width), rows) for j in joints],
                                   [self._node_rows(j.reshape(nrows, width), rows) for j in dups])

    def _fold_off_path(self, joints: list[np.ndarray], dups: list[np.ndarray]) -> _Stats:
        """Counts from per-depth joint counts ``[N targets, W >= N predicted values]`` of off-path
        pixels, and those of the slots whose node repeats a coarser depth's (``dups``)."""
        h, tab = self._h, self._t
        n, L = h.num_nodes, h.max_depth
        confs, inter, predicted, leaf_joint = [], 0, 0, None
        cls = np.zeros(joints[0].shape[1], dtype=bool)
        for d in range(L):
            j = joints[d]
            cls[:n] = tab.is_class[d]
            bad = np.flatnonzero(j[:, ~cls].sum(axis=0))
            if bad.size:
                raise LabelError(
                    f"pred[:, {d}] holds values that are not classes at depth {d + 1} (nodes at that "
                    f"depth or shallower leaves): {_show(np.flatnonzero(~cls)[bad])}"
                )
            j = j[:, :n]
            confs.append(tab.confusion(j, tab.node_fold[d], self._sizes[d]))
            new = j - dups[d][:, :n]
            inter += int((new * tab.node_intersection).sum())
            predicted += int((new * tab.node_predicted).sum())
            leaf_joint = j[:, : h.num_leaves]
        return _Stats(confs, int(leaf_joint.sum()), 0, leaf_joint, inter, predicted)

    def add_joint_counts(self, leaf_joint: Any, depth_joint: Any = None, depth_repeat: Any = None,
                         calibration: Any = None) -> None:
        """Accumulate counts made elsewhere (on a device, by
        :class:`hieraloss.integrations.torchmetrics.HierarchicalSegMetric`), as :meth:`update` would:

        * ``leaf_joint [N, K]``: pixels per (target node id, predicted leaf id), over valid pixels
          whose prediction is a leaf or a path of the tree;
        * ``depth_joint [L, N, N]``: per depth d, pixels per (target node id, predicted node id at
          depth d), over valid pixels whose per-depth prediction is not a path; ``depth_repeat``
          the same counts restricted to slots whose node already appeared at a coarser depth;
        * ``calibration [L, ece_bins, 3]``: the calibration histograms (pixels, confidence sum in
          units of ``1 / CONFIDENCE_SCALE``, correct pixels).
        """
        h = self._h
        n, k, L = h.num_nodes, h.num_leaves, h.max_depth
        leaf = _as_int_labels(_to_numpy(leaf_joint, "leaf_joint"), "leaf_joint").astype(np.int64)
        if leaf.shape != (n, k):
            raise ValueError(f"leaf_joint must be [N, K] = {(n, k)}, got {leaf.shape}")
        stats = self._leaf_stats(leaf)
        consistent = stats.consistent
        if depth_joint is not None:
            joints = _to_numpy(depth_joint, "depth_joint").astype(np.int64)
            dups = _to_numpy(depth_repeat, "depth_repeat").astype(np.int64)
            if joints.shape != (L, n, n) or dups.shape != (L, n, n):
                raise ValueError(f"depth_joint and depth_repeat must be [L, N, N] = {(L, n, n)}, got "
                                 f"{joints.shape} and {dups.shape}")
            if joints.any():
                other = self._fold_off_path(list(joints), list(dups))
                stats = _Stats([a + b for a, b in zip(stats.confs, other.confs, strict=True)],
                               stats.valid + other.valid, consistent, stats.leaf_joint + other.leaf_joint,
                               stats.inter + other.inter, stats.predicted + other.predicted)
        ece = None
        if calibration is not None:
            ece = _to_numpy(calibration, "calibration").astype(np.int64)
            if ece.shape != self._ece.shape:
                raise ValueError(f"calibration must be [L, ece_bins, 3] = {self._ece.shape}, got {ece.shape}")
        self._commit(*stats)
        if ece is not None:
            self._ece += ece

    def _commit(self, confs, valid, consistent, leaf_joint, inter, predicted) -> None:
        """Add one batch's counts to the state (only after every check has passed)."""
        tab = self._t
        for conf, add in zip(self._conf, confs, strict=True):
            conf += add
        true_size = int(leaf_joint.sum(axis=1) @ tab.hier_true)
        mistakes = int((leaf_joint * tab.mistake).sum())
        severity = int((leaf_joint * tab.severity).sum())
        self._scalars += np.array([valid, consistent, mistakes, severity, inter, predicted, true_size],
                                  dtype=np.int64)

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, Any]:
        """The metrics (definitions in the class docstring) as a dict of Python floats/ints:

        ``per_depth``: list over depths 1..L of ``{"depth", "classes", "iou" (name -> IoU),
        "miou", "pixel_accuracy", "num_pixels", "ece"}`` (``ece`` NaN when no confidence was
        given for pixels counted at that depth); then ``consistency_rate``, ``mistake_severity``,
        ``num_mistakes``, ``hierarchical_precision``, ``hierarchical_recall``, ``hierarchical_f1``
        and ``num_pixels`` (valid pixels). Undefined values are NaN.
        """
        per_depth = []
        for d, conf in enumerate(self._conf):
            tp = np.diag(conf).astype(np.float64)
            union = conf.sum(axis=0) + conf.sum(axis=1) - tp
            present = union > 0
            iou = np.full(tp.shape, np.nan)
            iou[present] = tp[present] / union[present]
            names = self._t.class_names[d]
            total = int(conf.sum())
            hist = self._ece[d]
            per_depth.append({
                "depth": d + 1,
                "classes": list(names),
                "iou": {name: float(v) for name, v in zip(names, iou, strict=True)},
                "miou": float(iou[present].mean()) if present.any() else float("nan"),
                "pixel_accuracy": _ratio(tp.sum(), total),
                "num_pixels": total,
                "ece": _ratio(np.abs(hist[:, 2] - hist[:, 1] / CONFIDENCE_SCALE).sum(), hist[:, 0].sum()),
            })
        inter = self._scalar("hier_intersection")
        hp = _ratio(inter, self._scalar("hier_predicted"))
        hr = _ratio(inter, self._scalar("hier_true"))
        hf = 2 * hp * hr / (hp + hr) if hp + hr > 0 else float("nan")
        return {
            "per_depth": per_depth,
            "consistency_rate": _ratio(self._scalar("num_consistent"), self._scalar("num_pixels")),
            "mistake_severity": _ratio(self._scalar("severity_sum"), self._scalar("num_mistakes")),
            "num_mistakes": self._scalar("num_mistakes"),
            "hierarchical_precision": hp,
            "hierarchical_recall": hr,
            "hierarchical_f1": float(hf),
            "num_pixels": self._scalar("num_pixels"),
        }

    def scalars(self) -> dict[str, float]:
        """:meth:`compute` flattened to named numbers, for a trainer's logger: ``miou_depth{d}``,
        ``pixel_accuracy_depth{d}`` (and ``ece_depth{d}`` once confidences were given) for every
        depth d, then ``consistency_rate``, ``mistake_severity``, ``hierarchical_precision``,
        ``hierarchical_recall`` and ``hierarchical_f1`` (the same values, NaN where undefined)."""
        res = self.compute()
        out: dict[str, float] = {}
        keys = ("miou", "pixel_accuracy", "ece") if self._ece[:, :, 0].any() else ("miou", "pixel_accuracy")
        for r in res["per_depth"]:
            for key in keys:
                out[f"{key}_depth{r['depth']}"] = r[key]
        for key in ("consistency_rate", "mistake_severity", "hierarchical_precision", "hierarchical_recall",
                    "hierarchical_f1"):
            out[key] = float(res[key])
        return out

    def calibration(self, depth: int) -> dict[str, np.ndarray]:
        """The calibration histogram at ``depth`` (1..L), for a reliability diagram: ``bin_edges``
        ``[bins + 1]``, and per bin ``count`` (int64), ``confidence`` (mean confidence) and
        ``accuracy`` (fraction correct); the means are NaN in empty bins."""
        hist = self._ece[self._check_depth(depth) - 1]
        count = hist[:, 0].copy()
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(count > 0, hist[:, 1] / CONFIDENCE_SCALE / count, np.nan)
            accuracy = np.where(count > 0, hist[:, 2] / count, np.nan)
        return {"bin_edges": np.linspace(0.0, 1.0, self._bins + 1), "count": count,
                "confidence": confidence, "accuracy": accuracy}

    def to_dict(self) -> dict[str, Any]:
        """:meth:`compute` as JSON-ready plain types (NaN becomes ``None``)."""
        out = _nan_to_none(self.compute())
        json.dumps(out, allow_nan=False)  # guarantees the promise
        return out

    def format_table(self, per_class: bool = False) -> str:
        """A text table of the results (percentages); ``per_class=True`` adds every class IoU."""
        res = self.compute()

        def pct(v: float) -> str:
            return "-" if math.isnan(v) else f"{100 * v:.2f}"

        calibrated = bool(self._ece[:, :, 0].any())  # the ECE column only once confidences were given
        lines = [f"HierarchicalSegMetrics: {res['num_pixels']} valid pixels",
                 f"{'depth':>5}  {'classes':>7}  {'mIoU %':>8}  {'acc %':>8}  {'pixels':>12}"
                 + (f"  {'ECE %':>8}" if calibrated else "")]
        for r in res["per_depth"]:
            lines.append(f"{r['depth']:>5}  {len(r['classes']):>7}  {pct(r['miou']):>8}  "
                         f"{pct(r['pixel_accuracy']):>8}  {r['num_pixels']:>12}"
                         + (f"  {pct(r['ece']):>8}" if calibrated else ""))
        sev = res["mistake_severity"]
        lines += [
            f"consistency rate %        {pct(res['consistency_rate'])}",
            f"mistake severity          {'-' if math.isnan(sev) else f'{sev:.3f}'}"
            f" ({res['num_mistakes']} wrong leaf pixels)",
            f"hierarchical P / R / F1 % {pct(res['hierarchical_precision'])} / "
            f"{pct(res['hierarchical_recall'])} / {pct(res['hierarchical_f1'])}",
        ]
        if per_class:
            for r in res["per_depth"]:
                lines.append(f"IoU % at depth {r['depth']}:")
                width = max(len(c) for c in r["classes"])
                lines += [f"  {name:<{width}}  {pct(v):>8}" for name, v in r["iou"].items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()

    def __repr__(self) -> str:
        return (f"HierarchicalSegMetrics({self._h!r}, ignore_index={self._ignore}, "
                f"num_pixels={self._scalar('num_pixels')})")
