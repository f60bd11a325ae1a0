"""Hierarchical segmentation metrics as a ``torchmetrics.Metric`` (the ``[torchmetrics]`` extra).

:class:`HierarchicalSegMetric` counts on the tensors' device: joint counts of (target node,
predicted leaf), and for per-depth predictions that are not paths of the tree, (target node,
predicted node) per depth. An update is a few scatter-adds with no host sync; torchmetrics sums
the counts across processes (``dist_reduce_fx="sum"``), and :meth:`compute` folds them into
exactly the numbers of :class:`hieraloss.metrics.HierarchicalSegMetrics` (it builds one).

Bad values cannot raise during a sync-free update: they are counted, and :meth:`compute` raises
:class:`~hieraloss.LabelError` naming how many. ``validate_args=True`` checks every update
instead, with the numpy metric's message (one sync per update).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchmetrics

from ..core.checks import check_hierarchy
from ..hierarchy import Hierarchy, LabelError
from ..metrics import CONFIDENCE_SCALE, HierarchicalSegMetrics
from ..torch import decode, upsample_to_labels

__all__ = ["HierarchicalSegMetric"]

_ROW_TABLE_MAX = 1 << 16  # target values mapped by a lookup table up to this range


def _accumulate(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[index] += values`` with repeated indices summed, in place and without a host sync: a
    scatter-add on the CPU, a deterministic accumulating put elsewhere."""
    if out.device.type == "cpu":
        return out.scatter_add_(0, index, values)
    return out.index_put_((index,), values, accumulate=True)


def _count(index: torch.Tensor, size: int) -> torch.Tensor:
    """Counts of ``index`` values in ``[0, size]`` (``size``: the slot of discarded pixels), as int64 ``[size]``."""
    index = index.reshape(-1)
    out = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    return _accumulate(out, index, torch.ones_like(index))[:size]


class HierarchicalSegMetric(torchmetrics.Metric):
    """Per-depth confusion matrices, mIoU, pixel accuracy, consistency, mistake severity,
    hierarchical P/R/F1 and calibration (definitions: :class:`hieraloss.metrics.HierarchicalSegMetrics`),
    accumulated on the device.

    ``update(preds, target, confidence=None)``: ``target [B, *spatial]`` node ids or
    ``ignore_index``; ``preds`` one of

    * leaf ids ``[B, *spatial]`` (e.g. from :func:`hieraloss.torch.decode`),
    * per-depth node ids ``[B, L, *spatial]``,
    * node logits ``[B, N, *spatial]`` (float), decoded here with ``decode_method`` (``"path"``);
      with ``upsample_logits=True``, logits at a lower resolution than the target are upsampled to
      it first (bilinear, ``align_corners=False``), as the losses do.

    ``confidence [B, L, *spatial]`` (floats in [0, 1]) feeds the calibration error. :meth:`compute`
    returns :meth:`HierarchicalSegMetrics.scalars` as float64 tensors (``miou_depth1``, ...,
    ``hierarchical_f1``), ready for ``self.log_dict``; :meth:`to_metrics` gives the full numpy
    object (per-class IoU, ``format_table``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, hierarchy: Hierarchy, ignore_index: int = 255, ece_bins: int = 15, *,
                 decode_method: str = "path", upsample_logits: bool = False, validate_args: bool = False,
                 **kwargs: Any):
        super().__init__(**kwargs)
        HierarchicalSegMetrics(hierarchy, ignore_index, ece_bins)  # checks the arguments, as the numpy metric
        check_hierarchy(hierarchy)
        self.hierarchy = hierarchy
        self.ignore_index = int(ignore_index)
        self.ece_bins = int(ece_bins)
        self.decode_method = decode_method
        self.upsample_logits = bool(upsample_logits)
        self.validate_args = bool(validate_args)
        n, k, L = hierarchy.num_nodes, hierarchy.num_leaves, hierarchy.max_depth
        # Rows: target node ids 0..N-1, then N = ignore_index, N + 1 = anything else.
        # Columns: predicted leaf ids 0..K-1 (or node ids 0..N-1), then one for anything else.
        self.add_state("leaf_joint", torch.zeros(n + 2, k + 1, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("depth_joint", torch.zeros(L, n + 2, n + 1, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("depth_repeat", torch.zeros(L, n + 2, n + 1, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("calibration", torch.zeros(L, self.ece_bins, 3, dtype=torch.int64), dist_reduce_fx="sum")
        # Confidences outside [0, 1]; bad targets and predictions land in the extra row and column.
        self.add_state("invalid_confidence", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        h = hierarchy
        path_node = h.node_ids[h.leaf_paths.T]  # [L, K] node id at each depth of leaf k's path
        # [L, N] by target node id: its class at each depth (a shallow leaf is its own class below
        # its depth), -1 where a partial label is unknown.
        ch = h.channel_of
        depth, is_leaf = h.depth[ch], h.is_leaf[ch]
        target_node = np.stack([np.where(is_leaf | (depth >= d + 1), h.node_ids[h.ancestor_table[ch, d]], -1)
                                for d in range(L)])
        self._has_leaf = [bool(h.is_leaf[c].any()) for c in h.depth_channels]  # on the host: no sync
        # Lookup tables that map any value to its row / column in one gather: slot 0 stands for every
        # value below the table's range, the last slot for every value above it.
        # An ignore_index far from the node ids takes two compares instead (a table would be huge).
        lo, hi = min(0, self.ignore_index), max(n - 1, self.ignore_index)
        self._row_offset = 1 - lo
        if hi - lo < _ROW_TABLE_MAX:
            row_table = np.full(hi - lo + 3, n + 1, dtype=np.int64)
            row_table[self._row_offset: self._row_offset + n] = np.arange(n)
            row_table[self.ignore_index + self._row_offset] = n
        else:
            row_table = np.zeros(0, dtype=np.int64)
        leaf_col = np.concatenate([[k], np.arange(k), [k]])
        node_col = np.concatenate([[n], np.arange(n), [n]])
        tables = {"path_node": path_node, "target_node": target_node, "row_table": row_table,
                  "leaf_col": leaf_col, "node_col": node_col}
        for name, value in tables.items():
            self.register_buffer(f"_{name}", torch.from_numpy(np.ascontiguousarray(value)), persistent=False)

    # ------------------------------------------------------------------ update
    def _rows(self, target: torch.Tensor) -> torch.Tensor:
        """Row of every target pixel: its node id, N for ignore_index, N + 1 for anything else."""
        t = target.reshape(-1).to(torch.int64)
        if self._row_table.numel() == 0:
            n = self.hierarchy.num_nodes
            row = torch.where((t >= 0) & (t < n), t, n + 1)
            return torch.where(t == self.ignore_index, n, row)
        return self._row_table[(t + self._row_offset).clamp_(0, self._row_table.numel() - 1)]

    @staticmethod
    def _columns(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Column of every predicted value through ``table`` (``[bad, 0..C-1, bad]``)."""
        return table[(values.to(torch.int64) + 1).clamp_(0, table.numel() - 1)]

    @staticmethod
    def _compacts(device: torch.device) -> bool:
        """Whether to compact selected pixels with a boolean index: on the CPU (no device to wait
        for); elsewhere that would sync with the device, so unselected pixels go to a discard slot."""
        return device.type == "cpu"

    def _keep(self, index: torch.Tensor, keep: torch.Tensor, discard: int) -> torch.Tensor:
        """The entries of ``index`` where ``keep`` (the others discarded, see :meth:`_compacts`)."""
        if self._compacts(index.device):
            return index[keep]
        return torch.where(keep, index, discard)

    def update(self, preds: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor | None = None) -> None:
        h = self.hierarchy
        n, k, L = h.num_nodes, h.num_leaves, h.max_depth
        if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"preds and target must be torch tensors, got {type(preds).__name__} and "
                            f"{type(target).__name__}")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise LabelError(f"target must hold integer node ids, got {target.dtype}")
        if preds.is_floating_point():
            if preds.ndim != target.ndim + 1 or preds.shape[1] != n:
                raise ValueError(f"float preds are node logits [B, N={n}, *spatial] for target {tuple(target.shape)}, "
                                 f"got {tuple(preds.shape)}")
            logits = upsample_to_labels(preds.detach(), target, self.upsample_logits)
            if tuple(logits.shape[2:]) != tuple(target.shape[1:]):
                raise ValueError(f"node logits {tuple(preds.shape)} are not at the target's size "
                                 f"{tuple(target.shape)}: pass upsample_logits=True to upsample them bilinearly "
                                 f"(align_corners=False)")
            preds = decode(logits, h, self.decode_method)[0]
        if self.validate_args:
            check = HierarchicalSegMetrics(h, self.ignore_index, self.ece_bins)
            check.update(preds, target, confidence)  # raises the numpy metric's errors
        per_depth = preds.ndim == target.ndim + 1
        expected = (target.shape[0], L, *target.shape[1:]) if per_depth else tuple(target.shape)
        if tuple(preds.shape) != tuple(expected):
            raise ValueError(f"preds shape {tuple(preds.shape)} matches neither target shape {tuple(target.shape)} "
                             f"(leaf ids) nor [B, L={L}, *spatial] (per-depth node ids)")
        rows = self._rows(target)
        size = (n + 2) * (k + 1)
        if per_depth:
            slots = [preds[:, d].reshape(-1) for d in range(L)]
            leaf = self._columns(slots[-1], self._leaf_col)  # k: not a leaf
            safe_leaf = leaf.clamp(max=k - 1)
            on_path = leaf < k
            for d in range(L - 1):
                on_path &= self._path_node[d][safe_leaf] == slots[d]
            index = self._keep(rows * (k + 1) + leaf, on_path, size)
            self._update_off_path(slots, rows, ~on_path)
        else:
            leaf = self._columns(preds.reshape(-1), self._leaf_col)
            safe_leaf = leaf.clamp(max=k - 1)
            index = rows * (k + 1) + leaf
        self.leaf_joint += _count(index, size).view(n + 2, k + 1)
        if confidence is not None:
            self._update_calibration(slots if per_depth else None, safe_leaf, rows, confidence,
                                     (target.shape[0], L, *target.shape[1:]))

    def _update_off_path(self, slots: list[torch.Tensor], rows: torch.Tensor, off: torch.Tensor) -> None:
        n = self.hierarchy.num_nodes
        size = (n + 2) * (n + 1)
        keep: torch.Tensor | None = off
        if self._compacts(rows.device):  # the off-path pixels once
            where = off.nonzero().squeeze(1)
            slots, rows, keep = [s[where] for s in slots], rows[where], None
        for d, s in enumerate(slots):
            base = rows * (n + 1) + self._columns(s, self._node_col)
            self.depth_joint[d] += _count(base if keep is None else torch.where(keep, base, size),
                                          size).view(n + 2, n + 1)
            earlier = [e for e in range(d) if self._has_leaf[e]]  # only leaves repeat across depths
            if earlier:
                repeat = slots[earlier[0]] == s
                for e in earlier[1:]:
                    repeat |= slots[e] == s
                if keep is not None:
                    repeat &= keep
                self.depth_repeat[d] += _count(self._keep(base, repeat, size), size).view(n + 2, n + 1)

    def _update_calibration(self, slots: list[torch.Tensor] | None, leaf: torch.Tensor, rows: torch.Tensor,
                            confidence: torch.Tensor, shape: tuple[int, ...]) -> None:
        n, L, bins = self.hierarchy.num_nodes, self.hierarchy.max_depth, self.ece_bins
        if not isinstance(confidence, torch.Tensor) or not confidence.is_floating_point():
            raise TypeError("confidence must be a float tensor of values in [0, 1]")
        if tuple(confidence.shape) != tuple(shape):
            raise ValueError(f"confidence must have the per-depth shape [B, L, *spatial] = {tuple(shape)}, "
                             f"got {tuple(confidence.shape)}")
        c = confidence.detach().to(torch.float64)
        self.invalid_confidence += (~((c >= 0) & (c <= 1))).sum()
        c = c.nan_to_num(0.0).clamp(0.0, 1.0)
        # Target class per row at every depth: -1 for ignore_index, invalid values and unknown depths.
        row_node = torch.full((L, n + 2), -1, dtype=torch.int64, device=rows.device)
        row_node[:, :n] = self._target_node
        size = bins * 3
        for d in range(L):
            truth = row_node[d][rows]
            pred = slots[d] if slots is not None else self._path_node[d][leaf]
            cd = c[:, d].reshape(-1)
            b = torch.clamp((cd * bins).to(torch.int64), max=bins - 1)
            fixed = torch.round(cd * CONFIDENCE_SCALE).to(torch.int64)
            counted = truth >= 0
            hist = torch.zeros(size + 1, dtype=torch.int64, device=rows.device)
            discard = torch.full_like(b, size)
            _accumulate(hist, torch.where(counted, b * 3, discard), torch.ones_like(b))
            _accumulate(hist, torch.where(counted, b * 3 + 1, discard), fixed)
            _accumulate(hist, torch.where(counted & (pred == truth), b * 3 + 2, discard), torch.ones_like(b))
            self.calibration[d] += hist[:size].view(bins, 3)

    # ------------------------------------------------------------------ results
    def to_metrics(self) -> HierarchicalSegMetrics:
        """The accumulated counts as a :class:`~hieraloss.metrics.HierarchicalSegMetrics` (one host
        copy; after a distributed sync when torchmetrics syncs on compute)."""
        n, k = self.hierarchy.num_nodes, self.hierarchy.num_leaves
        # Every pixel lands in leaf_joint (a path) or in depth_joint at every depth (not a path).
        bad_target = int(self.leaf_joint[n + 1].sum() + self.depth_joint[0, n + 1].sum())
        bad_pred = int(self.leaf_joint[:, k].sum() + self.depth_joint[:, :, n].sum())
        bad_conf = int(self.invalid_confidence)
        if bad_target or bad_pred:
            raise LabelError(
                f"HierarchicalSegMetric was updated with {bad_target} target values that are neither node ids "
                f"0..{self.hierarchy.num_nodes - 1} nor ignore_index={self.ignore_index}, and {bad_pred} "
                f"predictions that are not leaf / node ids; pass validate_args=True to find them at the update "
                f"that has them. {self.hierarchy.label_fix_hint()}")
        if bad_conf:
            raise ValueError(f"HierarchicalSegMetric was updated with {bad_conf} confidences outside [0, 1]")
        out = HierarchicalSegMetrics(self.hierarchy, self.ignore_index, self.ece_bins)
        out.add_joint_counts(self.leaf_joint[:n, :k].cpu().numpy(), self.depth_joint[:, :n, :n].cpu().numpy(),
                             self.depth_repeat[:, :n, :n].cpu().numpy(), self.calibration.cpu().numpy())
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value, dtype=torch.float64)
                for key, value in self.to_metrics().scalars().items()}
