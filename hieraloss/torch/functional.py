"""Functional API of the torch backend: validate at the door, then call one op.

Conventions (DEVELOPING.md): logits ``[B, N, *spatial]`` in the hierarchy's channel order, labels
``[B, *spatial]`` of node ids (leaf ids, internal ids for partial labels, or ``ignore_index``).
Loss values are float64 for float64 logits and float32 otherwise (float16/bfloat16 are accumulated
in float32); gradients come back in the logits' dtype. Inputs are never modified.

Label validation reads one value back from the device (a sync; under ``torch.compile`` a graph
break); ``check_labels=False`` skips it, and on the Triton path a training step then reads nothing
back (CUDA-graph capturable) and compiles as one graph. ``torch.compile`` of the functions and
modules works on CPU too (tested with ``aot_eager``; inductor compiles as well).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

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
from .ops.cross_entropy import depth_cross_entropy as _depth_cross_entropy
from .ops.cross_entropy import depth_cross_entropy_op
from .ops.decode import decode as _decode
from .ops.decode import path_scores_op
from .ops.labels import check_label_values, label_channels
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

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------- validation
def _check_logits(logits: Any, hierarchy: Hierarchy, name: str = "logits") -> torch.Tensor:
    _check_hierarchy(hierarchy)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise _checks.logits_dtype_error(_checks.dtype_name(logits.dtype), name)
    _checks.check_logits(tuple(logits.shape), _checks.dtype_name(logits.dtype), hierarchy, name)
    return logits


def upsample_to_labels(logits: torch.Tensor, labels: Any, upsample_logits: bool) -> torch.Tensor:
    """``upsample_logits=True``: logits at a lower resolution than their labels (SegFormer's 1/4, a
    stride-8 head) resized to the labels' spatial size, bilinearly with ``align_corners=False`` (as
    Hugging Face and mmsegmentation do; linear / trilinear for 1 / 3 spatial axes). Logits already
    at the labels' size pass unchanged; ``False`` never resizes, and a size mismatch is an error."""
    target = _checks.upsample_target(logits.shape, labels) if upsample_logits else None
    if target is None:
        return logits
    size, mode = target
    return torch.nn.functional.interpolate(logits, size=size, mode=mode, align_corners=False)


def _check_finite(x: torch.Tensor, name: str = "logits") -> None:
    _checks.check_finite_count(int((~torch.isfinite(x)).sum()), name)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, over a copy of a read-only array (a memory-mapped file, a hierarchy
    table), which torch would warn about although nothing here writes to it."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _label_tensor(labels: Any, device: torch.device) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = _from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise _checks.label_dtype_error(_checks.dtype_name(labels.dtype))
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    return labels


def _check_ignore_index(hierarchy: Hierarchy, ignore_index: Any) -> int:
    return _checks.check_ignore_index(hierarchy, ignore_index)


def _labels_at_door(labels: Any, logits: torch.Tensor, hierarchy: Hierarchy, ignore_index: Any
                    ) -> tuple[torch.Tensor, int]:
    """The label tensor (type, device and shape checked) and ``ignore_index`` checked; values not yet."""
    labels = _label_tensor(labels, logits.device)
    _checks.check_label_shape(tuple(labels.shape), (logits.shape[0], *logits.shape[2:]))
    return labels, _check_ignore_index(hierarchy, ignore_index)


def _checked_labels(labels: Any, logits: torch.Tensor, hierarchy: Hierarchy,
                    ignore_index: int, check: bool = True) -> tuple[torch.Tensor, bool]:
    labels, ignore_index = _labels_at_door(labels, logits, hierarchy, ignore_index)
    return label_channels(labels, hierarchy, ignore_index, check)


def _check_node_weight(node_weight: Any, hierarchy: Hierarchy, device: torch.device) -> torch.Tensor | None:
    if node_weight is None:
        return None
    w = torch.as_tensor(_from_numpy(node_weight) if isinstance(node_weight, np.ndarray) else node_weight)
    if not (w.is_floating_point() or (not w.is_complex() and w.dtype != torch.bool)):
        raise _checks.node_weight_dtype_error(_checks.dtype_name(w.dtype))
    _checks.check_node_weight_shape(tuple(w.shape), hierarchy)
    return w.detach().to(device)


# ---------------------------------------------------------------------------- losses
def _tree_min(logits, labels, hierarchy, gamma, ignore_index, reduction, node_weight, check_finite, backend,
              check_labels, upsample_logits=False):
    x = upsample_to_labels(_check_logits(logits, hierarchy), labels, upsample_logits)
    _check_choice(reduction, REDUCTIONS, "reduction")
    _check_choice(backend, BACKENDS, "backend")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    w = _check_node_weight(node_weight, hierarchy, x.device)
    if check_finite:
        _check_finite(x)
    return tree_min(x, labels, hierarchy, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                    node_weight=w, backend=backend, check_labels=check_labels)


def tree_min_loss(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, ignore_index: int = 255,
                  reduction: str = "mean", node_weight: Any = None, check_finite: bool = False,
                  backend: str = "auto", check_labels: bool = True, upsample_logits: bool = False) -> torch.Tensor:
    """Tree-min loss (SPEC section 4).

    ``l_v = y_v * softplus(-min_{u in A(v)} x_u) + (1 - y_v) * softplus(max_{u in D(v)} x_u)``,
    times ``node_weight[v]`` (channel order). ``reduction``: ``"mean"`` over unmasked (pixel, node)
    entries, ``"sum"``, ``"none"`` (``[B, N, *spatial]``, 0 where masked) or ``"hssn"`` (per-depth
    means summed, times 5: the published normalisation). Non-finite logits propagate unless
    ``check_finite=True``, which raises a ``ValueError`` (one device sync).
    ``backend``: ``"auto"`` (CUDA: the fused Triton kernel when Triton is available; CPU: the
    compiled kernel when it was built; else the vectorized torch op), ``"torch"`` (always the
    vectorized torch op), ``"native"`` (the compiled CPU kernel) or ``"triton"``. All give the same
    values and gradients within rounding.

    ``check_labels=True`` raises :class:`~hieraloss.LabelError` for a label that is neither a node
    id nor ``ignore_index``; it reads one value back from the device (a sync). Under
    ``torch.compile`` it is an assertion in the graph instead (``torch._assert_async``: no graph
    break; a ``RuntimeError`` when the step runs). ``check_labels=False`` skips it (no host sync
    on the Triton path, so the step can be captured in a CUDA graph); such labels then count as
    ignored.

    ``upsample_logits=True`` takes logits at a lower resolution than the labels (SegFormer's 1/4
    output, a stride-8 head) and resizes them to the labels' size first, bilinearly with
    ``align_corners=False`` (:func:`upsample_to_labels`); by default a size mismatch is an error.
    """
    return _tree_min(logits, labels, hierarchy, 0.0, ignore_index, reduction, node_weight, check_finite, backend,
                     check_labels, upsample_logits)


def focal_tree_min_loss(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, gamma: float = 2.0,
                        ignore_index: int = 255, reduction: str = "mean", node_weight: Any = None,
                        check_finite: bool = False, backend: str = "auto", check_labels: bool = True,
                        upsample_logits: bool = False) -> torch.Tensor:
    """Focal tree-min loss (SPEC section 5): positives times ``(1 - sigmoid(zmin))^gamma``, negatives
    times ``sigmoid(zmax)^gamma``; ``gamma=0`` equals :func:`tree_min_loss`. Arguments as there."""
    g = _check_gamma(gamma)
    return _tree_min(logits, labels, hierarchy, g, ignore_index, reduction, node_weight, check_finite, backend,
                     check_labels, upsample_logits)


def expand_targets(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int = 255
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets uint8, mask bool)``, both ``[B, N, *spatial]`` in channel order (DEVELOPING.md)."""
    _check_hierarchy(hierarchy)
    labels = _label_tensor(labels, labels.device if isinstance(labels, torch.Tensor) else torch.device("cpu"))
    _checks.check_label_batch(labels.dim())
    lc, _ = label_channels(labels, hierarchy, ignore_index)
    return expand_targets_op(lc, hierarchy)


def depth_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, depth: int, *,
                        ignore_index: int = 255, backend: str = "auto", check_labels: bool = True,
                        upsample_logits: bool = False, check_finite: bool = False) -> torch.Tensor:
    """Cross-entropy over the classes at ``depth`` (``hierarchy.depth_channels[depth-1]``), targets the
    labelled node's class at that depth; ignored pixels and partial labels coarser than ``depth`` do
    not count. Mean over the counted pixels (an exact 0 if there are none). ``backend`` and
    ``check_labels`` and ``check_finite`` as for :func:`tree_min_loss` (``"native"`` runs the torch ops)."""
    x = upsample_to_labels(_check_logits(logits, hierarchy), labels, upsample_logits)
    depth = _checks.check_depth(depth, hierarchy)
    _check_choice(backend, BACKENDS, "backend")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    if check_finite:
        _check_finite(x)
    return _depth_cross_entropy(x, labels, hierarchy, int(depth), ignore_index=ignore_index, backend=backend,
                                check_labels=check_labels)


# ---------------------------------------------------------------------------- triplet loss
def hierarchy_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
                           max_per_class: int = 200, base_margin: float = 0.1, sampling: str = "random",
                           generator: Any = None, ignore_index: int = 255,
                           process_group: Any = None, gather_across_ranks: bool = False,
                           check_labels: bool = True, backend: str = "auto") -> torch.Tensor:
    """Hierarchy-margin triplet loss (SPEC section 6) of ``embeddings [B, C, h, w]``.

    ``labels [B, H, W]`` are resampled to ``h x w`` (nearest, as ``F.interpolate``); only leaf labels
    take part. Embeddings are L2-normalised along C; ``d(a, b) = 1 - <a, b>``; margin
    ``base_margin + (psi(c_a, c_n) - psi(c_a, c_p)) / (2 * max_depth)``. Per anchor class at most
    ``max_per_class`` triplets (``sampling="random"`` from ``generator``, or ``"first"`` in flat
    order for parity with the published code); mean per class, then mean over classes. No triplet
    gives an exact 0 that is still connected to ``embeddings``.

    ``generator``: an int seed or a numpy Generator draws the key order by the core rule
    (:mod:`hieraloss.core.triplets`), so an int seed gives the same triplets as ``hieraloss.numpy``
    and ``hieraloss.paddle``; the permutation is drawn on the host and copied to the embeddings'
    device (reading back the number of taking-part pixels: one host sync). A ``torch.Generator`` or
    None (torch's default generator of the embeddings' device, seeded by ``torch.manual_seed``) gives
    torch's own draw: one random int64 sort key per pixel, drawn on the generator's device, and no
    host sync (framework generators give framework draws).

    ``gather_across_ranks=True`` (a collective over ``process_group`` of ``torch.distributed``;
    every rank must call it) chooses the triplets on the global batch of all ranks in rank order,
    so every rank gets the same value: the single-process loss of the batches concatenated along
    dim 0 (``"random"`` draws from rank 0's generator). Gradients reach only this rank's
    embeddings, so DDP's averaging divides this term's gradient by the world size. See
    :mod:`hieraloss.torch.distributed`. Without an initialised process group (or with one rank)
    it is the local loss.

    ``check_labels=True`` raises :class:`~hieraloss.LabelError` for a label value that is neither a
    node id nor ``ignore_index`` (one value read back); ``False`` reads nothing back (unless the
    generator is an int seed, the step is then free of host syncs) and such labels do not take part.

    ``backend``: ``"auto"`` runs the fused Triton kernels on CUDA (three launches; the same triplets,
    the value and gradient written together, the gradient accumulated with atomic adds, so its last
    bits may vary from run to run) unless ``torch.use_deterministic_algorithms(True)`` is on or
    the triplets are gathered across ranks, and the torch ops otherwise; ``"triton"`` asks for the
    kernels; ``"torch"`` and ``"native"`` run the torch ops.
    """
    loss, _ = _triplet_loss(embeddings, labels, hierarchy, max_per_class=max_per_class, base_margin=base_margin,
                            sampling=sampling, generator=generator, ignore_index=ignore_index,
                            process_group=process_group, gather_across_ranks=gather_across_ranks,
                            check_labels=check_labels, backend=backend)
    return loss


def _triplet_loss(embeddings: Any, labels: Any, hierarchy: Hierarchy, *, max_per_class: int, base_margin: float,
                  sampling: str, generator: Any, ignore_index: int, process_group: Any, gather_across_ranks: bool,
                  check_labels: bool, backend: str, scale: float = 1.0) -> tuple[torch.Tensor, bool]:
    """``(loss, scaled)``: :func:`hierarchy_triplet_loss`, times ``scale`` where it runs on the fused
    kernels (``scaled`` True: the kernels apply the scale to the value and to the gradient they write,
    so neither the forward nor the backward takes a pass of its own for it); on the torch ops the
    loss comes unscaled (``scaled`` False) and the caller multiplies."""
    _check_hierarchy(hierarchy)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dtype not in _FLOATS:
        raise _checks.logits_dtype_error(_checks.dtype_name(embeddings.dtype), "embeddings")
    _checks.check_embeddings_shape(embeddings.shape)
    labels = _label_tensor(labels, embeddings.device)
    _checks.check_triplet_label_shape(labels.shape, embeddings.shape)
    _check_choice(sampling, SAMPLING, "sampling")
    check_max_per_class(max_per_class)
    if not isinstance(generator, torch.Generator):
        if not _triplets.is_seed(generator):
            raise _triplets.generator_type_error(generator, "torch.Generator")
        if generator is not None and sampling == "random":  # an int seed: the core's draw
            generator = _triplets.numpy_generator(generator)
    if not isinstance(gather_across_ranks, bool):
        raise TypeError(f"gather_across_ranks must be a bool, got {gather_across_ranks!r}")
    ignore_index = _check_ignore_index(hierarchy, ignore_index)
    _check_choice(backend, BACKENDS, "backend")
    if check_labels:
        check_label_values(labels, hierarchy, ignore_index)
    return triplet_loss(embeddings, labels, hierarchy, max_per_class=int(max_per_class), base_margin=float(base_margin),
                        sampling=sampling, generator=generator, ignore_index=ignore_index,
                        gather_across_ranks=gather_across_ranks, process_group=process_group, backend=backend,
                        scale=scale)


# The published half-cosine ramp is framework-free: one implementation, in hieraloss.core.rules.
triplet_weight = _core_triplet_weight


# ---------------------------------------------------------------------------- published combination
def hssn_loss(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *,
              embeddings: torch.Tensor | None = None, step: float | None = None,
              total_steps: float | None = None, tree_min_weight: float = 5.0,
              focal_gamma: float | None = None, ce_weights: float | Sequence[float] | None = None,
              triplet_weight: float | None = None, ignore_index: int = 255, node_weight: Any = None,
              max_per_class: int = 200, base_margin: float = 0.1, sampling: str = "random",
              generator: Any = None, return_parts: bool = False,
              backend: str = "auto", process_group: Any = None,
              gather_across_ranks: bool = False, check_labels: bool = True,
              upsample_logits: bool = False, check_finite: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The published HSSN training loss::

        tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d + w * TT

    ``TM`` is the tree-min loss (focal with ``focal_gamma`` if given) with the per-depth
    normalisation of ``reduction="hssn"`` but without its factor 5, so the default
    ``tree_min_weight=5.0`` reproduces the published ``5 * L_TM``. ``CE_d``: :func:`depth_cross_entropy`
    at depth d; ``ce_weights`` is one weight per depth or one number for all (default 1.0 each; a
    weight 0 skips that depth). ``TT``: :func:`hierarchy_triplet_loss` of ``embeddings``, only if
    they are given; its weight ``w`` is ``triplet_weight`` or, if None, the published schedule
    ``triplet_weight(step, total_steps)``. ``return_parts=True`` also returns a dict of the
    unweighted parts (``tree_min``, ``ce_depth{d}``, ``triplet``) and ``triplet_weight``, as
    detached values for logging: differentiate the total.
    ``process_group`` and ``gather_across_ranks`` go to :func:`hierarchy_triplet_loss` (cross-rank
    triplets; a collective, so every rank must pass embeddings). ``check_labels`` and ``check_finite``
    as for :func:`tree_min_loss`. ``upsample_logits=True`` resizes logits at a lower resolution than the
    labels to the labels' size first (:func:`upsample_to_labels`); the embeddings need no resizing
    (the triplet term samples the labels at their resolution).

    TM and every CE_d are one pass over the logits that also writes the gradient of their weighted
    sum: the Triton kernel on CUDA, the compiled kernel on the CPU (``backend="auto"``); ``"torch"``
    runs the vectorized ops.
    """
    x = upsample_to_labels(_check_logits(logits, hierarchy), labels, upsample_logits)
    ce_w, tw = hssn_weights(hierarchy.max_depth, ce_weights, embeddings is not None, triplet_weight, step,
                            total_steps)
    gamma = 0.0 if focal_gamma is None else _check_gamma(focal_gamma)
    _check_choice(backend, BACKENDS, "backend")
    labels, ignore_index = _labels_at_door(labels, x, hierarchy, ignore_index)
    w = _check_node_weight(node_weight, hierarchy, x.device)
    if check_finite:
        _check_finite(x)
    triplet = dict(embeddings=embeddings, max_per_class=max_per_class, base_margin=base_margin, sampling=sampling,
                   generator=generator, process_group=process_group, gather_across_ranks=gather_across_ranks)
    terms = _HSSNTerms(x, labels, hierarchy, ignore_index, gamma, w, backend, check_labels, triplet)
    return compose_hssn(terms, tree_min_weight=tree_min_weight, ce_weights=ce_w, triplet_weight=tw,
                        return_parts=return_parts)


class _HSSNTerms(HSSNTermsBase):
    """:class:`hieraloss.core.objective.HSSNTerms` in torch: the Triton kernel on CUDA, the compiled
    kernel on the CPU, else the torch ops."""

    label_channels = staticmethod(label_channels)
    tree_min_op = staticmethod(tree_min_op)
    depth_cross_entropy_op = staticmethod(depth_cross_entropy_op)
    triplet_loss = staticmethod(_triplet_loss)
    scale = HSSN_SCALE

    fused = fused_step

    @staticmethod
    def scalar(value, like):
        return like.new_full((), value)

    @staticmethod
    def match(value, like):
        return value


# ---------------------------------------------------------------------------- decoding
def decode(logits: torch.Tensor, hierarchy: Hierarchy, method: str = "path", backend: str = "auto"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchy-consistent decoding (SPEC section 7) to node ids.

    Returns ``(leaf_labels [B, *spatial], depth_labels [B, L, *spatial])`` (int64); ``depth_labels[:, d-1]``
    is the node id at depth d of the chosen leaf's path. ``method``: ``"path"`` (exact MAP: argmax
    over leaves of the sum of logits along the path), ``"hssn"``, ``"top_down"`` or
    ``"independent"`` (per-depth argmax, may be inconsistent) or ``"logic"`` (LogicSeg's rule descent,
    :func:`logic_refine` with its defaults, then ``"path"``). Ties go to the lowest channel.
    ``backend``: as for :func:`tree_min_loss`; decoding has no compiled CPU kernel, so ``"native"``
    runs the vectorized torch op.
    """
    x = _check_logits(logits, hierarchy)
    _check_choice(method, DECODE_METHODS, "method")
    _check_choice(backend, BACKENDS, "backend")
    return _decode(x, hierarchy, method, backend)


def path_scores(logits: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """Leaf scores ``[B, K, *spatial]``, leaves in id order: entry k is the sum of the logits along
    leaf k's path (root first; a leaf shallower than the tree counts its path once).

    Their argmax over dim 1 is the ``path`` decoding (:func:`decode`) as a leaf id, so an inference
    head can return them and a framework's usual argmax, metrics and visualisation work with the
    data set's K classes. Computed in float64 for float64 logits, else float32 (as :func:`decode`);
    differentiable. Empty inputs give the empty ``[B, K, *spatial]`` map.
    """
    x = _check_logits(logits, hierarchy)
    return path_scores_op(x, hierarchy)
