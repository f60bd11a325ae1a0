"""Per-place paddle copies of a hierarchy's index tables (the paddle twin of :mod:`hieraloss.torch._tables`).

:class:`hieraloss.core.blocks.DepthBlocks` holds the numpy index arrays of the depth-block sweeps
(built once per hierarchy, in the core); :class:`PlaceTables` converts them lazily to paddle tensors on one place
(cached by fingerprint and place, :func:`tables_for`). :func:`col` and :func:`vec` read one table
as a broadcastable column or as a flat index vector. Imports no other module of the backend.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import paddle

from ..core.blocks import DepthBlocks, depth_blocks
from ..hierarchy import Hierarchy

__all__ = ["PlaceTables", "tables_for", "col", "vec", "TENSOR_TYPES", "building_program",
           "no_kernel_in_program", "place_of"]

# What a tensor argument may be: an eager tensor, or a value of the program that
# ``paddle.jit.to_static(full_graph=True)`` builds.
TENSOR_TYPES = (paddle.Tensor, paddle.pir.Value)


def building_program() -> bool:
    """Whether paddle is building a static program (``paddle.jit.to_static(full_graph=True)``):
    tensors are then values of the program, with no place and nothing to read back."""
    return not paddle.in_dynamic_mode()


def place_of(t: Any) -> Any:
    """``t.place``, or None in a program (a program's values have no place; asking warns)."""
    return None if building_program() else t.place


def no_kernel_in_program(backend: str, kernel: str) -> bool:
    """False (the paddle ops build the program), or an error where ``backend`` asks for ``kernel``:
    the compiled CPU kernel and the Triton kernels have no static-graph operator in paddle."""
    if backend == kernel:
        raise RuntimeError(f"backend={kernel!r} was asked for inside paddle.jit.to_static(full_graph=True), "
                           "but that kernel has no paddle static-graph operator; use backend='auto' or "
                           "'paddle' there, or the default SOT mode (full_graph=False)")
    return False


class PlaceTables:
    """Lazily converted paddle copies of a plan's arrays on one place."""

    def __init__(self, plan: DepthBlocks, place: Any):
        self.plan = plan
        self.place = place
        self._cache: dict[Any, paddle.Tensor] = {}

    def get(self, key: Any, make) -> paddle.Tensor:
        if building_program():  # a constant of the program being built; the cache holds eager tensors only
            return paddle.to_tensor(np.asarray(make()))
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = paddle.to_tensor(np.asarray(make()), place=self.place)
        return t


_TABLES: dict[tuple[str, str], PlaceTables] = {}
_LOCK = threading.Lock()


def tables_for(hierarchy: Hierarchy, place: Any) -> PlaceTables:
    """The cached tables of ``hierarchy`` on ``place`` (keyed by fingerprint and place)."""
    fp = hierarchy.fingerprint
    key = (fp, str(place))
    with _LOCK:
        tab = _TABLES.get(key)
        if tab is None:
            tab = _TABLES[key] = PlaceTables(depth_blocks(hierarchy), place)
    return tab


def _entry(plan: Any, name: str, d: int | None, e: int | None) -> Any:
    arr = getattr(plan, name)
    arr = arr if d is None else arr[d]
    return arr if e is None else arr[e]


def _column(plan: Any, name: str, d: int, e: int | None, dtype: str | None) -> np.ndarray:
    arr = np.asarray(_entry(plan, name, d, e)).reshape(1, -1, 1)
    return arr.astype(dtype) if dtype else arr


# The builders are partials, not closures: paddle's SOT mode mishandles a closure's cells on the
# cold path ("'cell' object has no attribute 'get'").
def col(tab: PlaceTables, name: str, d: int, e: int | None = None, dtype: str | None = None) -> paddle.Tensor:
    """A per-block table as a ``[1, n, 1]`` tensor (for broadcasting against ``[B, n, P]``)."""
    return tab.get((name, d, e, dtype, "col"), functools.partial(_column, tab.plan, name, d, e, dtype))


def vec(tab: PlaceTables, name: str, d: int | None = None, e: int | None = None) -> paddle.Tensor:
    """A plan table (``name``, entry ``d``, sub-entry ``e``) as it is, e.g. an index vector."""
    return tab.get((name, d, e), functools.partial(_entry, tab.plan, name, d, e))
