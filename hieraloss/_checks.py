"""Framework-free argument checks shared by every backend (clear errors at the door)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from .hierarchy import Hierarchy


def check_hierarchy(hierarchy: Any) -> None:
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"hierarchy must be a hieraloss.Hierarchy, got {type(hierarchy).__name__}")


def check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_gamma(gamma: Any) -> float:
    """The focal exponent as a float: a finite number >= 0."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise TypeError(f"gamma must be a number, got {gamma!r}") from None
    if not g >= 0 or math.isinf(g):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return g


def check_max_per_class(max_per_class: Any) -> None:
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, numbers.Integral) or max_per_class < 1:
        raise ValueError(f"max_per_class must be a positive int, got {max_per_class!r}")
