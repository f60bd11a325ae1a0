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

from .. import _native
from ..core import checks as _checks
from ..core import triplets as _triplets
from ..core.checks import REDUCTIONS, check_max_per_class
from ..core.checks import check_choice as _check_choice
from ..core.checks import check_gamma as _check_gamma
from ..core.checks import check_hierarchy as _check_hierarchy
from ..core.objective import HSSNTermsBase, compose_hssn
from ..core.rules import AUTO_FUSED_MAX_NODES, DECODE_METHODS, HSSN_SCALE, hssn_weights
from ..core.rules import triplet_weight as _core_triplet_weight
from ..core.triplets import SAMPLING
from ..hierarchy import Hierarchy
from ._tables import cached_on
from .ops.cross_entropy import depth_cross_entropy_op
from .ops.decode import decode_op, path_scores_op
from .ops.device import device_plan
from .ops.native import hssn_objective_native, tree_min_native
from .ops.tree_min import expand_targets_op, tree_min_op
from .ops.triplet import key_order, resize_labels_nearest, triplet_op

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

BACKENDS = ("auto", "torch", "native", "triton")
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


LABEL_TABLE_MAX = 1 << 16  # label tables up to this many values; a larger ignore_index takes the compare path


def _build_label_table(tab, ignore_index: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    table, shift, bad, partial = tab.hierarchy.label_table(ignore_index)
    return torch.tensor(table, device=tab.device), shift, torch.tensor(bad, device=tab.device), \
        torch.tensor(partial, device=tab.device)


def _label_table(device: torch.device, hierarchy: Hierarchy, ignore_index: int
                 ) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """:meth:`Hierarchy.label_table` as tensors on ``device`` (cached)."""
    return cached_on(hierarchy, device, ("label_table", ignore_index), _build_label_table, ignore_index)


def _check_ignore_index(hierarchy: Hierarchy, ignore_index: Any) -> int:
    return _checks.check_ignore_index(hierarchy, ignore_index)


def _label_slots(lab: torch.Tensor, hierarchy: Hierarchy, ignore_index: int):
    """``(slot, table, bad, partial)``: each label's slot in :meth:`Hierarchy.label_table` and the
    table as tensors, or None where ``ignore_index`` is too far out for a table."""
    if max(hierarchy.num_nodes, abs(ignore_index) + 1) > LABEL_TABLE_MAX:
        return None
    table, shift, bad_slot, partial_slot = _label_table(lab.device, hierarchy, ignore_index)
    return (lab + shift).clamp_(0, table.numel() - 1), table, bad_slot, partial_slot


def _label_channels(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int,
                    check: bool = True) -> tuple[torch.Tensor, bool]:
    """Map node-id labels to channels (-1 = ignored) and say whether partial labels occur.

    ``check=True`` raises :class:`LabelError` for bad values, reading one value back from the
    device (whether bad values or partial labels occur, together). ``check=False`` reads nothing
    back (no sync: CUDA-graph capturable); bad values then count as ignored and partial labels are
    assumed present. A lookup table indexed by the (clamped) label value does it in a few passes.
    """
    ignore_index = _check_ignore_index(hierarchy, ignore_index)
    lab = labels.to(torch.int64)
    slots = _label_slots(lab, hierarchy, ignore_index)
    if slots is not None:
        slot, table, bad_slot, partial_slot = slots
        channels = table[slot].clamp_(min=-1)
        if not check:
            return channels, True
        if torch.compiler.is_compiling():
            _assert_labels_in_graph(bad_slot[slot].any(), hierarchy, ignore_index)
            return channels, True
        counts = torch.bincount(slot.reshape(-1), minlength=table.numel()) > 0
        any_bad, any_partial = torch.stack([(counts & bad_slot).any(), (counts & partial_slot).any()]).tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.cpu().numpy(), ignore_index)  # cold path: on the host
        return channels, bool(any_partial)
    ignored = lab == ignore_index
    bad = ~ignored & ((lab < 0) | (lab >= hierarchy.num_nodes))
    partial = ~ignored & (lab >= hierarchy.num_leaves)
    if not check:
        ignored = ignored | bad
        any_partial = True
    elif torch.compiler.is_compiling():
        _assert_labels_in_graph(bad.any(), hierarchy, ignore_index)
        any_partial = True
    else:
        any_bad, any_partial = torch.stack([bad.any(), partial.any()]).tolist()
        if any_bad:
            raise hierarchy.invalid_label_error(lab.cpu().numpy(), ignore_index)  # cold path: on the host
    safe = torch.where(ignored, torch.zeros_like(lab), lab)
    channel_of = device_plan(hierarchy, labels.device).channel_of
    return torch.where(ignored, torch.full_like(lab, -1), channel_of[safe]), bool(any_partial)


def _assert_labels_in_graph(any_bad: torch.Tensor, hierarchy: Hierarchy, ignore_index: int) -> None:
    """The label check of a compiled graph: an assertion on the device (no host read, no graph
    break), raised when the step runs; run the step eagerly to see which values."""
    message = (f"hieraloss: labels hold values that are neither node ids 0..{hierarchy.num_nodes - 1} nor "
               f"ignore_index={ignore_index} (run eagerly for the values, or pass check_labels=False to count "
               f"them as ignored)")
    torch._assert_async(~any_bad, message)


def _check_label_values(labels: torch.Tensor, hierarchy: Hierarchy, ignore_index: int) -> None:
    """Raise :class:`LabelError` if a label is neither a node id nor ``ignore_index`` (one sync;
    under ``torch.compile`` an assertion in the graph instead)."""
    lab = labels.to(torch.int64)
    slots = _label_slots(lab, hierarchy, ignore_index)
    if slots is not None:
        slot, _, bad_slot, _ = slots
        bad = bad_slot[slot].any()
    else:
        bad = ((lab != ignore_index) & ((lab < 0) | (lab >= hierarchy.num_nodes))).any()
    if torch.compiler.is_compiling():
        _assert_labels_in_graph(bad, hierarchy, ignore_index)
        return
    any_bad = bool(bad)
    if any_bad:
        raise hierarchy.invalid_label_error(lab.cpu().numpy(), ignore_index)  # cold path: on the host


def _labels_at_door(labels: Any, logits: torch.Tensor, hierarchy: Hierarchy, ignore_index: Any
                    ) -> tuple[torch.Tensor, int]:
    """The label tensor (type, device and shape checked) and ``ignore_index`` checked; values not yet."""
    labels = _label_tensor(labels, logits.device)
    _checks.check_label_shape(tuple(labels.shape), (logits.shape[0], *logits.shape[2:]))
    return labels, _check_ignore_index(hierarchy, ignore_index)


def _checked_labels(labels: Any, logits: torch.Tensor, hierarchy: Hierarchy,
                    ignore_index: int, check: bool = True) -> tuple[torch.Tensor, bool]:
    labels, ignore_index = _labels_at_door(labels, logits, hierarchy, ignore_index)
    return _label_channels(labels, hierarchy, ignore_index, check)


def _check_node_weight(node_weight: Any, hierarchy: Hierarchy, device: torch.device) -> torch.Tensor | None:
    if node_weight is None:
        return None
    w = torch.as_tensor(_from_numpy(node_weight) if isinstance(node_weight, np.ndarray) else node_weight)
    if not (w.is_floating_point() or (not w.is_complex() and w.dtype != torch.bool)):
        raise _checks.node_weight_dtype_error(_checks.dtype_name(w.dtype))
    _checks.check_node_weight_shape(tuple(w.shape), hierarchy)
    return w.detach().to(device)


def _kernels():
    try:
        from . import kernels
    except ImportError as exc:  # triton missing or the kernels failed to import
        raise RuntimeError(f"backend='triton' needs the fused Triton kernels, which failed to import: {exc}") from exc
    if not kernels.triton_available():
        raise RuntimeError("backend='triton' was asked for, but Triton is not available here")
    return kernels


def _use_triton(backend: str, x: torch.Tensor, hierarchy: Hierarchy | None = None, op: str = "objective") -> bool:
    """Whether ``x`` (logits of ``hierarchy``, or embeddings without it) goes to the fused kernels:
    asked for, or ``"auto"`` on a CUDA device where they run and take its batch and tree, for trees
    of at most ``AUTO_FUSED_MAX_NODES`` nodes (the compile time of larger ones)."""
    _check_choice(backend, BACKENDS, "backend")
    if backend == "triton":
        reason = _kernels().unsupported_reason(x.shape, hierarchy, op)
        if reason:
            raise ValueError(f"backend='triton': {reason}")
        return True
    if backend == "auto" and x.is_cuda and (hierarchy is None or hierarchy.num_nodes <= AUTO_FUSED_MAX_NODES):
        try:
            from . import kernels
        except ImportError:
            return False
        return bool(kernels.triton_available()) and kernels.unsupported_reason(x.shape, hierarchy, op) is None
    return False


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
    if _use_triton(backend, x, hierarchy):
        if check_labels:
            _check_label_values(labels, hierarchy, ignore_index)
        total, _ = _kernels().fused_objective(x, labels, hierarchy, ignore_index=ignore_index, gamma=gamma,
                                              reduction=reduction, node_weight=w)
        return total
    lc, has_partial = _label_channels(labels, hierarchy, ignore_index, check_labels)
    return _tree_min_checked(x, lc, has_partial, hierarchy, gamma, reduction, w, backend)


def _use_native(backend: str, x: torch.Tensor) -> bool:
    return _native.use_for(backend, on_cpu=x.device.type == "cpu", device=str(x.device))


def _tree_min_checked(x, lc, has_partial, hierarchy, gamma, reduction, w, backend):
    """Tree-min of label channels on the CPU paths (compiled kernel or vectorized ops)."""
    if _use_native(backend, x):
        return tree_min_native(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=w)
    return tree_min_op(x, lc, hierarchy, gamma=gamma, reduction=reduction, node_weight=w,
                            has_partial=has_partial)


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
    lc, _ = _label_channels(labels, hierarchy, ignore_index)
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
    if _use_triton(backend, x, hierarchy):
        if check_labels:
            _check_label_values(labels, hierarchy, ignore_index)
        weights = [0.0] * hierarchy.max_depth
        weights[int(depth) - 1] = 1.0
        total, _ = _kernels().fused_objective(x, labels, hierarchy, ignore_index=ignore_index, tree_min=False,
                                              ce_weights=weights)
        return total
    lc, _ = _label_channels(labels, hierarchy, ignore_index, check_labels)
    return depth_cross_entropy_op(x, lc, hierarchy, int(depth))


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
        _check_label_values(labels, hierarchy, ignore_index)
    gathered = gather_across_ranks and _is_distributed(process_group)
    if _fused_triplet(backend, embeddings, hierarchy, gathered):
        kernels = _kernels()
        codes = kernels.triplet_codes(labels, hierarchy, ignore_index=ignore_index,
                                      size=tuple(embeddings.shape[2:]))
        order = key_order(codes, sampling, generator) if sampling == "random" else None
        return kernels.fused_triplet_loss(embeddings, codes, hierarchy, max_per_class=int(max_per_class),
                                          base_margin=float(base_margin), order=order, scale=scale), True
    # Nearest resampling is a gather, so it commutes with the label mapping: map only the
    # embedding-sized labels.
    small, _ = _label_channels(resize_labels_nearest(labels, tuple(embeddings.shape[2:])), hierarchy,
                               ignore_index, check=False)
    node_ids = device_plan(hierarchy, embeddings.device).node_ids
    leaf = torch.where(small >= 0, node_ids[small.clamp(min=0)], torch.full_like(small, -1))
    leaf = torch.where(leaf < hierarchy.num_leaves, leaf, torch.full_like(leaf, -1))
    if gathered:
        from . import distributed

        return distributed.gathered_triplet_op(
            embeddings, leaf, hierarchy, max_per_class=int(max_per_class), base_margin=float(base_margin),
            sampling=sampling, generator=generator, process_group=process_group), False
    return triplet_op(embeddings, leaf, hierarchy, max_per_class=int(max_per_class),
                           base_margin=float(base_margin), sampling=sampling, generator=generator), False


def _is_distributed(process_group: Any) -> bool:
    from . import distributed

    return distributed.is_distributed(process_group)


def _fused_triplet(backend: str, embeddings: torch.Tensor, hierarchy: Hierarchy, gathered: bool) -> bool:
    """Whether the triplet loss runs on the fused kernels (see :func:`hierarchy_triplet_loss`)."""
    if backend == "triton":
        if gathered:
            raise ValueError("backend='triton' does not gather triplets across ranks; use backend='auto'")
        if not _kernels().triplet_supported(hierarchy, embeddings):
            from .kernels import triplet

            raise ValueError(f"backend='triton': {triplet.unsupported_reason(hierarchy, tuple(embeddings.shape))}")
        return True
    if backend != "auto" or gathered or torch.are_deterministic_algorithms_enabled():
        return False
    return _use_triton(backend, embeddings) and _kernels().triplet_supported(hierarchy, embeddings)


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

    label_channels = staticmethod(_label_channels)
    tree_min_op = staticmethod(tree_min_op)
    depth_cross_entropy_op = staticmethod(depth_cross_entropy_op)
    triplet_loss = staticmethod(_triplet_loss)
    scale = HSSN_SCALE

    def fused(self, tree_min_weight, ce_weights, return_parts):
        x, h = self.x, self.h
        if _use_triton(self.backend, x, h):
            if self.check_labels:
                _check_label_values(self.labels, h, self.ignore_index)
            total, values = _kernels().fused_objective(
                x, self.labels, h, ignore_index=self.ignore_index, gamma=self.gamma, reduction="hssn",
                tm_weight=tree_min_weight / HSSN_SCALE, ce_weights=ce_weights, node_weight=self.w)
            # the unweighted tree-min is a division, so a launch: only when asked for
            return total, (values[0] / HSSN_SCALE if return_parts else None), values[1:]
        if _use_native(self.backend, x):
            return hssn_objective_native(x, self.channels()[0], h, gamma=self.gamma, node_weight=self.w,
                                                    tree_min_weight=tree_min_weight, ce_weights=ce_weights)
        return None

    @staticmethod
    def scalar(value, like):
        return like.new_full((), value)

    @staticmethod
    def match(value, like):
        return value


# ---------------------------------------------------------------------------- decoding
def _logic_refine(x, hierarchy):
    from ..core.objective import LOGIC_STEP_SIZE, LOGIC_STEPS
    from .ops.logicseg import refine

    return refine(x, hierarchy, LOGIC_STEPS, LOGIC_STEP_SIZE, 5.0, "siblings")


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
    if method == "logic":  # LogicSeg's logic-guided reasoning, then the exact path decoding
        x, method = _logic_refine(x, hierarchy), "path"
    if method in ("path", "top_down") and _use_triton(backend, x, hierarchy, "decode"):
        return _kernels().fused_decode(x.detach(), hierarchy, method)
    return decode_op(x, hierarchy, method)


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
