"""Thin ``paddle.nn.Layer`` wrappers that hold the configuration and delegate to :mod:`.functional`.

The hierarchy's index tables are cached per place, so a layer follows its inputs' place;
``node_weight`` and the HSSN step counter are persistable buffers and round-trip through
``state_dict`` / ``set_state_dict``.
"""

from __future__ import annotations

import math
from typing import Any

import paddle
from paddle import nn

from ..core.modules import (
    DecoderOptions,
    FocalOptions,
    HSSNOptions,
    HXEOptions,
    SoftLabelOptions,
    TreeMinOptions,
    TripletOptions,
)
from . import functional as F
from . import leaf_losses as _leaf
from ._tables import building_program, place_of

__all__ = ["TreeMinLoss", "FocalTreeMinLoss", "HierarchyTripletLoss", "HSSNLoss", "HierarchyDecoder",
           "HierarchicalCrossEntropyLoss", "SoftLabelCrossEntropyLoss"]


class _Layer(nn.Layer):
    """The paddle side of the module forms' constructors (:mod:`hieraloss.core.modules`)."""

    BACKENDS = F.BACKENDS

    def _hold_node_weight(self, node_weight: Any) -> None:
        w = None
        if node_weight is not None:
            w = F._check_node_weight(node_weight, self.hierarchy, paddle.CPUPlace()).astype("float32")
        self.register_buffer("node_weight", w, persistable=True)

    def _hold_step(self) -> None:
        self.register_buffer("step", paddle.zeros([], dtype="int64"), persistable=True)


def _weight_on(w: paddle.Tensor | None, x: paddle.Tensor) -> paddle.Tensor | None:
    """The weight buffer on the logits' place (buffers stay where they were created)."""
    if w is None or str(place_of(w)) == str(place_of(x)):
        return w
    return w.to(place_of(x))


class TreeMinLoss(TreeMinOptions, _Layer):
    """:func:`hieraloss.paddle.tree_min_loss` as a layer: ``loss = TreeMinLoss(h)(logits, labels)``."""

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return F.tree_min_loss(logits, labels, self.hierarchy, node_weight=_weight_on(self.node_weight, logits),
                               **self._options())


class FocalTreeMinLoss(FocalOptions, TreeMinLoss):
    """:func:`hieraloss.paddle.focal_tree_min_loss` as a layer."""

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return F.focal_tree_min_loss(logits, labels, self.hierarchy, node_weight=_weight_on(self.node_weight, logits),
                                     **self._options())


class HierarchyTripletLoss(TripletOptions, _Layer):
    """:func:`hieraloss.paddle.hierarchy_triplet_loss` as a layer.

    ``forward(embeddings, labels, generator=None)``; ``generator``: a numpy Generator or an int seed.
    ``gather_across_ranks=True`` draws triplets across the ranks of ``process_group`` (a collective).
    ``backend``: as for the function (``"auto"`` on a GPU: the fused Triton triplet kernels).
    """

    def forward(self, embeddings: paddle.Tensor, labels: paddle.Tensor, generator: Any = None) -> paddle.Tensor:
        return F.hierarchy_triplet_loss(embeddings, labels, self.hierarchy, generator=generator, **self._options())


class HSSNLoss(HSSNOptions, _Layer):
    """:func:`hieraloss.paddle.hssn_loss` as a layer that keeps the training step for the triplet schedule.

    ``step`` is a persistable buffer (saved in ``state_dict``); each call in training mode, with
    gradients enabled, with embeddings and no explicit ``step`` uses the stored step and then
    advances it by one; evaluation calls (``.eval()`` or under ``paddle.no_grad()``) never do.
    ``gather_across_ranks=True`` draws triplets across the ranks of ``process_group``.
    """

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


class HierarchyDecoder(DecoderOptions, _Layer):
    """:func:`hieraloss.paddle.decode` as a layer: ``leaf, depth_labels = HierarchyDecoder(h)(logits)``."""

    def forward(self, logits: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        return F.decode(logits, self.hierarchy, self.method, backend=self.backend)


class HierarchicalCrossEntropyLoss(HXEOptions, _Layer):
    """:func:`hieraloss.paddle.hierarchical_cross_entropy` as a layer:
    ``loss = HierarchicalCrossEntropyLoss(h, alpha=0.1)(leaf_logits, labels)``."""

    def forward(self, leaf_logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return _leaf.hierarchical_cross_entropy(leaf_logits, labels, self.hierarchy, **self._options())


class SoftLabelCrossEntropyLoss(SoftLabelOptions, _Layer):
    """:func:`hieraloss.paddle.soft_label_cross_entropy` as a layer:
    ``loss = SoftLabelCrossEntropyLoss(h, beta=1.0)(leaf_logits, labels)``."""

    def forward(self, leaf_logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        return _leaf.soft_label_cross_entropy(leaf_logits, labels, self.hierarchy, **self._options())
