"""Thin ``paddle.nn.Layer`` wrappers that hold the configuration and delegate to :mod:`.functional`.

The hierarchy's index tables are cached per place, so a layer follows its inputs' place;
``node_weight`` and the HSSN step counter are persistable buffers and round-trip through
``state_dict`` / ``set_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import paddle
from paddle import nn

from ..core.checks import check_gamma
from ..core.modules import (
    HeldOptions,
    decoder_options,
    hssn_options,
    leaf_options,
    tree_min_options,
    triplet_options,
)
from ..hierarchy import Hierarchy
from . import functional as F
from . import leaf_losses as _leaf
from ._tables import building_program, place_of

__all__ = ["TreeMinLoss", "FocalTreeMinLoss", "HierarchyTripletLoss", "HSSNLoss", "HierarchyDecoder",
           "HierarchicalCrossEntropyLoss", "SoftLabelCrossEntropyLoss"]


def _weight_buffer(layer: nn.Layer, node_weight: Any, hierarchy: Hierarchy) -> None:
    w = None
    if node_weight is not None:
        w = F._check_node_weight(node_weight, hierarchy, paddle.CPUPlace()).astype("float32")
    layer.register_buffer("node_weight", w, persistable=True)


def _weight_on(w: paddle.Tensor | None, x: paddle.Tensor) -> paddle.Tensor | None:
    """The weight buffer on the logits' place (buffers stay where they were created)."""
    if w is None or str(place_of(w)) == str(place_of(x)):
        return w
    return w.to(place_of(x))


class TreeMinLoss(HeldOptions, nn.Layer):
    """:func:`hieraloss.paddle.tree_min_loss` as a layer: ``loss = TreeMinLoss(h)(logits, labels)``."""

    def __init__(self, hierarchy: Hierarchy, *, ignore_index: int = 255, reduction: str = "mean",
                 node_weight: Any = None, check_finite: bool = False, backend: str = "auto",
                 check_labels: bool = True, upsample_logits: bool = False):
        super().__init__()
        self._hold(hierarchy, tree_min_options(hierarchy, F.BACKENDS, ignore_index=ignore_index, reduction=reduction,
                                               check_finite=check_finite, backend=backend, check_labels=check_labels,
                                               upsample_logits=upsample_logits))
        _weight_buffer(self, node_weight, hierarchy)

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return F.tree_min_loss(logits, labels, self.hierarchy, node_weight=_weight_on(self.node_weight, logits),
                               **self._options())

    def extra_repr(self) -> str:
        return f"{self.hierarchy!r}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class FocalTreeMinLoss(TreeMinLoss):
    """:func:`hieraloss.paddle.focal_tree_min_loss` as a layer."""

    def __init__(self, hierarchy: Hierarchy, *, gamma: float = 2.0, **kwargs: Any):
        super().__init__(hierarchy, **kwargs)
        self._hold(hierarchy, {"gamma": check_gamma(gamma), **self._options()})

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return F.focal_tree_min_loss(logits, labels, self.hierarchy, node_weight=_weight_on(self.node_weight, logits),
                                     **self._options())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}"


class HierarchyTripletLoss(HeldOptions, nn.Layer):
    """:func:`hieraloss.paddle.hierarchy_triplet_loss` as a layer.

    ``forward(embeddings, labels, generator=None)``; ``generator``: a numpy Generator or an int seed.
    ``gather_across_ranks=True`` draws triplets across the ranks of ``process_group`` (a collective).
    ``backend``: as for the function (``"auto"`` on a GPU: the fused Triton triplet kernels).
    """

    def __init__(self, hierarchy: Hierarchy, *, max_per_class: int = 200, base_margin: float = 0.1,
                 sampling: str = "random", ignore_index: int = 255, process_group: Any = None,
                 gather_across_ranks: bool = False, check_labels: bool = True, backend: str = "auto"):
        super().__init__()
        self._hold(hierarchy, triplet_options(hierarchy, F.BACKENDS, max_per_class=max_per_class,
                                              base_margin=base_margin, sampling=sampling, ignore_index=ignore_index,
                                              process_group=process_group, gather_across_ranks=gather_across_ranks,
                                              check_labels=check_labels, backend=backend))

    def forward(self, embeddings: paddle.Tensor, labels: paddle.Tensor, generator: Any = None) -> paddle.Tensor:
        return F.hierarchy_triplet_loss(embeddings, labels, self.hierarchy, generator=generator, **self._options())


class HSSNLoss(HeldOptions, nn.Layer):
    """:func:`hieraloss.paddle.hssn_loss` as a layer that keeps the training step for the triplet schedule.

    ``step`` is a persistable buffer (saved in ``state_dict``); each call in training mode, with
    gradients enabled, with embeddings and no explicit ``step`` uses the stored step and then
    advances it by one; evaluation calls (``.eval()`` or under ``paddle.no_grad()``) never do.
    ``gather_across_ranks=True`` draws triplets across the ranks of ``process_group``.
    """

    def __init__(self, hierarchy: Hierarchy, *, total_steps: int | None = None, tree_min_weight: float = 5.0,
                 focal_gamma: float | None = None, ce_weights: float | Sequence[float] | None = None,
                 triplet_weight: float | None = None, ignore_index: int = 255, node_weight: Any = None,
                 max_per_class: int = 200, base_margin: float = 0.1, sampling: str = "random",
                 backend: str = "auto", process_group: Any = None, gather_across_ranks: bool = False,
                 check_labels: bool = True, upsample_logits: bool = False, check_finite: bool = False):
        super().__init__()
        self._hold(hierarchy, hssn_options(
            hierarchy, F.BACKENDS, total_steps=total_steps, tree_min_weight=tree_min_weight, focal_gamma=focal_gamma,
            ce_weights=ce_weights, triplet_weight=triplet_weight, ignore_index=ignore_index,
            max_per_class=max_per_class, base_margin=base_margin, sampling=sampling, backend=backend,
            process_group=process_group, gather_across_ranks=gather_across_ranks, check_labels=check_labels,
            upsample_logits=upsample_logits, check_finite=check_finite))
        _weight_buffer(self, node_weight, hierarchy)
        self.register_buffer("step", paddle.zeros([], dtype="int64"), persistable=True)

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor, embeddings: paddle.Tensor | None = None, *,
                step: int | None = None, generator: Any = None, return_parts: bool = False):
        use_step = step
        if use_step is None and embeddings is not None and self.triplet_weight is None:
            if building_program():  # no host read in a program: the schedule from the buffer, in it
                return self._scheduled_in_program(logits, labels, embeddings, generator, return_parts)
            use_step = int(self.step)
        out = F.hssn_loss(logits, labels, self.hierarchy, embeddings=embeddings, step=use_step,
                          node_weight=_weight_on(self.node_weight, logits), generator=generator,
                          return_parts=return_parts, **self._options())
        if self.training and paddle.is_grad_enabled() and step is None and embeddings is not None:
            self.step.set_value(self.step + 1)  # in place: the buffer object stays registered
        return out

    def _scheduled_in_program(self, logits, labels, embeddings, generator, return_parts):
        """The forward inside a static program with the stored step (as torch's compiled
        ``HSSNLoss``): the published schedule computed from the ``step`` buffer in the program, which
        writes the advanced buffer back."""

        def schedule(step, horizon):  # core.rules.triplet_weight
            t = step.astype("float64")
            ramp = 0.25 * (1.0 + paddle.cos(math.pi * (t - horizon) / horizon))
            return paddle.where(t >= horizon, paddle.full_like(ramp, 0.5), ramp)

        def advance():
            if self.training and paddle.is_grad_enabled():
                paddle.assign(self.step + 1, output=self.step)

        return self._hssn_with_stored_step(F, logits, labels, embeddings,
                                           node_weight=_weight_on(self.node_weight, logits), generator=generator,
                                           return_parts=return_parts, schedule=schedule,
                                           cast=lambda t, like: t.astype(like.dtype), advance=advance)


class HierarchyDecoder(HeldOptions, nn.Layer):
    """:func:`hieraloss.paddle.decode` as a layer: ``leaf, depth_labels = HierarchyDecoder(h)(logits)``."""

    def __init__(self, hierarchy: Hierarchy, method: str = "path", backend: str = "auto"):
        super().__init__()
        self._hold(hierarchy, decoder_options(hierarchy, F.BACKENDS, method=method, backend=backend))

    def forward(self, logits: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        return F.decode(logits, self.hierarchy, self.method, backend=self.backend)


class _LeafLoss(HeldOptions, nn.Layer):
    """Shared configuration of the leaf-logit losses (checked here, once)."""

    _param = ""

    def extra_repr(self) -> str:
        return (f"{self.hierarchy!r}, {self._param}={getattr(self, self._param)}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")


class HierarchicalCrossEntropyLoss(_LeafLoss):
    """:func:`hieraloss.paddle.hierarchical_cross_entropy` as a layer:
    ``loss = HierarchicalCrossEntropyLoss(h, alpha=0.1)(leaf_logits, labels)``."""

    _param = "alpha"

    def __init__(self, hierarchy: Hierarchy, *, alpha: float = 0.1, ignore_index: int = 255,
                 reduction: str = "mean", upsample_logits: bool = False, weighting: str = "depth",
                 normalize: bool = False, check_finite: bool = False):
        super().__init__()
        self._hold(hierarchy, leaf_options(hierarchy, "alpha", alpha, ignore_index=ignore_index, reduction=reduction,
                                           upsample_logits=upsample_logits, check_finite=check_finite,
                                           weighting=weighting, normalize=normalize))

    def forward(self, leaf_logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return _leaf.hierarchical_cross_entropy(leaf_logits, labels, self.hierarchy, **self._options())


class SoftLabelCrossEntropyLoss(_LeafLoss):
    """:func:`hieraloss.paddle.soft_label_cross_entropy` as a layer:
    ``loss = SoftLabelCrossEntropyLoss(h, beta=1.0)(leaf_logits, labels)``."""

    _param = "beta"

    def __init__(self, hierarchy: Hierarchy, *, beta: float = 1.0, ignore_index: int = 255,
                 reduction: str = "mean", upsample_logits: bool = False, check_finite: bool = False):
        super().__init__()
        self._hold(hierarchy, leaf_options(hierarchy, "beta", beta, ignore_index=ignore_index, reduction=reduction,
                                           upsample_logits=upsample_logits, check_finite=check_finite))

    def forward(self, leaf_logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return _leaf.soft_label_cross_entropy(leaf_logits, labels, self.hierarchy, **self._options())
