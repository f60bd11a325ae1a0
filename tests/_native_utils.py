"""Helpers shared by the compiled-kernel tests."""

from __future__ import annotations

import contextlib

import pytest

from hieraloss import _native


@contextlib.contextmanager
def isa_capped(name: str):
    """Run the block on the ``name`` instruction-set variant of the kernel (skip if it is missing)."""
    best = _native.ISAS[-1]
    try:
        used = _native.set_isa(name)
        if used != name:
            pytest.skip(f"this CPU or build has no {name} variant (got {used})")
        yield
    finally:
        _native.set_isa(best)
