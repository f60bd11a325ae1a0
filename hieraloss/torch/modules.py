"""Thin ``nn.Module`` wrappers that hold the configuration and delegate to :mod:`.functional`.

The hierarchy's index tables are cached per device (``hieraloss.torch._tables``), so a module
follows its inputs' device; ``node_weight`` and the HSSN step counter are buffers and move with
``.to()`` and round-trip through ``state_dict``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

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

__all__ = ["TreeMinLoss", "FocalTreeMinLoss", "HierarchyTripletLoss", "HSSNLoss", "HierarchyDecoder",
           "HierarchicalCrossEntropyLoss", "SoftLabelCrossEntropyLoss"]


class _Module(nn.Module):
    """The torch side of the module forms' constructors (:mod:`hieraloss.core.modules`)."""

    BACKENDS = F.BACKENDS

    def _hold_node_weight(self, node_weight: Any) -> None:
        w = None
        if node_weight is not None:
            w = F._check_node_weight(node_weight, self.hierarchy, torch.device("cpu")).to(torch.float32)
        self.register_buffer("node_weight", w)

    def _hold_step(self) -> None:
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))


class TreeMinLoss(TreeMinOptions, _Module):
    """:func:`hieraloss.torch.tree_min_loss` as a module: ``loss = TreeMinLoss(h)(logits, labels)``."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.tree_min_loss(logits, labels, self.hierarchy, node_weight=self.node_weight, **self._options())


class FocalTreeMinLoss(FocalOptions, TreeMinLoss):
    """:func:`hieraloss.torch.focal_tree_min_loss` as a module."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.focal_tree_min_loss(logits, labels, self.hierarchy, node_weight=self.node_weight, **self._options())


class HierarchyTripletLoss(TripletOptions, _Module):
    """:func:`hieraloss.torch.hierarchy_triplet_loss` as a module; ``forward(embeddings, labels, generator=None)``
    (``generator``: an int seed or a numpy Generator, the triplets of every backend; or a ``torch.Generator``).

    ``gather_across_ranks=True`` draws triplets across the ranks of ``process_group`` (a collective).
    """

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: Any = None) -> torch.Tensor:
        return F.hierarchy_triplet_loss(embeddings, labels, self.hierarchy, generator=generator, **self._options())


class HSSNLoss(HSSNOptions, _Module):
    """:func:`hieraloss.torch.hssn_loss` as a module that keeps the training step for the triplet schedule.

    ``step`` is a buffer (saved in ``state_dict``); each call in training mode, with gradients
    enabled, with embeddings and no explicit ``step`` uses the stored step and then advances it by
    one. Evaluation calls (``.eval()``, or under ``torch.no_grad()`` / ``torch.inference_mode()``)
    never advance it. Under gradient accumulation, or to follow a trainer's checkpoints, pass the
    trainer's optimizer step instead: ``step=trainer.global_step`` (Lightning), ``step=self.state.global_step``
    (Hugging Face ``Trainer``); an explicit ``step`` leaves the buffer alone.

    Under DistributedDataParallel the triplet term is an exact zero still connected to the
    embeddings on a rank without triplets, so ``find_unused_parameters=False`` works;
    ``gather_across_ranks=True`` draws triplets across the ranks of ``process_group``.
    """

    def _counts_step(self, step: int | None, embeddings: torch.Tensor | None) -> bool:
        """Whether this call is a training step that the stored step drives (and then advances)."""
        return self.training and torch.is_grad_enabled() and step is None and embeddings is not None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor | None = None, *,
                step: int | None = None, generator: Any = None,
                return_parts: bool = False):
        use_step = step
        if use_step is None and embeddings is not None and self.triplet_weight is None:
            if torch.compiler.is_compiling():
                return self._scheduled_in_graph(logits, labels, embeddings, generator, return_parts)
            use_step = int(self.step)  # an evaluation call reads the schedule where training left it
        out = F.hssn_loss(logits, labels, self.hierarchy, embeddings=embeddings, step=use_step,
                          node_weight=self.node_weight, generator=generator, return_parts=return_parts,
                          **self._options())
        if self._counts_step(step, embeddings):
            self.step += 1
        return out

    def _scheduled_in_graph(self, logits, labels, embeddings, generator, return_parts):
        """The forward under ``torch.compile`` with the stored step: the published schedule computed
        from the ``step`` buffer on the device (no host read, so no graph break) and the buffer
        advanced in the graph; the same value as eager up to rounding."""

        def schedule(step, horizon):  # core.rules.triplet_weight
            t = step.to(torch.float64)
            ramp = 0.25 * (1.0 + torch.cos(math.pi * (t - horizon) / horizon))
            return torch.where(t >= horizon, torch.full_like(ramp, 0.5), ramp)

        def advance():
            if self.training and torch.is_grad_enabled():
                # A new tensor, not an in-place add: compiled backwards rebuild the weight from the
                # buffer they saved, and would read it advanced (tested in test_torch_compile.py).
                self.step = self.step + 1

        return self._hssn_with_stored_step(F, logits, labels, embeddings, node_weight=self.node_weight,
                                           generator=generator, return_parts=return_parts, schedule=schedule,
                                           cast=lambda t, like: t.to(like.dtype), advance=advance)


class HierarchyDecoder(DecoderOptions, _Module):
    """:func:`hieraloss.torch.decode` as a module: ``leaf, depth_labels = HierarchyDecoder(h)(logits)``."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.decode(logits, self.hierarchy, self.method, backend=self.backend)


class HierarchicalCrossEntropyLoss(HXEOptions, _Module):
    """:func:`hieraloss.torch.hierarchical_cross_entropy` as a module:
    ``loss = HierarchicalCrossEntropyLoss(h, alpha=0.1)(leaf_logits, labels)``."""

    def forward(self, leaf_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _leaf.hierarchical_cross_entropy(leaf_logits, labels, self.hierarchy, **self._options())


class SoftLabelCrossEntropyLoss(SoftLabelOptions, _Module):
    """:func:`hieraloss.torch.soft_label_cross_entropy` as a module:
    ``loss = SoftLabelCrossEntropyLoss(h, beta=1.0)(leaf_logits, labels)``."""

    def forward(self, leaf_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _leaf.soft_label_cross_entropy(leaf_logits, labels, self.hierarchy, **self._options())
