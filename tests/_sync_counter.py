"""Counting host syncs of a torch step, as ../shared/tools/step_profile.py counts them: patched
``Tensor`` methods that read values back, and dispatcher ops whose output size or value the host
must wait for. Used by tests/torch/test_torch_triplet.py and benchmarks/bench_triplet.py."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "bincount"}


class CountSyncs(TorchDispatchMode):
    """``with CountSyncs() as counter: ...``; ``counter.events`` lists the host reads in order."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in SYNC_METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def counted(t, *a, _orig=orig, _name=name, **k):
                self.events.append(_name)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.events.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
