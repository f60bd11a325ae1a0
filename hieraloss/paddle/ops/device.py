"""What every paddle op shares: the compute dtype, numpy's NaN rule for ``argmax``, the answer for
inputs without a pixel, and the reduction's per-depth factors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import paddle

from ...core import checks as _checks
from ...core.rules import HSSN_SCALE
from .._tables import vec

NORM_EPS = 1e-12  # the floor of an embedding's norm when the triplet ops L2-normalise it


def argmax_nan_first(x: paddle.Tensor, axis: int, keepdim: bool = False) -> paddle.Tensor:
    """``argmax`` with numpy's and torch's NaN rule: the first NaN wins where there is one
    (``paddle.argmax`` skips NaN), else the first maximum."""
    nan = paddle.isnan(x)
    first_nan = paddle.argmax(nan.astype("int32"), axis=axis, keepdim=keepdim)
    return paddle.where(nan.any(axis=axis, keepdim=keepdim), first_nan, paddle.argmax(x, axis=axis, keepdim=keepdim))


def compute_dtype(dtype: Any) -> Any:
    """float64 for float64, else float32 (float16/bfloat16 accumulate in float32)."""
    return paddle.float64 if dtype == paddle.float64 else paddle.float32


def empty_loss(logits: paddle.Tensor, reduction: str) -> paddle.Tensor:
    """The loss of logits with no pixel (B = 0 or a zero-size spatial axis): an exact 0 for a scalar
    reduction, the empty ``[B, N, *spatial]`` map for ``"none"``, in the compute dtype and connected
    to the logits (their gradient is the empty zero tensor of their shape)."""
    xc = logits.astype(compute_dtype(logits.dtype))
    return xc * 0 if reduction == "none" else xc.sum()


def no_pixel(shape: Sequence[int]) -> bool:
    """B = 0 or a zero-size spatial axis. The ops answer such inputs before reshaping: paddle's
    reshape reads a 0 in the target shape as "keep this axis"."""
    return _checks.is_empty([shape[0], *shape[2:]])


def depth_coefs(lc, tab, reduction, g_up, ct):
    """Per-depth factors (length ``max_depth``) turning the sum of a depth's entries into the scalar
    ``reduction``, times ``g_up``: ``g_up`` (sum), ``g_up / count`` (mean, all unmasked entries) or
    ``g_up * 5 / count_d`` (hssn, the depth's unmasked entries). Counts are over all pixels, from a
    histogram of the label channels ``[B, P]`` (-1 = ignored): ``count_d = sum_c hist[c] * counted_per_depth[c, d]``."""
    L = tab.plan.max_depth
    if reduction == "sum":
        return [g_up] * L
    # valid pixels per label channel (index 0 of the shifted bincount counts the ignored ones)
    hist = paddle.bincount(lc.reshape([-1]) + 1, minlength=tab.plan.num_nodes + 1)[1:]
    per_depth = paddle.matmul(hist.astype("float64").unsqueeze(0), vec(tab, "counted_per_depth")).reshape([L])
    counts = [per_depth[d] for d in range(L)]
    if reduction == "mean":
        return [g_up / paddle.clip(paddle.add_n(counts), min=1).astype(ct)] * L
    return [g_up * HSSN_SCALE / paddle.clip(c, min=1).astype(ct) for c in counts]
