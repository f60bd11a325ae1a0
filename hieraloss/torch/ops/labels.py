"""Node-id labels to channels on the device (the hierarchy's label table as tensors), and the label
check of every loss: one value read back per step, an assertion in the graph under ``torch.compile``,
nothing with ``check=False``."""

from __future__ import annotations

import torch

from ...core.checks import check_ignore_index
from ...hierarchy import Hierarchy
from .._tables import cached_on
from .device import device_plan

LABEL_TABLE_MAX = 1 << 16  # label tables up to this many values; a larger ignore_index takes the compare path


def _build_label_table(tab, ignore_index: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    table, shift, bad, partial = tab.hierarchy.label_table(ignore_index)
    return torch.tensor(table, device=tab.device), shift, torch.tensor(bad, device=tab.device), \
        torch.tensor(partial, device=tab.device)


def _label_table(device: torch.device, hierarchy: Hierarchy, ignore_index: int
                 ) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """:meth:`Hierarchy.label_table` as tensors on ``device`` (cached)."""
    return cached_on(hierarchy, device, ("label_table", ignore_index), _build_label_table, ignore_index)


def _label_slots(lab: torch.Tensor, hierarchy: Hierarchy, ignore_index: int):
    """``(slot, table, bad, partial)``: each label's slot in :meth:`Hierarchy.label_table` and the
    table as tensors, or None where ``ignore_index`` is too far out for a table."""
    if max(hierarchy.num_nodes, abs(ignore_index) + 1) > LABEL_TABLE_MAX:
        return None
    table, shift, bad_slot, partial_slot = _label_table(lab.device, hierarchy, ignore_index)
    return (lab + shift).clamp_(0, table.numel() - 1), table, bad_slot, partial_slot


def label_channels(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int,
                    check: bool = True) -> tuple[torch.Tensor, bool]:
    """Map node-id labels to channels (-1 = ignored) and say whether partial labels occur.

    ``check=True`` raises :class:`LabelError` for bad values, reading one value back from the
    device (whether bad values or partial labels occur, together). ``check=False`` reads nothing
    back (no sync: CUDA-graph capturable); bad values then count as ignored and partial labels are
    assumed present. A lookup table indexed by the (clamped) label value does it in a few passes.
    """
    ignore_index = check_ignore_index(hierarchy, ignore_index)
    lab = labels.to(torch.int64)
    slots = _label_slots(lab, hierarchy, ignore_index)
    if slots is not None:
        slot, table, bad_slot, partial_slot = slots
        channels = table[slot].clamp_(min=-1)
        if not check:
            return channels, True
        if torch.compiler.is_compiling():
            _assert_in_graph(bad_slot[slot].any(), hierarchy, ignore_index)
            return channels, True
        counts = torch.bincount(slot.reshape(-1), minlength=table.numel()) > 0
        any_bad, any_partial = torch.stack([(counts & bad_slot).any(), (counts & partial_slot).any()]).tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.cpu().numpy(), ignore_index)  # cold path: on the host
        return channels, bool(any_partial)
    ignored = lab == ignore_index
    bad = ~ignored & ((lab < 0) | (lab >= hierarchy.num_nodes))
    partial = ~ignored & (lab >= hierarchy.num_leaves)
    if not check:
        ignored = ignored | bad
        any_partial = True
    elif torch.compiler.is_compiling():
        _assert_in_graph(bad.any(), hierarchy, ignore_index)
        any_partial = True
    else:
        any_bad, any_partial = torch.stack([bad.any(), partial.any()]).tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.cpu().numpy(), ignore_index)  # cold path: on the host
    safe = torch.where(ignored, torch.zeros_like(lab), lab)
    channel_of = device_plan(hierarchy, labels.device).channel_of
    return torch.where(ignored, torch.full_like(lab, -1), channel_of[safe]), bool(any_partial)


def _assert_in_graph(any_bad: torch.Tensor, hierarchy: Hierarchy, ignore_index: int) -> None:
    """The label check of a compiled graph: an assertion on the device (no host read, no graph
    break), raised when the step runs; run the step eagerly to see which values."""
    message = (f"hieraloss: labels hold values that are neither node ids 0..{hierarchy.num_nodes - 1} nor "
               f"ignore_index={ignore_index} (run eagerly for the values, or pass check_labels=False to count "
               f"them as ignored)")
    torch._assert_async(~any_bad, message)


def check_label_values(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int) -> None:
    """Raise :class:`LabelError` if a label is neither a node id nor ``ignore_index`` (one sync;
    under ``torch.compile`` an assertion in the graph instead)."""
    lab = labels.to(torch.int64)
    slots = _label_slots(lab, hierarchy, ignore_index)
    if slots is not None:
        slot, _, bad_slot, _ = slots
        bad = bad_slot[slot].any()
    else:
        bad = ((lab != ignore_index) & ((lab < 0) | (lab >= hierarchy.num_nodes))).any()
    if torch.compiler.is_compiling():
        _assert_in_graph(bad, hierarchy, ignore_index)
        return
    any_bad = bool(bad)
    if any_bad:
        raise hierarchy.invalid_label_error(lab.cpu().numpy(), ignore_index)  # cold path: on the host
