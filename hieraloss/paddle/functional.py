"""Functional API of the PaddlePaddle backend: validate at the door, then call one op.

Same names, arguments and semantics as ``hieraloss.torch`` (DEVELOPING.md): logits
``[B, N, *spatial]`` in the hierarchy's channel order, labels ``[B, *spatial]`` of node ids.
Loss values are float64 for float64 logits and float32 otherwise (float16/bfloat16 accumulate in
float32); gradients come back in the logits' dtype. Inputs are never modified.

Backends of the tree-min losses: ``"auto"`` picks the fused Triton kernels for GPU tensors (through
DLPack, :mod:`._bridge`) and the compiled CPU kernel for CPU tensors (:mod:`.ops.native`) when
they are available, else the vectorized paddle ops (``"paddle"``, :mod:`.ops`); ``"native"`` and
``"triton"`` force one and raise a ``RuntimeError`` saying why when it cannot run. The triplet loss
has the same choice: ``"auto"`` runs the fused Triton triplet kernels (through the bridge) for GPU
embeddings unless the triplets are gathered across ranks, the paddle ops otherwise; ``"triton"``
forces the kernels; ``"paddle"`` and ``"native"`` run the paddle ops.

Layout of the backend (a module imports only modules to its right, never a door to its left):
doors :mod:`.layers`, :mod:`.leaf_losses`, :mod:`.logic`, :mod:`.distributed` (public faces built on
this module) and this module (checks) -> :mod:`.ops` (one file per op, each with its routing:
``tree_min``, ``cross_entropy``, ``decode``, ``triplet``, ``objective``, ``logicseg``; beside them
``route``, ``labels``, ``native`` (the compiled kernel's glue), ``collective`` (the cross-rank
triplet op), ``device``) -> :mod:`._bridge` (Triton kernels through DLPack) -> :mod:`._tables`
(per-place table caches) -> the framework-free core (``hieraloss.hierarchy``, ``hieraloss.core``,
``hieraloss._native``; never ``hieraloss.numpy``, the reference backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle

from ..core import checks as _checks
from ..core import triplets as _triplets
from ..core.checks import REDUCTIONS, check_max_per_class
from ..core.checks import check_choice as _check_choice
from ..core.checks import check_gamma as _check_gamma
from ..core.checks import check_hierarchy as _check_hierarchy
from ..core.objective import HSSNTermsBase, compose_hssn
from ..core.rules import DECODE_METHODS, HSSN_SCALE, hssn_weights
from ..core.rules import triplet_weight as _core_triplet_weight
from ..core.triplets import SAMPLING
from ..hierarchy import Hierarchy
from ._tables import TENSOR_TYPES, building_program, place_of
from .ops import collective
from .ops.cross_entropy import depth_cross_entropy as _depth_cross_entropy
from .ops.cross_entropy import depth_cross_entropy_op
from .ops.decode import decode as _decode
from .ops.decode import path_scores_op
from .ops.labels import assert_in_program, label_channels
from .ops.objective import fused_step
from .ops.route import BACKENDS
from .ops.tree_min import expand_targets_op, tree_min, tree_min_op
from .ops.triplet import triplet_loss

__all__ = [
    "tree_min_loss",
    "focal_tree_min_loss",
    "hierarchy_triplet_loss",
    "triplet_weight",
    "hssn_loss",
    "decode",
    "path_scores",
    "expand_targets",
    "depth_cross_entropy",
    "REDUCTIONS",
    "DECODE_METHODS",
    "BACKENDS",
]

_FLOATS = (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)
_INTS = (paddle.uint8, paddle.int8, paddle.int16, paddle.int32, paddle.int64)


# ---------------------------------------------------------------------------- validation
_dtype_name = _checks.dtype_name  # "float32" for paddle.float32, as numpy and torch name it


def _check_logits(logits: Any, hierarchy: Hierarchy, name: str = "logits") -> paddle.Tensor:
    """Type, dtype and layout ``[B, N, *spatial]``; any B and spatial size (0 included: an empty
    input gives an exact 0, or an empty map)."""
    _check_hierarchy(hierarchy)
    if not isinstance(logits, TENSOR_TYPES):
        raise TypeError(f"{name} must be a paddle.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise _checks.logits_dtype_error(_dtype_name(logits.dtype), name)
    _checks.check_logits(tuple(logits.shape), _dtype_name(logits.dtype), hierarchy, name)
    return logits


def _check_finite(x: paddle.Tensor, name: str = "logits") -> None:
    if building_program():
        assert_in_program(paddle.isfinite(x).all(), f"{name} hold a non-finite value")
        return
    _checks.check_finite_count(int(paddle.logical_not(paddle.isfinite(x)).astype("int64").sum()), name)


def _label_tensor(labels: Any, place: Any) -> paddle.Tensor:
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):  # bool is not an integer dtype in numpy
            raise _checks.label_dtype_error(_dtype_name(labels.dtype))
        labels = paddle.to_tensor(labels, place=place)
    if not isinstance(labels, TENSOR_TYPES):
        raise TypeError(f"labels must be a paddle.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INTS:
        raise _checks.label_dtype_error(_dtype_name(labels.dtype))
    if str(place_of(labels)) != str(place):
        raise ValueError(f"labels are on {place_of(labels)} but the logits are on {place}")
    return labels


def _labels_at_door(
    labels: Any, logits: paddle.Tensor, hierarchy: Hierarchy, ignore_index: Any
) -> tuple[paddle.Tensor, int]:
    """The label tensor (type, dtype, place and shape checked) and ``ignore_index`` checked; values not yet."""
    labels = _label_tensor(labels, place_of(logits))
    _checks.check_label_shape(tuple(labels.shape), (logits.shape[0], *logits.shape[2:]))
    return labels, _checks.check_ignore_index(hierarchy, ignore_index)


def _checked_labels(
    labels: Any, logits: paddle.Tensor, hierarchy: Hierarchy, ignore_index: int, check: bool = True
) -> tuple[paddle.Tensor, bool]:
    labels, ignore_index = _labels_at_door(labels, logits, hierarchy, ignore_index)
    return label_channels(labels, hierarchy, ignore_index, check)


def _check_node_weight(node_weight: Any, hierarchy: Hierarchy, place: Any) -> paddle.Tensor | None:
    if node_weight is None:
        return None
    if isinstance(node_weight, TENSOR_TYPES):
        w = node_weight.detach()
        if w.dtype == paddle.bool or w.dtype not in _FLOATS + _INTS:
            raise _checks.node_weight_dtype_error(_dtype_name(w.dtype))
        _checks.check_node_weight_shape(tuple(w.shape), hierarchy)
        return w if str(place_of(w)) == str(place) else w.to(place)
    arr = np.asarray(node_weight)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise _checks.node_weight_dtype_error(_dtype_name(arr.dtype))
    _checks.check_node_weight_shape(arr.shape, hierarchy)
    return paddle.to_tensor(arr.astype(np.float64), place=place)


# ---------------------------------------------------------------------------- losses
def upsample_to_labels(logits: paddle.Tensor, labels: Any, upsample_logits: bool) -> paddle.Tensor:
    """As :func:`hieraloss.torch.upsample_to_labels`: with ``upsample_logits=True``, logits at
    another resolution than their labels are resized to the labels' spatial size, bilinearly with
    ``align_corners=False``; ``False`` never resizes."""
    target = _checks.upsample_target(logits.shape, labels) if upsample_logits else None
    if target is None:
        return logits
    size, mode = target
    data_format = {1: "NCW", 2: "NCHW", 3: "NCDHW"}[len(size)]
    return paddle.nn.functional.interpolate(logits, size=[int(s) for s in size], mode=mode, align_corners=False,
                                            data_format=data_format)


def _tree_min(logits, labels, hierarchy, gamma, ignore_index, reduction, node_weight, check_finite, backend,
              check_labels=True, upsample_logits=False):
    x = upsample_to_labels(_check_logits(logits, hierarchy), labels, upsample_logits)
    _check_choice(reduction, REDUCTIONS, "reduction")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    w = _check_node_weight(node_weight, hierarchy, place_of(x))
    if check_finite:
        _check_finite(x)
    return tree_min(x, labels, hierarchy, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                    node_weight=w, backend=backend, check_labels=check_labels)


def tree_min_loss(
    logits: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    ignore_index: int = 255,
    reduction: str = "mean",
    node_weight: Any = None,
    check_finite: bool = False,
    backend: str = "auto",
    check_labels: bool = True,
    upsample_logits: bool = False,
) -> paddle.Tensor:
    """Tree-min loss (SPEC section 4).

    ``l_v = y_v * softplus(-min_{u in A(v)} x_u) + (1 - y_v) * softplus(max_{u in D(v)} x_u)``,
    times ``node_weight[v]`` (channel order). ``reduction``: ``"mean"`` over unmasked (pixel, node)
    entries, ``"sum"``, ``"none"`` (``[B, N, *spatial]``, 0 where masked) or ``"hssn"`` (per-depth
    means summed, times 5: the published normalisation). Non-finite logits propagate unless
    ``check_finite=True``, which raises a ``ValueError`` (one device sync).
    ``backend``: ``"auto"`` (GPU: the fused Triton kernels through DLPack when torch and Triton are
    available; CPU: the compiled kernel of ``hieraloss._native`` when it was built; else the
    vectorized paddle op), ``"paddle"`` (always the vectorized paddle op), ``"native"`` (the compiled
    CPU kernel) or ``"triton"``. All give the same values and gradients within rounding.
    ``check_labels=True`` raises :class:`~hieraloss.LabelError` for a label that is neither a node id
    nor ``ignore_index`` (one value read back from the device); ``check_labels=False`` reads nothing
    back and counts such labels as ignored. ``upsample_logits=True`` resizes logits at a lower
    resolution than the labels to the labels' size first (:func:`upsample_to_labels`).
    """
    return _tree_min(
        logits, labels, hierarchy, 0.0, ignore_index, reduction, node_weight, check_finite, backend, check_labels,
        upsample_logits,
    )


def focal_tree_min_loss(
    logits: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    gamma: float = 2.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    node_weight: Any = None,
    check_finite: bool = False,
    backend: str = "auto",
    check_labels: bool = True,
    upsample_logits: bool = False,
) -> paddle.Tensor:
    """Focal tree-min loss (SPEC section 5): positives times ``(1 - sigmoid(zmin))^gamma``, negatives
    times ``sigmoid(zmax)^gamma``; ``gamma=0`` equals :func:`tree_min_loss`. Arguments as there."""
    g = _check_gamma(gamma)
    return _tree_min(
        logits, labels, hierarchy, g, ignore_index, reduction, node_weight, check_finite, backend, check_labels,
        upsample_logits,
    )


def expand_targets(
    labels: paddle.Tensor, hierarchy: Hierarchy, ignore_index: int = 255
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(targets uint8, mask bool)``, both ``[B, N, *spatial]`` in channel order (DEVELOPING.md)."""
    _check_hierarchy(hierarchy)
    place = place_of(labels) if isinstance(labels, TENSOR_TYPES) else paddle.CPUPlace()
    labels = _label_tensor(labels, place)
    _checks.check_label_batch(labels.ndim)
    lc, _ = label_channels(labels, hierarchy, ignore_index)
    with paddle.no_grad():
        return expand_targets_op(lc, hierarchy)


def depth_cross_entropy(
    logits: paddle.Tensor, labels: paddle.Tensor, hierarchy: Hierarchy, depth: int, *, ignore_index: int = 255,
    backend: str = "auto", check_labels: bool = True, upsample_logits: bool = False, check_finite: bool = False,
) -> paddle.Tensor:
    """Cross-entropy over the classes at ``depth`` (``hierarchy.depth_channels[depth-1]``), targets the
    labelled node's class at that depth; ignored pixels and partial labels coarser than ``depth`` do
    not count. Mean over the counted pixels (an exact 0 if there are none). ``backend`` and
    ``check_labels`` as for :func:`tree_min_loss` (``"native"`` runs the paddle op; ``"triton"`` and
    ``"auto"`` on a GPU run the fused kernel's cross-entropy alone); ``upsample_logits`` and
    ``check_finite`` as there."""
    x = upsample_to_labels(_check_logits(logits, hierarchy), labels, upsample_logits)
    depth = _checks.check_depth(depth, hierarchy)
    _check_choice(backend, BACKENDS, "backend")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    if check_finite:
        _check_finite(x)
    return _depth_cross_entropy(x, labels, hierarchy, depth, ignore_index=ignore_index, backend=backend,
                                check_labels=check_labels)

# ---------------------------------------------------------------------------- triplet loss
def hierarchy_triplet_loss(
    embeddings: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    max_per_class: int = 200,
    base_margin: float = 0.1,
    sampling: str = "random",
    generator: Any = None,
    ignore_index: int = 255,
    process_group: Any = None,
    gather_across_ranks: bool = False,
    check_labels: bool = True,
    backend: str = "auto",
) -> paddle.Tensor:
    """Hierarchy-margin triplet loss (SPEC section 6) of ``embeddings [B, C, h, w]``.

    ``labels [B, H, W]`` are resampled to ``h x w`` (nearest, as ``F.interpolate``); only leaf labels
    take part. Embeddings are L2-normalised along C; ``d(a, b) = 1 - <a, b>``; margin
    ``base_margin + (psi(c_a, c_n) - psi(c_a, c_p)) / (2 * max_depth)``. Per anchor class at most
    ``max_per_class`` triplets (``sampling="random"`` drawn from ``generator``: an int seed, a numpy
    Generator or None for fresh entropy, by the rule of :mod:`hieraloss.core.triplets`, so an int
    seed gives the same triplets as in ``hieraloss.numpy`` and ``hieraloss.torch``; or ``"first"`` in
    flat order for parity with the published code); mean per class, then mean over classes. No
    triplet gives an exact 0 that is still connected to ``embeddings``.

    ``gather_across_ranks=True`` (a collective over ``process_group``) draws the triplets from the
    global batch of all ranks: see :mod:`hieraloss.paddle.distributed`.

    ``check_labels=True`` raises :class:`~hieraloss.LabelError` for a label value that is neither a
    node id nor ``ignore_index``; with ``False`` such labels do not take part (as in torch).

    ``backend``: ``"auto"`` runs the fused Triton triplet kernels of ``hieraloss.torch.kernels``
    through DLPack (:mod:`._bridge`: label codes, per-class selection and scoring on the device, the
    gradient written in the forward) for GPU embeddings when torch and Triton are available and the
    triplets are not gathered across ranks and paddle was not asked for deterministic kernels
    (``FLAGS_cudnn_deterministic``); else the paddle ops (triplets chosen on the host from a host
    copy of the labels). ``"triton"`` asks for the kernels (a ``RuntimeError`` saying why when
    they cannot run, a ``ValueError`` for sizes they do not take or with triplets gathered across
    ranks); ``"paddle"`` and ``"native"`` run the paddle ops. The kernels choose the same triplets
    (the random order is the same numpy draw) and give the same value and gradient within rounding;
    their gradient is summed with atomic adds, so its last bits may vary from run to run. Empty
    embeddings take the paddle ops in every backend.
    """
    loss, _ = _triplet_loss(embeddings, labels, hierarchy, max_per_class=max_per_class, base_margin=base_margin,
                            sampling=sampling, generator=generator, ignore_index=ignore_index,
                            process_group=process_group, gather_across_ranks=gather_across_ranks,
                            check_labels=check_labels, backend=backend)
    return loss


def _triplet_loss(embeddings: Any, labels: Any, hierarchy: Hierarchy, *, max_per_class: int, base_margin: float,
                  sampling: str, generator: Any, ignore_index: int, process_group: Any, gather_across_ranks: bool,
                  check_labels: bool, backend: str, scale: float = 1.0) -> tuple[paddle.Tensor, bool]:
    """``(loss, scaled)``: :func:`hierarchy_triplet_loss`, times ``scale`` where it runs on the fused
    kernels (``scaled`` True: the kernels apply the scale to the value and to the gradient they write);
    on the paddle ops the loss comes unscaled (``scaled`` False) and the caller multiplies."""
    _check_hierarchy(hierarchy)
    if not isinstance(embeddings, TENSOR_TYPES):
        raise TypeError(f"embeddings must be a paddle.Tensor, got {type(embeddings).__name__}")
    if embeddings.dtype not in _FLOATS:
        raise _checks.logits_dtype_error(_dtype_name(embeddings.dtype), "embeddings")
    _checks.check_embeddings_shape(embeddings.shape)
    labels = _label_tensor(labels, place_of(embeddings))
    _checks.check_triplet_label_shape(labels.shape, embeddings.shape)
    _check_choice(sampling, SAMPLING, "sampling")
    check_max_per_class(max_per_class)
    if not _triplets.is_seed(generator):
        raise _triplets.generator_type_error(generator)
    if not isinstance(gather_across_ranks, bool):
        raise TypeError(f"gather_across_ranks must be a bool, got {gather_across_ranks!r}")
    ignore_index = _checks.check_ignore_index(hierarchy, ignore_index)
    _check_choice(backend, BACKENDS, "backend")
    gathered = gather_across_ranks and collective.is_distributed(process_group)
    return triplet_loss(embeddings, labels, hierarchy, max_per_class=int(max_per_class),
                        base_margin=float(base_margin), sampling=sampling, generator=generator,
                        ignore_index=ignore_index, gathered=gathered, process_group=process_group,
                        check_labels=check_labels, backend=backend, scale=scale)


# The published half-cosine ramp is framework-free: one implementation, in hieraloss.core.rules.
triplet_weight = _core_triplet_weight


# ---------------------------------------------------------------------------- published combination
def hssn_loss(
    logits: paddle.Tensor,
    labels: paddle.Tensor,
    hierarchy: Hierarchy,
    *,
    embeddings: paddle.Tensor | None = None,
    step: float | None = None,
    total_steps: float | None = None,
    tree_min_weight: float = 5.0,
    focal_gamma: float | None = None,
    ce_weights: float | Sequence[float] | None = None,
    triplet_weight: float | None = None,
    ignore_index: int = 255,
    node_weight: Any = None,
    max_per_class: int = 200,
    base_margin: float = 0.1,
    sampling: str = "random",
    generator: Any = None,
    return_parts: bool = False,
    backend: str = "auto",
    process_group: Any = None,
    gather_across_ranks: bool = False,
    check_labels: bool = True,
    upsample_logits: bool = False,
    check_finite: bool = False,
) -> paddle.Tensor | tuple[paddle.Tensor, dict[str, paddle.Tensor]]:
    """The published HSSN training loss::

        tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d + w * TT

    ``TM`` is the tree-min loss (focal with ``focal_gamma`` if given) with the per-depth
    normalisation of ``reduction="hssn"`` but without its factor 5, so the default
    ``tree_min_weight=5.0`` reproduces the published ``5 * L_TM``. ``CE_d``: :func:`depth_cross_entropy`
    at depth d; ``ce_weights`` is one weight per depth or one number for all (default 1.0 each; a
    weight 0 skips that depth). ``TT``: :func:`hierarchy_triplet_loss` of ``embeddings``, only if
    they are given; its weight ``w`` is ``triplet_weight`` or, if None, the published schedule
    ``triplet_weight(step, total_steps)``. ``return_parts=True`` also returns a dict of the
    unweighted parts (``tree_min``, ``ce_depth{d}``, ``triplet``) and ``triplet_weight``.
    ``backend``: as for :func:`tree_min_loss`; with the compiled CPU kernel (``"auto"`` on the CPU,
    or ``"native"``; on the GPU ``"auto"`` or ``"triton"``, through the DLPack bridge) tree-min and
    every depth's cross-entropy take one pass over the logits. The parts are detached values in
    every path (the total carries the gradient). The triplet term takes ``backend`` as
    :func:`hierarchy_triplet_loss` does (``"auto"`` on a GPU: the fused triplet kernels).
    ``check_labels``, ``upsample_logits`` and ``check_finite`` as for :func:`tree_min_loss`.
    """
    x = upsample_to_labels(_check_logits(logits, hierarchy), labels, upsample_logits)
    ce_w, tw = hssn_weights(hierarchy.max_depth, ce_weights, embeddings is not None, triplet_weight, step,
                            total_steps)
    gamma = 0.0 if focal_gamma is None else _check_gamma(focal_gamma)
    _check_choice(backend, BACKENDS, "backend")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    w = _check_node_weight(node_weight, hierarchy, place_of(x))
    if check_finite:
        _check_finite(x)
    triplet = dict(embeddings=embeddings, max_per_class=max_per_class, base_margin=base_margin, sampling=sampling,
                   generator=generator, process_group=process_group, gather_across_ranks=gather_across_ranks)
    terms = _HSSNTerms(x, labels, hierarchy, ignore_index, gamma, w, backend, check_labels, triplet)
    return compose_hssn(terms, tree_min_weight=tree_min_weight, ce_weights=ce_w, triplet_weight=tw,
                        return_parts=return_parts)


class _HSSNTerms(HSSNTermsBase):
    """:class:`hieraloss.core.objective.HSSNTerms` in paddle: the Triton kernel through the DLPack
    bridge on the GPU, the compiled kernel on the CPU, else the paddle ops."""

    label_channels = staticmethod(label_channels)
    tree_min_op = staticmethod(tree_min_op)
    depth_cross_entropy_op = staticmethod(depth_cross_entropy_op)
    triplet_loss = staticmethod(_triplet_loss)
    scale = HSSN_SCALE

    fused = fused_step

    @staticmethod
    def scalar(value, like):
        return paddle.to_tensor(value, dtype=like.dtype, place=place_of(like))

    @staticmethod
    def match(value, like):
        return value if value.dtype == like.dtype else value.astype(like.dtype)


# ---------------------------------------------------------------------------- decoding
def decode(
    logits: paddle.Tensor, hierarchy: Hierarchy, method: str = "path", backend: str = "auto"
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Hierarchy-consistent decoding (SPEC section 7) to node ids.

    Returns ``(leaf_labels [B, *spatial], depth_labels [B, L, *spatial])`` (int64); ``depth_labels[:, d-1]``
    is the node id at depth d of the chosen leaf's path. ``method``: ``"path"`` (exact MAP: argmax
    over leaves of the sum of logits along the path), ``"hssn"``, ``"top_down"`` or
    ``"independent"`` (per-depth argmax, may be inconsistent) or ``"logic"`` (LogicSeg's rule descent,
    :func:`logic_refine` with its defaults, then ``"path"``). Ties go to the lowest channel.
    """
    x = _check_logits(logits, hierarchy)
    _check_choice(method, DECODE_METHODS, "method")
    _check_choice(backend, BACKENDS, "backend")
    return _decode(x, hierarchy, method, backend)


def path_scores(logits: paddle.Tensor, hierarchy: Hierarchy) -> paddle.Tensor:
    """Leaf scores ``[B, K, *spatial]``, leaves in id order: entry k is the sum of the logits along
    leaf k's path (root first; a leaf shallower than the tree counts its path once).

    Their argmax over axis 1 is the ``path`` decoding (:func:`decode`) as a leaf id, so an inference
    head can return them and a framework's usual argmax, metrics and visualisation work with the
    data set's K classes. Computed in float64 for float64 logits, else float32 (as :func:`decode`);
    differentiable. Empty inputs give the empty ``[B, K, *spatial]`` map.
    """
    x = _check_logits(logits, hierarchy)
    return path_scores_op(x, hierarchy)
