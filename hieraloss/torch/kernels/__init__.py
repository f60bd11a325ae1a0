"""Fused Triton kernels for the per-pixel path operations (tree-min losses and decoding).

The torch backend dispatches here; these functions do no validation beyond what the kernels need
(labels are already mapped to channels, -1 = ignored). The ops are registered with
``torch.library`` as ``torch.ops.hieraloss.tree_min_loss``, ``tree_min_loss_backward`` and
``decode``, so autograd and ``torch.compile`` see ordinary operators.

Supported logits dtypes: float16, bfloat16, float32 (computed in float32) and float64 (computed in
float64). Tensors must be on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1``. Any strides
are accepted (e.g. channels-last); the spatial dims are flattened with a view when possible.
Kernel design notes are in the docstrings of ``tree_min.py`` and ``decode.py``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...hierarchy import Hierarchy

__all__ = ["triton_available", "fused_tree_min_loss", "fused_decode", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_IMPORT_ERROR: BaseException | None = None
if importlib.util.find_spec("triton") is not None:
    try:
        from . import decode as _decode  # noqa: F401 - registers torch.ops.hieraloss.decode
        from . import tree_min as _tree_min
        from ._common import kernel_tables as _kernel_tables
    except Exception as exc:  # noqa: BLE001 - a broken triton install means "not available"
        _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = ImportError("triton is not installed")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when the kernels can run: triton imports and there is a CUDA device or the
    interpreter (``TRITON_INTERPRET=1``) is on."""
    return _IMPORT_ERROR is None and (_interpreting() or torch.cuda.is_available())


def _tables(hierarchy: Hierarchy, device: torch.device) -> dict[str, torch.Tensor]:
    # The tables are constants of the hierarchy: torch.compile reads them once at trace time
    # instead of tracing the cache lookup (which hashes the hierarchy).
    if torch.compiler.is_compiling():
        return _constant_tables(hierarchy, device)
    return _kernel_tables(hierarchy, device)


@torch.compiler.assume_constant_result
def _constant_tables(hierarchy, device):
    return _kernel_tables(hierarchy, device)


def _require(t: torch.Tensor) -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the fused Triton kernels are unavailable: {_IMPORT_ERROR!r}")
    if not (t.is_cuda or (_interpreting() and t.device.type == "cpu")):
        raise RuntimeError(
            f"the fused Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
            f"got a tensor on {t.device}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernels support logits of dtype {SUPPORTED_DTYPES}, got {t.dtype}")


def fused_tree_min_loss(logits: torch.Tensor, label_channels: torch.Tensor, hierarchy: Hierarchy, *,
                        gamma: float | None = None, reduction: str = "mean",
                        node_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Tree-min loss (``gamma=None``) or focal tree-min loss (``gamma`` float; 0 equals plain).

    ``logits [B, N, *spatial]``, ``label_channels`` int64 ``[B, *spatial]`` (channels, -1 =
    ignored), ``reduction`` in mean/sum/none/hssn, ``node_weight`` ``[N]`` in channel order.
    The value is float64 for float64 logits, else float32 (a scalar, or ``[B, N, *spatial]`` for
    "none"). Differentiable with respect to ``logits`` (gradient in the logits' dtype), not
    ``node_weight``.
    """
    _require(logits)
    tabs = _tables(hierarchy, logits.device)
    weight = None if node_weight is None else node_weight.detach().to(
        device=logits.device, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32
    ).contiguous()
    tables = [tabs[name] for name in _tree_min.TABLE_NAMES]
    loss, _ = torch.ops.hieraloss.tree_min_loss(
        logits, label_channels, tables, weight, 0.0 if gamma is None else float(gamma), reduction,
    )
    return loss


def fused_decode(logits: torch.Tensor, hierarchy: Hierarchy, method: str = "path"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf_labels [B, *spatial], depth_labels [B, L, *spatial])`` as node ids (int64) for
    ``method`` in ``"path"`` / ``"top_down"``."""
    _require(logits)
    tabs = _tables(hierarchy, logits.device)
    return torch.ops.hieraloss.decode(
        logits.detach(), tabs["ancestor_table"], tabs["depth"], tabs["parent"], tabs["is_leaf"],
        tabs["node_ids"], method,
    )
