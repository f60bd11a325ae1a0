"""The configuration of the module forms, written once for torch's ``nn.Module`` and paddle's
``nn.Layer`` (numpy only; imports no backend).

A module checks its options when it is built (the same checks and messages as the functional),
holds them as plain attributes (``loss.reduction = "sum"`` changes the next call), and hands them
to its functional by name. The framework classes add only what differs: buffers (node weights,
the step counter) and ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..hierarchy import Hierarchy
from .checks import REDUCTIONS, check_choice, check_gamma, check_hierarchy, check_leaf_reduction, check_nonnegative
from .leaf import check_hxe_weighting
from .rules import DECODE_METHODS
from .triplets import SAMPLING

__all__ = ["HeldOptions", "TreeMinOptions", "FocalOptions", "TripletOptions", "HSSNOptions", "DecoderOptions",
           "HXEOptions", "SoftLabelOptions", "tree_min_options", "triplet_options", "hssn_options",
           "decoder_options", "leaf_options"]


class HeldOptions:
    """Mixin of the module forms: :meth:`_hold` sets the checked options as attributes, and
    :meth:`_options` reads them back as the functional's keyword arguments."""

    def _hold(self, hierarchy: Hierarchy, options: dict[str, Any]) -> None:
        self.hierarchy = hierarchy
        for name, value in options.items():
            setattr(self, name, value)
        self._option_names = tuple(options)

    def _options(self, *leave_out: str) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._option_names if name not in leave_out}

    def _hssn_with_stored_step(self, functional: Any, logits: Any, labels: Any, embeddings: Any, *,
                               node_weight: Any, generator: Any, return_parts: bool, schedule: Any,
                               cast: Any, advance: Any) -> Any:
        """``HSSNLoss``'s forward where its stored step cannot be read on the host (inside
        ``torch.compile`` or a paddle static program): the objective without embeddings, plus the
        triplet term times the published schedule computed from the ``step`` buffer on the device.
        The framework gives ``schedule(step, total_steps)`` (the weight as a float64 tensor),
        ``cast(t, like)`` (``t`` in ``like``'s dtype) and ``advance()`` (moves the buffer on, where
        the call is a training step)."""
        if self.total_steps is None:
            raise ValueError("with embeddings, give triplet_weight or both step and total_steps (for the schedule)")
        out = functional.hssn_loss(logits, labels, self.hierarchy, node_weight=node_weight, return_parts=return_parts,
                                   **self._options("total_steps", "triplet_weight", "max_per_class", "base_margin",
                                                   "sampling", "process_group", "gather_across_ranks"))
        total, parts = out if return_parts else (out, None)
        tt = functional.hierarchy_triplet_loss(
            embeddings, labels, self.hierarchy, max_per_class=self.max_per_class, base_margin=self.base_margin,
            sampling=self.sampling, generator=generator, ignore_index=self.ignore_index,
            process_group=self.process_group, gather_across_ranks=self.gather_across_ranks, check_labels=False,
            backend=self.backend)
        weight = schedule(self.step, float(self.total_steps))
        total = total + cast(weight, tt) * tt
        advance()
        if parts is None:
            return total
        parts["triplet"] = tt.detach()
        parts["triplet_weight"] = cast(weight, total).detach()
        return total, parts


def tree_min_options(hierarchy: Hierarchy, backends: Sequence[str], *, ignore_index: int, reduction: str,
                     check_finite: bool, backend: str, check_labels: bool, upsample_logits: bool) -> dict[str, Any]:
    """``TreeMinLoss`` and ``FocalTreeMinLoss`` (which adds its checked ``gamma``)."""
    check_hierarchy(hierarchy)
    check_choice(reduction, REDUCTIONS, "reduction")
    check_choice(backend, backends, "backend")
    hierarchy.check_ignore_index(ignore_index)
    return dict(ignore_index=ignore_index, reduction=reduction, check_finite=bool(check_finite), backend=backend,
                check_labels=bool(check_labels), upsample_logits=bool(upsample_logits))


def triplet_options(hierarchy: Hierarchy, backends: Sequence[str], *, max_per_class: int, base_margin: float,
                    sampling: str, ignore_index: int, process_group: Any, gather_across_ranks: bool,
                    check_labels: bool, backend: str) -> dict[str, Any]:
    """``HierarchyTripletLoss``."""
    check_hierarchy(hierarchy)
    check_choice(sampling, SAMPLING, "sampling")
    check_choice(backend, backends, "backend")
    return dict(max_per_class=max_per_class, base_margin=base_margin, sampling=sampling, ignore_index=ignore_index,
                process_group=process_group, gather_across_ranks=gather_across_ranks, check_labels=check_labels,
                backend=backend)


def hssn_options(hierarchy: Hierarchy, backends: Sequence[str], *, total_steps: int | None, tree_min_weight: float,
                 focal_gamma: float | None, ce_weights: float | Sequence[float] | None,
                 triplet_weight: float | None, ignore_index: int, max_per_class: int, base_margin: float,
                 sampling: str, backend: str, process_group: Any, gather_across_ranks: bool, check_labels: bool,
                 upsample_logits: bool, check_finite: bool) -> dict[str, Any]:
    """``HSSNLoss`` (the schedule's ``total_steps`` is kept apart from the step buffer)."""
    check_hierarchy(hierarchy)
    check_choice(backend, backends, "backend")
    if triplet_weight is None and total_steps is not None and not total_steps > 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    return dict(total_steps=total_steps, tree_min_weight=tree_min_weight, focal_gamma=focal_gamma,
                ce_weights=ce_weights, triplet_weight=triplet_weight, ignore_index=ignore_index,
                max_per_class=max_per_class, base_margin=base_margin, sampling=sampling, backend=backend,
                process_group=process_group, gather_across_ranks=gather_across_ranks,
                check_labels=bool(check_labels), upsample_logits=bool(upsample_logits),
                check_finite=bool(check_finite))


def decoder_options(hierarchy: Hierarchy, backends: Sequence[str], *, method: str, backend: str) -> dict[str, Any]:
    """``HierarchyDecoder``."""
    check_hierarchy(hierarchy)
    check_choice(method, DECODE_METHODS, "method")
    check_choice(backend, backends, "backend")
    return dict(method=method, backend=backend)


def leaf_options(hierarchy: Hierarchy, param: str, value: float, *, ignore_index: int, reduction: str,
                 upsample_logits: bool, check_finite: bool, weighting: str | None = None,
                 normalize: bool | None = None) -> dict[str, Any]:
    """``HierarchicalCrossEntropyLoss`` (``param="alpha"``, with ``weighting`` and ``normalize``) and
    ``SoftLabelCrossEntropyLoss`` (``param="beta"``)."""
    check_hierarchy(hierarchy)
    out = {param: check_nonnegative(value, param)}
    check_leaf_reduction(reduction)
    hierarchy.check_ignore_index(ignore_index)
    out.update(ignore_index=ignore_index, reduction=reduction, upsample_logits=bool(upsample_logits),
               check_finite=bool(check_finite))
    if weighting is not None:
        check_hxe_weighting(weighting, normalize)
        out.update(weighting=weighting, normalize=bool(normalize))
    return out


# ---------------------------------------------------------------------------- the module forms' constructors
# Written once: each framework class derives from one of these and from its framework base, which
# gives ``BACKENDS``, ``_hold_node_weight(node_weight)`` (a buffer) and ``_hold_step()`` (the step
# buffer), and adds ``forward``. The signatures, defaults and checks are therefore the same in torch
# and paddle by construction.
class TreeMinOptions(HeldOptions):
    def __init__(self, hierarchy: Hierarchy, *, ignore_index: int = 255, reduction: str = "mean",
                 node_weight: Any = None, check_finite: bool = False, backend: str = "auto",
                 check_labels: bool = True, upsample_logits: bool = False):
        super().__init__()
        self._hold(hierarchy, tree_min_options(hierarchy, self.BACKENDS, ignore_index=ignore_index,
                                               reduction=reduction, check_finite=check_finite, backend=backend,
                                               check_labels=check_labels, upsample_logits=upsample_logits))
        self._hold_node_weight(node_weight)

    def extra_repr(self) -> str:
        return f"{self.hierarchy!r}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class FocalOptions(HeldOptions):
    """Adds the checked focal ``gamma`` to a tree-min module's options."""

    def __init__(self, hierarchy: Hierarchy, *, gamma: float = 2.0, **kwargs: Any):
        super().__init__(hierarchy, **kwargs)
        self._hold(hierarchy, {"gamma": check_gamma(gamma), **self._options()})

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}"


class TripletOptions(HeldOptions):
    def __init__(self, hierarchy: Hierarchy, *, max_per_class: int = 200, base_margin: float = 0.1,
                 sampling: str = "random", ignore_index: int = 255, process_group: Any = None,
                 gather_across_ranks: bool = False, check_labels: bool = True, backend: str = "auto"):
        super().__init__()
        self._hold(hierarchy, triplet_options(hierarchy, self.BACKENDS, max_per_class=max_per_class,
                                              base_margin=base_margin, sampling=sampling, ignore_index=ignore_index,
                                              process_group=process_group, gather_across_ranks=gather_across_ranks,
                                              check_labels=check_labels, backend=backend))


class HSSNOptions(HeldOptions):
    def __init__(self, hierarchy: Hierarchy, *, total_steps: int | None = None, tree_min_weight: float = 5.0,
                 focal_gamma: float | None = None, ce_weights: float | Sequence[float] | None = None,
                 triplet_weight: float | None = None, ignore_index: int = 255, node_weight: Any = None,
                 max_per_class: int = 200, base_margin: float = 0.1, sampling: str = "random",
                 backend: str = "auto", process_group: Any = None, gather_across_ranks: bool = False,
                 check_labels: bool = True, upsample_logits: bool = False, check_finite: bool = False):
        super().__init__()
        self._hold(hierarchy, hssn_options(
            hierarchy, self.BACKENDS, total_steps=total_steps, tree_min_weight=tree_min_weight,
            focal_gamma=focal_gamma, ce_weights=ce_weights, triplet_weight=triplet_weight, ignore_index=ignore_index,
            max_per_class=max_per_class, base_margin=base_margin, sampling=sampling, backend=backend,
            process_group=process_group, gather_across_ranks=gather_across_ranks, check_labels=check_labels,
            upsample_logits=upsample_logits, check_finite=check_finite))
        self._hold_node_weight(node_weight)
        self._hold_step()


class DecoderOptions(HeldOptions):
    def __init__(self, hierarchy: Hierarchy, method: str = "path", backend: str = "auto"):
        super().__init__()
        self._hold(hierarchy, decoder_options(hierarchy, self.BACKENDS, method=method, backend=backend))


class _LeafOptions(HeldOptions):
    _param = ""

    def extra_repr(self) -> str:
        return (f"{self.hierarchy!r}, {self._param}={getattr(self, self._param)}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")


class HXEOptions(_LeafOptions):
    _param = "alpha"

    def __init__(self, hierarchy: Hierarchy, *, alpha: float = 0.1, ignore_index: int = 255,
                 reduction: str = "mean", upsample_logits: bool = False, weighting: str = "depth",
                 normalize: bool = False, check_finite: bool = False):
        super().__init__()
        self._hold(hierarchy, leaf_options(hierarchy, "alpha", alpha, ignore_index=ignore_index, reduction=reduction,
                                           upsample_logits=upsample_logits, check_finite=check_finite,
                                           weighting=weighting, normalize=normalize))


class SoftLabelOptions(_LeafOptions):
    _param = "beta"

    def __init__(self, hierarchy: Hierarchy, *, beta: float = 1.0, ignore_index: int = 255,
                 reduction: str = "mean", upsample_logits: bool = False, check_finite: bool = False):
        super().__init__()
        self._hold(hierarchy, leaf_options(hierarchy, "beta", beta, ignore_index=ignore_index, reduction=reduction,
                                           upsample_logits=upsample_logits, check_finite=check_finite))
