"""Framework-free argument checks shared by every backend (clear errors at the door; numpy only).

One answer per input: for the same bad argument every backend (numpy, torch, paddle, and each of
their compute paths) raises the same exception type with the same message, and the message is
written here, once. What only a framework can test (is this a ``torch.Tensor``, is its dtype an
integer dtype, which device is it on) stays in the backend; the backend then calls the matching
function here with framework-free facts (shapes as tuples, dtype names such as ``"float32"``) or
raises the error built here. Dtype names are the framework's name without its module prefix
(:func:`dtype_name`), so numpy, torch and paddle name a dtype the same way.

Decisions (DEVELOPING.md, "One answer per input"):

* ``gamma``: a finite number >= 0; anything else (inf, nan, a negative, a bool, a non-number) is a
  ``ValueError`` naming it (a non-number's is also a ``TypeError``, see :class:`NumberExpectedError`).
* Labels must have an integer dtype; bool and float labels raise :class:`~hieraloss.LabelError`.
* Empty inputs (B = 0 or a zero-size spatial dimension) are valid: the backends return an exact 0
  connected to the graph for scalar reductions and an empty map for ``"none"`` and ``decode``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

from ..hierarchy import Hierarchy, LabelError
from .rules import LEAF_DECODE_METHODS, LEAF_REDUCTIONS
from .rules import REDUCTIONS as REDUCTIONS  # the rule lives in hieraloss.core.rules

LOGIT_DTYPES = ("float16", "bfloat16", "float32", "float64")
LEAF_LOGIT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class NumberExpectedError(ValueError, TypeError):
    """A numeric argument that is not a number (a str, None, a bool). A ``ValueError`` like every
    other bad value of that argument (one exception type per argument), and a ``TypeError`` too,
    which such arguments raised before."""


def dtype_name(dtype: Any) -> str:
    """A dtype's name without the framework prefix: ``float32``, ``int64``, ``bool``, ``bfloat16``
    for numpy dtypes as for ``torch.float32`` / ``paddle.float32`` (``str`` of those)."""
    name = str(dtype)
    for prefix in ("torch.", "paddle."):
        name = name.removeprefix(prefix)
    return name


def _shape(shape: Sequence[Any]) -> tuple[int, ...]:
    """A shape as a tuple of ints, for messages only: the checks compare the sizes as given, so that
    a traced size (``torch.compile`` with dynamic shapes) is guarded on, not specialised."""
    return tuple(int(s) for s in shape)


def check_hierarchy(hierarchy: Any) -> None:
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"hierarchy must be a hieraloss.Hierarchy, got {type(hierarchy).__name__}")


def check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def env_choice(name: str, choices: Sequence[str]) -> str:
    """The value of the environment switch ``name``, one of ``choices`` (unset: the first), read now;
    any other value is :func:`check_choice`'s ``ValueError``."""
    value = os.environ.get(name, choices[0])
    check_choice(value, choices, name)
    return value


def check_reduction(reduction: Any) -> None:
    check_choice(reduction, REDUCTIONS, "reduction")


def check_gamma(gamma: Any) -> float:
    """The focal exponent as a float: a finite number >= 0, else a ``ValueError`` naming it."""
    if isinstance(gamma, bool):
        raise NumberExpectedError(f"gamma must be a finite number >= 0, got {gamma!r}")
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise NumberExpectedError(f"gamma must be a finite number >= 0, got {gamma!r}") from None
    if not g >= 0 or g == math.inf:  # comparisons only: a symbolic float under torch.compile guards
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return g


def check_max_per_class(max_per_class: Any) -> None:
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, numbers.Integral) or max_per_class < 1:
        raise ValueError(f"max_per_class must be a positive int, got {max_per_class!r}")


def check_depth(depth: Any, hierarchy: Hierarchy) -> int:
    """A depth 1..L (``hierarchy.max_depth``) as an int; anything else is a ``ValueError``."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 1 <= depth <= hierarchy.max_depth:
        raise ValueError(f"depth must be in 1..{hierarchy.max_depth}, got {depth!r}")
    return int(depth)


def check_ignore_index(hierarchy: Hierarchy, ignore_index: Any) -> int:
    """``ignore_index`` as an int: an integer (not a bool, not a float) that is not a node id."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    hierarchy.check_ignore_index(int(ignore_index))
    return int(ignore_index)


# ---------------------------------------------------------------------------- logits
def logits_dtype_error(dtype: str, name: str = "logits") -> TypeError:
    return TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype}")


def check_logits(shape: Sequence[int], dtype: str, hierarchy: Hierarchy, name: str = "logits",
                 dtypes: Sequence[str] = LOGIT_DTYPES) -> None:
    """Hierarchy, dtype (by name; ``dtypes`` the ones the backend computes in) and layout
    ``[B, N, *spatial]`` of node logits. Any B and spatial size, 0 included (empty inputs are valid)."""
    check_hierarchy(hierarchy)
    if dtype not in dtypes:
        raise logits_dtype_error(dtype, name)
    if len(shape) < 2:
        raise ValueError(f"{name} must be [B, N, *spatial] with N={hierarchy.num_nodes}, got shape {_shape(shape)}")
    if shape[1] != hierarchy.num_nodes:
        fix = (f"; {int(shape[1])} is the hierarchy's leaf count, but a hierarchical head has one output "
               f"channel per node of the tree (leaves and their ancestors)"
               if shape[1] == hierarchy.num_leaves and hierarchy.num_leaves != hierarchy.num_nodes else "")
        raise ValueError(
            f"{name} have {int(shape[1])} channels on axis 1, but the hierarchy has {hierarchy.num_nodes} "
            f"nodes (shape {_shape(shape)}){fix}: set the classifier's output channels to "
            f"hierarchy.num_nodes ({hierarchy.num_nodes}), e.g. with hieraloss.torch.make_hierarchical(model, "
            f"hierarchy)")


# ---------------------------------------------------------------------------- triplet loss
def check_embeddings_shape(shape: Sequence[int]) -> None:
    """Embeddings of the triplet loss: ``[B, C, h, w]`` (checked after their dtype)."""
    if len(shape) != 4:
        raise ValueError(f"embeddings must be [B, C, h, w], got shape {_shape(shape)}")


def check_triplet_label_shape(shape: Sequence[int], embeddings_shape: Sequence[int]) -> None:
    """Labels of the triplet loss: ``[B, H, W]`` with the embeddings' B (any H, W: they are resampled
    to the embeddings' ``h x w``). Checked after the labels' dtype."""
    if len(shape) != 3 or shape[0] != embeddings_shape[0]:
        raise ValueError(f"labels must be [B, H, W] with B={int(embeddings_shape[0])}, got shape {_shape(shape)}")


# ---------------------------------------------------------------------------- labels
def label_dtype_error(dtype: str, name: str = "labels") -> LabelError:
    """The error for labels whose dtype is not an integer dtype (floats, bool, complex)."""
    return LabelError(f"{name} must be integers (uint8, int32, int64, ...), got {dtype}")


def check_label_shape(shape: Sequence[int], expected: Sequence[int]) -> None:
    """Labels ``[B, *spatial]`` of logits ``[B, N, *spatial]``: ``expected`` is that shape."""
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"labels must have the logits' shape without axis 1, {_shape(expected)}; got {_shape(shape)}"
            + _resolution_hint(shape, expected))


INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}  # by number of spatial axes


def upsample_target(logits_shape: Sequence[Any], labels: Any) -> tuple[tuple[Any, ...], str] | None:
    """``upsample_logits=True`` in every backend: the labels' spatial size and the interpolation mode
    (bilinear for 2 spatial axes, linear / trilinear for 1 / 3) that logits of ``logits_shape`` are
    resized with, or None when they are at that size already or their layout does not match the
    labels' (which the label check then names). Sizes are compared as given (traced sizes too)."""
    size = tuple(getattr(labels, "shape", ())[1:])
    if size == tuple(logits_shape[2:]) or len(size) != len(logits_shape) - 2 or len(size) not in INTERPOLATION_MODES:
        return None
    return size, INTERPOLATION_MODES[len(size)]


def _resolution_hint(shape: Sequence[int], expected: Sequence[int]) -> str:
    """The fix for logits at a lower resolution than their labels (SegFormer's 1/4, a stride-8 head)."""
    if len(shape) != len(expected) or len(shape) < 2 or shape[0] != expected[0]:
        return ""
    labels, logits = _shape(shape[1:]), _shape(expected[1:])
    if not all(0 < b < a for a, b in zip(labels, logits, strict=True)):
        return ""
    return (f". The logits ({'x'.join(map(str, logits))}) are at a lower resolution than the labels "
            f"({'x'.join(map(str, labels))}): pass upsample_logits=True to upsample them bilinearly "
            f"(align_corners=False, as Hugging Face and mmsegmentation do), or upsample them yourself with "
            f"interpolate(logits, size=labels.shape[1:], mode='bilinear', align_corners=False) from "
            f"torch.nn.functional or paddle.nn.functional")


def check_label_batch(ndim: int) -> None:
    """Labels passed alone (``expand_targets``) need a batch axis."""
    if ndim < 1:
        raise LabelError("labels need a batch dimension: [B, *spatial]")


# ---------------------------------------------------------------------------- node weights
def node_weight_dtype_error(dtype: str) -> TypeError:
    return TypeError(f"node_weight must be numeric, got {dtype}")


def check_node_weight_shape(shape: Sequence[int], hierarchy: Hierarchy) -> None:
    if tuple(shape) != (hierarchy.num_nodes,):
        raise ValueError(
            f"node_weight must have shape ({hierarchy.num_nodes},), one weight per channel; got {_shape(shape)}")


def check_finite_count(bad: int, name: str = "logits") -> None:
    """``check_finite=True``: ``bad`` values of ``name`` are nan or inf."""
    if bad:
        raise ValueError(f"{name} hold {bad} non-finite values (nan or inf)")


def is_empty(shape: Sequence[int]) -> bool:
    """Whether a tensor of this shape holds no element (B = 0 or a zero-size spatial axis)."""
    return any(s == 0 for s in shape)


# ---------------------------------------------------------------------------- leaf losses (HXE, soft labels)
def check_leaf_logits(shape: tuple[int, ...], dtype_name: str, hierarchy: Hierarchy,
                      name: str = "leaf_logits") -> None:
    """Dtype and layout of leaf logits ``[B, K, *spatial]`` (one message for every backend).

    ``dtype_name`` is the framework-free name of the dtype (``"float32"``, ``"int64"``, ...)."""
    if dtype_name not in LEAF_LOGIT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype_name}")
    shape = tuple(int(s) for s in shape)
    k = hierarchy.num_leaves
    if len(shape) < 2:
        raise ValueError(f"{name} must be [B, K, *spatial] with K={k} leaves, got shape {shape}")
    if shape[1] != k:
        raise ValueError(
            f"{name} have {shape[1]} channels on axis 1, but the hierarchy has {k} leaves "
            f"(shape {shape}); leaf logits hold one channel per leaf, in leaf-id order")


def check_nonnegative(value: Any, name: str) -> float:
    """A finite number >= 0 as a float (``alpha``, ``beta``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not v >= 0 or v == math.inf:  # comparisons only: a symbolic float under torch.compile guards
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return v


def check_leaf_decode_method(method: Any) -> None:
    check_choice(method, LEAF_DECODE_METHODS, "method")


def check_leaf_reduction(reduction: Any) -> None:
    check_choice(reduction, LEAF_REDUCTIONS, "reduction")
