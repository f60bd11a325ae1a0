"""Fused Triton kernels for the per-pixel path operations (the HSSN objective and decoding) and the
triplet loss.

The torch backend dispatches here; these functions do no validation beyond what the kernels need.
The ops are registered with ``torch.library`` (``torch.ops.hieraloss.objective``,
``objective_map_backward``, ``decode``, ``triplet_codes`` and ``triplet``) and receive the
hierarchy as its fingerprint, so autograd and ``torch.compile`` see ordinary operators with plain
arguments.

Supported logits dtypes: float16, bfloat16, float32 (read in their own width, computed in float32)
and float64. Tensors must be on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1``. Any
strides are accepted (e.g. channels-last). Design notes: ``_codegen.py`` (the objective kernel,
generated per hierarchy), ``decode.py`` and ``triplet.py``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence

import torch

from ...hierarchy import Hierarchy

__all__ = ["triton_available", "import_error", "REQUIRE_ENV", "fused_objective", "fused_tree_min_loss", "fused_decode",
           "triplet_codes", "fused_triplet_loss", "batch_unsupported_reason", "unsupported_reason",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# HIERALOSS_REQUIRE_TRITON=1 (make gpu-check sets it): a kernel that cannot be imported is an error,
# not a quiet fall back to the framework ops.
REQUIRE_ENV = "HIERALOSS_REQUIRE_TRITON"
_IMPORT_ERROR: BaseException | None = None
if importlib.util.find_spec("triton") is not None:
    try:
        from . import decode as _decode  # noqa: F401 - registers torch.ops.hieraloss.decode
        from . import objective as _objective
        from . import triplet as _triplet
        from ._common import batch_unsupported_reason, unsupported_reason  # noqa: F401 - exported
    except Exception as exc:  # noqa: BLE001 - any failure of the kernels' import is reported below
        if os.environ.get(REQUIRE_ENV) == "1":
            raise ImportError(f"{REQUIRE_ENV}=1, but the fused Triton kernels failed to import: {exc!r}") from exc
        _IMPORT_ERROR = exc
        # triton is installed, so this is a broken install or a bug: say so (backend="auto" then runs the
        # framework ops, backend="triton" raises with this reason)
        warnings.warn(f"hieraloss: the fused Triton kernels failed to import ({exc!r}); backend='auto' runs the "
                      f"framework ops. Set {REQUIRE_ENV}=1 to make this an error.", RuntimeWarning, stacklevel=2)
else:
    _IMPORT_ERROR = ImportError("triton is not installed")
    if os.environ.get(REQUIRE_ENV) == "1":
        raise ImportError(f"{REQUIRE_ENV}=1, but triton is not installed (pip install 'hieraloss[triton]')")


def import_error() -> BaseException | None:
    """Why the kernels could not be imported (None when they were)."""
    return _IMPORT_ERROR


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when the kernels can run: triton imports and there is a CUDA device or the
    interpreter (``TRITON_INTERPRET=1``) is on."""
    return _IMPORT_ERROR is None and (_interpreting() or torch.cuda.is_available())


def _require_triton(t: torch.Tensor) -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the fused Triton kernels are unavailable: {_IMPORT_ERROR!r}")
    if not (t.is_cuda or (_interpreting() and t.device.type == "cpu")):
        raise RuntimeError(
            f"the fused Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
            f"got a tensor on {t.device}"
        )


def _require(t: torch.Tensor) -> None:
    _require_triton(t)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernels support logits of dtype {SUPPORTED_DTYPES}, got {t.dtype}")


def fused_objective(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, ignore_index: int | None,
                    gamma: float = 0.0, reduction: str = "hssn", tree_min: bool = True, tm_weight: float = 1.0,
                    ce_weights: Sequence[float] = (), node_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, parts)``: ``total = tm_weight * TM + sum_d ce_weights[d-1] * CE_d`` (differentiable
    with respect to ``logits``), ``parts = [TM, CE_1, ..., CE_L]`` detached (see ``objective.py``).

    ``labels`` are node ids with ``ignore_index`` (not checked here: values that are neither count
    as ignored), or label channels (-1 = ignored) with ``ignore_index=None``. ``TM`` is the tree-min loss
    (focal for ``gamma != 0``) under ``reduction``; ``reduction="none"`` returns the loss map.
    """
    _require(logits)
    if ignore_index is None:
        ignore_index = _objective.CHANNEL_LABELS
    return _objective.objective(logits, labels, hierarchy, ignore_index=ignore_index, node_weight=node_weight,
                                gamma=gamma, reduction=reduction, tree_min=tree_min, tm_weight=tm_weight,
                                ce_weights=ce_weights)


def fused_tree_min_loss(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy, *,
                        gamma: float | None = None, reduction: str = "mean",
                        node_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Tree-min loss (``gamma=None``) or focal tree-min loss (``gamma`` float; 0 equals plain).

    ``logits [B, N, *spatial]``, ``label_channels`` integer ``[B, *spatial]`` (channels, -1 =
    ignored), ``reduction`` in mean/sum/none/hssn, ``node_weight`` ``[N]`` in channel order.
    The value is float64 for float64 logits, else float32 (a scalar, or ``[B, N, *spatial]`` for
    "none"). Differentiable with respect to ``logits`` (gradient in the logits' dtype), not
    ``node_weight``.
    """
    _require(logits)
    if node_weight is not None:
        node_weight = node_weight.detach()
    total, _ = _objective.objective(logits, label_channels, hierarchy, ignore_index=_objective.CHANNEL_LABELS,
                                    node_weight=node_weight, gamma=0.0 if gamma is None else float(gamma),
                                    reduction=reduction)
    return total


def fused_decode(logits: torch.Tensor, hierarchy: Hierarchy, method: str = "path"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf_labels [B, *spatial], depth_labels [B, L, *spatial])`` as node ids (int64) for
    ``method`` in ``"path"`` / ``"top_down"``."""
    _require(logits)
    return torch.ops.hieraloss.decode(logits.detach(), hierarchy.fingerprint, method)


def triplet_codes(labels: torch.Tensor, hierarchy: Hierarchy, *, ignore_index: int, size: tuple[int, int]
                  ) -> torch.Tensor:
    """int32 ``[B * h * w]`` for ``labels [B, H, W]`` resampled nearest to ``size = (h, w)``: ``leaf |
    group << 16`` where the pixel takes part in the triplet loss (a leaf label), else -1."""
    _require_triton(labels)
    return _triplet.triplet_codes(labels, hierarchy, ignore_index, size)


def fused_triplet_loss(embeddings: torch.Tensor, codes: torch.Tensor, hierarchy: Hierarchy, *, max_per_class: int,
                       base_margin: float, order: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """The hierarchy triplet loss of ``embeddings [B, C, h, w]`` for the :func:`triplet_codes` of its
    labels, in key order (flat order, or ``order [B * h * w]``: the taking-part pixels in the random
    order, then the others), times ``scale``. Differentiable with respect to ``embeddings``.

    ``scale`` (a weight on the loss, e.g. ``hssn_loss``'s triplet weight) is applied inside the
    kernel, to the value and the gradient it writes: no multiply of its own, and a backward from a
    total that adds this value unweighted does no pass over the gradient."""
    _require(embeddings)
    return _triplet.triplet_loss(embeddings, codes, hierarchy, max_per_class=max_per_class, base_margin=base_margin,
                                 order=order, scale=scale)


def triplet_supported(hierarchy: Hierarchy, embeddings: torch.Tensor) -> bool:
    """Whether :func:`fused_triplet_loss` takes these sizes."""
    return _IMPORT_ERROR is None and _triplet.supports(hierarchy, embeddings)
