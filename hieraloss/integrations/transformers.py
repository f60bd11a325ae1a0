"""Hugging Face transformers: HSSN training with ``Trainer``, and hierarchical post-processing.

* :func:`label_maps`: ``id2label`` / ``label2id`` from the hierarchy's node names (channel order),
  for a model config with ``num_labels = hierarchy.num_nodes``;
* :class:`HierarchicalTrainer`: a ``Trainer`` whose loss is a hieraloss loss module (e.g.
  :class:`~hieraloss.torch.HSSNLoss`) on a :func:`~hieraloss.torch.make_hierarchical` model,
  driven by the trainer's optimizer step (``state.global_step``), so the triplet schedule is
  right under gradient accumulation and after ``resume_from_checkpoint``;
* :func:`leaf_predictions` (for ``preprocess_logits_for_metrics``) and :func:`compute_metrics`:
  hierarchical evaluation inside ``Trainer.evaluate``;
* :func:`post_process_semantic_segmentation`: leaf ids by path decoding. HF's own method of that
  name argmaxes over all node channels and mixes internal nodes with leaves: do not use it on a
  hierarchical head.

A stock HF model called with ``labels=`` computes HF's flat cross-entropy over the node channels,
silently: train through :class:`HierarchicalTrainer` (or call the hieraloss loss yourself).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import check_hierarchy
from ..hierarchy import Hierarchy
from ..metrics import HierarchicalSegMetrics
from ..torch import decode
from ..torch.heads import node_label_maps

__all__ = ["label_maps", "post_process_semantic_segmentation", "leaf_predictions", "compute_metrics",
           "HierarchicalTrainer"]


def label_maps(hierarchy: Hierarchy) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` over the logit channels: channel c is node ``hierarchy.node_names[c]``
    (:func:`hieraloss.torch.heads.node_label_maps`; :func:`~hieraloss.torch.make_hierarchical` sets them)."""
    return node_label_maps(hierarchy)


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits if hasattr(outputs, "logits") else outputs["logits"]


def _resize(logits: torch.Tensor, size: Any) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def post_process_semantic_segmentation(outputs: Any, hierarchy: Hierarchy,
                                       target_sizes: list[tuple[int, int]] | None = None,
                                       method: str = "path") -> list[torch.Tensor]:
    """Leaf ids ``[H, W]`` per image from a hierarchical model's outputs (a HF ``ModelOutput``, a
    :class:`~hieraloss.torch.HierarchicalOutput`, or the node logits ``[B, N, h, w]``).

    Like HF's ``post_process_semantic_segmentation``: each image's logits are upsampled to its
    ``target_sizes`` entry (bilinear, ``align_corners=False``) when given, then decoded with
    :func:`hieraloss.torch.decode` (``method="path"``: the exact MAP leaf of the tree). Leaf ids
    index ``hierarchy.leaf_names``; ``decode`` gives the node at every depth too.
    """
    logits = _logits_of(outputs)
    if target_sizes is not None and len(target_sizes) != logits.shape[0]:
        raise ValueError(f"target_sizes has {len(target_sizes)} entries for a batch of {logits.shape[0]} images")
    out = []
    for i in range(logits.shape[0]):
        x = logits[i: i + 1].detach()
        if target_sizes is not None:
            x = _resize(x, target_sizes[i])
        out.append(decode(x, hierarchy, method)[0][0])
    return out


def leaf_predictions(hierarchy: Hierarchy, method: str = "path") -> Callable[[Any, Any], torch.Tensor]:
    """A ``preprocess_logits_for_metrics`` for ``Trainer``: node logits to leaf ids at the labels'
    size, on the device, so evaluation gathers one integer map per image instead of N channels."""
    check_hierarchy(hierarchy)

    def preprocess(logits: Any, labels: Any) -> torch.Tensor:
        x = _logits_of(logits)
        if labels is not None:
            x = _resize(x, labels.shape[-2:])
        return decode(x.detach(), hierarchy, method)[0]

    return preprocess


def compute_metrics(hierarchy: Hierarchy, ignore_index: int = 255) -> Callable[..., dict[str, float]]:
    """A ``compute_metrics`` for ``Trainer``: :meth:`HierarchicalSegMetrics.scalars` of the leaf
    predictions (use :func:`leaf_predictions` as ``preprocess_logits_for_metrics``) against the
    labels. Works with ``batch_eval_metrics=True`` too (accumulates until ``compute_result``)."""
    metrics = HierarchicalSegMetrics(hierarchy, ignore_index)

    def compute(eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds = preds[0] if isinstance(preds, (tuple, list)) else preds
        if isinstance(preds, np.ndarray) and preds.ndim == labels.ndim + 1:
            raise ValueError("compute_metrics got node logits: pass preprocess_logits_for_metrics="
                             "leaf_predictions(hierarchy) to the Trainer")
        metrics.update(preds, labels)
        if compute_result is False:
            return {}
        out = metrics.scalars()
        metrics.reset()
        return out

    return compute


def _trainer_class() -> type:
    from transformers import Trainer

    return Trainer


class HierarchicalTrainer(_trainer_class()):
    """``transformers.Trainer`` with a hieraloss loss: ``HierarchicalTrainer(model=make_hierarchical(hf_model, h),
    loss=HSSNLoss(h, total_steps=..., upsample_logits=True), args=..., train_dataset=...)``.

    The dataset yields ``{"pixel_values": [3, H, W], "labels": [H, W]}``. Each step calls
    ``loss(logits, labels, embeddings, step=state.global_step)`` for a loss with a ``step``
    argument (HSSNLoss), else ``loss(logits, labels)``. The global step counts optimizer steps, is
    saved in every checkpoint and restored on resume, so the schedule follows training exactly.
    ``label_names`` defaults to ``["labels"]``; evaluation returns the node logits (pair it with
    :func:`leaf_predictions` and :func:`compute_metrics`).
    """

    def __init__(self, *args: Any, loss: nn.Module, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be a hieraloss loss module (e.g. HSSNLoss(h)), got {type(loss).__name__}")
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self.hierarchy_loss = loss.to(self.args.device)
        self._takes_step = "step" in inspect.signature(loss.forward).parameters

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        labels = inputs["labels"]
        logits, embeddings = model(inputs["pixel_values"])
        if self._takes_step:
            loss = self.hierarchy_loss(logits, labels, embeddings, step=self.state.global_step)
        else:
            loss = self.hierarchy_loss(logits, labels)
        return (loss, {"logits": logits}) if return_outputs else loss
