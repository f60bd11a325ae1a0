"""Per-device tensor copies of a Hierarchy's index tables, cached by (fingerprint, device)."""

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
