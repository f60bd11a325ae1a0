"""Per-device tensor copies of a Hierarchy's index tables, cached by (fingerprint, device).

Traced code (``torch.compile``) reaches the cache only through :func:`cached_on`, which dynamo runs
outside the trace and whose result becomes a constant of the graph: a cold cache is built there,
with numpy and locks, exactly as in eager mode.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from ..hierarchy import Hierarchy

_CACHE: dict[tuple[str, str], DeviceTables] = {}
_LOCK = threading.Lock()


class DeviceTables:
    """Lazily converted tables: ``tables.ancestor_table`` is ``hierarchy.ancestor_table`` as a
    tensor on ``device`` (int64 for integer tables, bool stays bool, floats become float32)."""

    def __init__(self, hierarchy: Hierarchy, device: torch.device):
        self.hierarchy = hierarchy
        self.device = device
        self._tensors: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("hierarchy", "device"):
            raise AttributeError(name)
        tensors = self.__dict__["_tensors"]
        if name not in tensors:
            value = getattr(self.hierarchy, name)
            arr = np.asarray(value)
            if arr.dtype == object:
                raise AttributeError(f"{name} is not a rectangular table")
            if np.issubdtype(arr.dtype, np.integer):
                arr = arr.astype(np.int64)
            elif np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(np.float32)
            tensors[name] = torch.tensor(arr, device=self.device)
        return tensors[name]

    def get(self, name: str, compute) -> torch.Tensor:
        """A derived tensor cached under ``name``; ``compute(self)`` builds it once."""
        tensors = self.__dict__["_tensors"]
        if name not in tensors:
            tensors[name] = compute(self)
        return tensors[name]


def tables_for(hierarchy: Hierarchy, device: torch.device | str) -> DeviceTables:
    """The cached :class:`DeviceTables` of ``hierarchy`` on ``device``."""
    device = torch.device(device)
    key = (hierarchy.fingerprint, str(device))
    tab = _CACHE.get(key)  # a hit takes no lock: torch.compile traces this path, and locks break graphs
    if tab is None:
        with _LOCK:
            tab = _CACHE.setdefault(key, DeviceTables(hierarchy, device))
    return tab


@torch.compiler.assume_constant_result
def cached_on(hierarchy: Hierarchy, device: torch.device | str, name: Any, build, *args: Any) -> Any:
    """``build(tables, *args)``, built once per (hierarchy, device, name) and cached: a plan object or
    a bundle (tuple, dict) of tensors, never a bare tensor (dynamo names a constant tensor after
    this function, so two in one graph would collide).

    Under ``torch.compile`` this runs outside the trace (``assume_constant_result``), its result a
    constant of the graph guarded on ``hierarchy`` and ``device``: cold and warm caches compile alike.
    Its tensors are held as parameters without gradient (:func:`_static_shaped`).
    """
    return tables_for(hierarchy, device).get(name, lambda tab: _static_shaped(build(tab, *args)))


def _static_shaped(value: Any) -> Any:
    """``value`` with every tensor it holds (in tuples, lists, dicts and the attributes of this
    package's table objects) replaced by a ``torch.nn.Parameter`` without gradient on the same
    storage. Dynamo gives a constant tensor symbolic sizes under ``torch.compile(dynamic=True)``,
    and duck sizing then ties them to the inputs' (a table with 2 rows would pin a batch of 2);
    a parameter's shape is always static. Operations on a parameter return plain tensors."""
    if isinstance(value, torch.Tensor):  # a 0-d tensor has no size to pin (and inductor mishandles 0-d parameters)
        if value.dim() == 0 or isinstance(value, torch.nn.Parameter):
            return value
        return torch.nn.Parameter(value, requires_grad=False)
    if isinstance(value, tuple):
        items = [_static_shaped(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_static_shaped(v) for v in value]
    if isinstance(value, dict):
        return {k: _static_shaped(v) for k, v in value.items()}
    if type(value).__module__.startswith(__package__) and hasattr(value, "__dict__"):
        for key, item in vars(value).items():
            setattr(value, key, _static_shaped(item))
    return value
