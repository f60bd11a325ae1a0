"""Node-id labels to channels on the place (the hierarchy's label table as tensors), and the label
check of every loss: one value read back per step, an assertion op inside a static program, nothing
with ``check=False``."""

from __future__ import annotations

import paddle

from ...core import checks as _checks
from ...hierarchy import Hierarchy
from .._tables import building_program, place_of, tables_for, vec

LABEL_TABLE_MAX = 1 << 16  # label tables up to this many values; a larger ignore_index takes the compare path


def assert_in_program(condition: paddle.Tensor, what: str) -> None:
    """A check of a static program (``to_static(full_graph=True)``), which has nothing to read back:
    an assertion op that fails the run when ``condition`` (that ``what`` holds) is false. Paddle's
    error says only that an assertion failed; the same step run eagerly gives the library's message."""
    from paddle.static.nn.control_flow import Assert

    Assert(condition, name=what.replace(" ", "_"))


def label_channels(
    labels: paddle.Tensor, hierarchy: Hierarchy, ignore_index: int, check: bool = True
) -> tuple[paddle.Tensor, bool]:
    """Map node-id labels to channels (-1 = ignored), raising :class:`LabelError` for bad values.

    One device sync: whether bad values or partial labels occur is read back together.
    ``check=False`` reads nothing back: bad values count as ignored, partial labels are assumed.
    """
    ignore_index = _checks.check_ignore_index(hierarchy, ignore_index)
    tab = tables_for(hierarchy, place_of(labels))
    lab = labels.astype("int64")
    if max(hierarchy.num_nodes, abs(ignore_index) + 1) <= LABEL_TABLE_MAX:
        # a lookup table indexed by the clamped label value: a few passes over the labels
        table, shift, bad, partial = hierarchy.label_table(ignore_index)
        slot = paddle.clip(lab + shift, 0, table.size - 1).reshape([-1])
        table_t = tab.get(f"label_table:{ignore_index}", lambda: table)  # a str key: SOT traces tuple keys badly
        if not check:  # bad slots hold -2: clip them to -1 (ignored)
            return paddle.clip(paddle.gather(table_t, slot), min=-1).reshape(lab.shape), True
        seen = paddle.bincount(slot, minlength=table.size) > 0
        bad_t = tab.get(("label_bad", ignore_index), lambda: bad)
        partial_t = tab.get(("label_partial", ignore_index), lambda: partial)
        if building_program():
            assert_in_program(paddle.logical_not((seen & bad_t).any()), "labels are node ids or ignore_index")
            return paddle.gather(table_t, slot).reshape(lab.shape), True
        any_bad, any_partial = paddle.stack([(seen & bad_t).any(), (seen & partial_t).any()]).numpy().tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.numpy(), ignore_index)  # cold path: on the host
        return paddle.gather(table_t, slot).reshape(lab.shape), bool(any_partial)  # gather: 6x index_select here
    ignored = lab == ignore_index
    bad = paddle.logical_not(ignored) & ((lab < 0) | (lab >= hierarchy.num_nodes))
    partial = paddle.logical_not(ignored) & (lab >= hierarchy.num_leaves)
    if check and building_program():
        assert_in_program(paddle.logical_not(bad.any()), "labels are node ids or ignore_index")
        any_partial = True
    elif check:
        any_bad, any_partial = paddle.stack([bad.any(), partial.any()]).numpy().tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.numpy(), ignore_index)  # cold path: on the host
    else:
        ignored, any_partial = ignored | bad, True
    safe = paddle.where(ignored, paddle.zeros_like(lab), lab)
    channels = paddle.index_select(vec(tab, "channel_of"), safe.reshape([-1])).reshape(lab.shape)
    return paddle.where(ignored, paddle.full_like(lab, -1), channels), bool(any_partial)
