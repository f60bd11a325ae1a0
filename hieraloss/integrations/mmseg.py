"""mmsegmentation (1.x) integration: the hieraloss losses as mmseg loss modules.

Importing this module registers, when mmsegmentation is importable, six losses in
``mmseg.registry.MODELS`` and the per-depth metric :class:`HieraSegMetric` in
``mmseg.registry.METRICS`` (see :func:`register`):

* ``HieraTreeMinLoss``: :func:`hieraloss.torch.tree_min_loss`,
* ``HieraFocalTreeMinLoss``: :func:`hieraloss.torch.focal_tree_min_loss`,
* ``HieraHSSNLoss``: :func:`hieraloss.torch.hssn_loss` (tree-min + per-depth cross-entropy, plus the
  scheduled triplet term when the head passes ``embeddings``),
* ``HieraLogicSegLoss``: :func:`hieraloss.torch.logicseg_loss` (LogicSeg: asymmetric BCE plus the
  three logic rules),
* ``HieraHierarchicalCELoss``: :func:`hieraloss.torch.hierarchical_cross_entropy` and
  ``HieraSoftLabelCELoss``: :func:`hieraloss.torch.soft_label_cross_entropy`, the objectives of
  Bertinetto et al. (CVPR 2020) on a flat head's leaf logits (``num_classes`` = number of leaves).

They follow mmseg's loss convention: ``forward(cls_score, label, weight=None, ignore_index=255,
**kwargs)``, a ``loss_weight`` factor and a ``loss_name`` starting with ``loss_``. The hierarchy is
given in the config as a preset name, a path to a hierarchy JSON file (``Hierarchy.to_json``) or a
nested dict (``Hierarchy.from_dict``). In a config file::

    custom_imports = dict(imports=["hieraloss.integrations.mmseg"], allow_failed_imports=False)
    model = dict(decode_head=dict(
        num_classes=26,  # hierarchy.num_nodes: one logit per node
        loss_decode=dict(type="HieraHSSNLoss", hierarchy="cityscapes")))

The classes are plain ``torch.nn.Module`` subclasses; they work without mmseg too.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import presets
from ..core.checks import check_leaf_reduction, check_nonnegative
from ..core.leaf import check_hxe_weighting
from ..hierarchy import Hierarchy
from ..metrics import HierarchicalSegMetrics
from ..torch import functional as F
from ..torch import leaf_losses as _leaf
from ..torch.logic import LogicSegLoss

__all__ = [
    "HieraTreeMinLoss",
    "HieraFocalTreeMinLoss",
    "HieraHSSNLoss",
    "HieraLogicSegLoss",
    "HieraHierarchicalCELoss",
    "HieraSoftLabelCELoss",
    "load_hierarchy",
    "path_scores",
    "register",
    "HieraSegMetric",
    "LOSS_NAMES",
]


load_hierarchy = presets.load  # kept under this name: configs and docs refer to it


def path_scores(logits: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """Leaf scores ``[B, K, *spatial]``: the sum of the logits along each leaf's path
    (:func:`hieraloss.torch.path_scores`; float32, or float64 for float64 logits).

    Their argmax over dim 1 is the ``path`` decoding (:func:`hieraloss.torch.decode`) as a leaf id,
    so a decode head can return them from ``predict_by_feat`` and mmseg's usual argmax, metrics
    and visualisation work with the data set's ``K`` classes.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[1] != hierarchy.num_nodes:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [B, {hierarchy.num_nodes}, *spatial], got {shape}")
    return F.path_scores(logits, hierarchy)


class _HieraLoss(nn.Module):
    """Shared plumbing: hierarchy from the config, ``loss_weight``, ``loss_name``, mmseg call signature."""

    _default_name = "loss_hiera"

    def __init__(self, hierarchy: Any = "cityscapes", *, loss_weight: float = 1.0,
                 loss_name: str | None = None, node_weight: Any = None, backend: str = "auto"):
        super().__init__()
        self.hierarchy = load_hierarchy(hierarchy)
        name = self._default_name if loss_name is None else str(loss_name)
        if not name.startswith("loss_"):
            # mmseg only adds entries whose key starts with "loss" to the total.
            raise ValueError(f"loss_name must start with 'loss_' (mmseg sums only those), got {name!r}")
        self._loss_name = name
        self.loss_weight = float(loss_weight)
        self.backend = backend
        if node_weight is None:
            self.node_weight = None
        else:
            # a float32 copy of a config list, an array (a read-only one too, which torch warns about) or a tensor
            self.register_buffer("node_weight", node_weight.detach().to(torch.float32, copy=True)
                                 if isinstance(node_weight, torch.Tensor)
                                 else torch.from_numpy(np.array(node_weight, dtype=np.float32)))

    @property
    def loss_name(self) -> str:
        """Key of this loss in mmseg's loss dict."""
        return self._loss_name

    @staticmethod
    def _check_extra(kwargs: dict[str, Any]) -> None:
        # mmseg's own losses accept avg_factor; None (what the decode heads pass) is harmless.
        if kwargs.pop("avg_factor", None) is not None:
            raise ValueError("avg_factor is not supported by the hieraloss losses; leave it None")
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")

    def extra_repr(self) -> str:
        return f"hierarchy={self.hierarchy!r}, loss_weight={self.loss_weight}, loss_name={self.loss_name!r}"


class _TreeMinBase(_HieraLoss):
    def __init__(self, hierarchy: Any = "cityscapes", *, reduction: str = "mean", loss_weight: float = 1.0,
                 loss_name: str | None = None, node_weight: Any = None, backend: str = "auto"):
        super().__init__(hierarchy, loss_weight=loss_weight, loss_name=loss_name, node_weight=node_weight,
                         backend=backend)
        if reduction not in ("mean", "sum", "hssn"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'hssn', got {reduction!r}")
        self.reduction = reduction

    def _loss_map(self, cls_score: torch.Tensor, label: torch.Tensor, ignore_index: int,
                  reduction: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                ignore_index: int = 255, reduction_override: str | None = None,
                **kwargs: Any) -> torch.Tensor:
        """``loss_weight`` times the loss of ``cls_score [B, N, H, W]`` against ``label [B, H, W]``.

        ``weight`` (optional, ``[B, H, W]``, e.g. from an mmseg pixel sampler) multiplies each pixel's
        per-node losses; like ``node_weight`` it does not change the counts the reduction divides by.
        """
        self._check_extra(kwargs)
        reduction = self.reduction if reduction_override is None else reduction_override
        if reduction not in ("mean", "sum", "hssn", "none"):
            raise ValueError(f"reduction_override must be 'mean', 'sum', 'hssn' or 'none', got {reduction!r}")
        if weight is None:
            return self.loss_weight * self._loss_map(cls_score, label, ignore_index, reduction)
        expected = (cls_score.shape[0], *cls_score.shape[2:])
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must be [B, *spatial] = {expected}, got {tuple(weight.shape)}")
        per_node = self._loss_map(cls_score, label, ignore_index, "none")
        weighted = per_node * weight.unsqueeze(1).to(per_node.dtype)
        if reduction == "none":
            return self.loss_weight * weighted
        if reduction == "sum":
            return self.loss_weight * weighted.sum()
        _, mask = F.expand_targets(label, self.hierarchy, ignore_index)
        mask = mask.to(per_node.dtype)
        if reduction == "mean":
            return self.loss_weight * weighted.sum() / mask.sum().clamp(min=1)
        # "hssn": per-depth sums over their unmasked counts, summed over depths, times 5.
        depth = torch.tensor(self.hierarchy.depth, device=per_node.device)  # [N], channel order
        total = weighted.new_zeros(())
        node_sums = weighted.transpose(0, 1).reshape(self.hierarchy.num_nodes, -1).sum(1)
        node_counts = mask.transpose(0, 1).reshape(self.hierarchy.num_nodes, -1).sum(1)
        for d in range(1, self.hierarchy.max_depth + 1):
            at_d = depth == d
            total = total + node_sums[at_d].sum() / node_counts[at_d].sum().clamp(min=1)
        return self.loss_weight * 5.0 * total


class HieraTreeMinLoss(_TreeMinBase):
    """Tree-min loss (:func:`hieraloss.torch.tree_min_loss`) as an mmseg loss.

    Config keys: ``hierarchy`` (preset name, JSON path or dict), ``reduction`` (``"mean"``,
    ``"sum"`` or ``"hssn"``, the published normalisation including its factor 5), ``loss_weight``,
    ``loss_name`` (default ``"loss_tree_min"``), ``node_weight`` (one weight per channel),
    ``backend``.
    """

    _default_name = "loss_tree_min"

    def _loss_map(self, cls_score, label, ignore_index, reduction):
        return F.tree_min_loss(cls_score, label, self.hierarchy, ignore_index=ignore_index,
                               reduction=reduction, node_weight=self.node_weight, backend=self.backend)


class HieraFocalTreeMinLoss(_TreeMinBase):
    """Focal tree-min loss (:func:`hieraloss.torch.focal_tree_min_loss`) as an mmseg loss.

    Config keys as :class:`HieraTreeMinLoss`, plus ``gamma`` (default 2.0); ``loss_name`` defaults to
    ``"loss_focal_tree_min"``.
    """

    _default_name = "loss_focal_tree_min"

    def __init__(self, hierarchy: Any = "cityscapes", *, gamma: float = 2.0, **kwargs: Any):
        super().__init__(hierarchy, **kwargs)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < float("inf"):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)

    def _loss_map(self, cls_score, label, ignore_index, reduction):
        return F.focal_tree_min_loss(cls_score, label, self.hierarchy, gamma=self.gamma,
                                     ignore_index=ignore_index, reduction=reduction,
                                     node_weight=self.node_weight, backend=self.backend)


class HieraHSSNLoss(_HieraLoss):
    """The published HSSN objective (:func:`hieraloss.torch.hssn_loss`) as an mmseg loss.

    ``tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d (+ w(t) * triplet)``. mmseg decode heads
    pass only the logits, so the triplet term is added only when a custom head calls the loss with
    ``embeddings=`` (``[B, C, h, w]``). Its weight is ``triplet_weight``, or, if that is None, the
    published schedule over ``total_steps`` (e.g. the config's ``max_iters``) at the step passed as
    ``step=`` or else this module's own counter (a buffer, saved in the state dict), which advances
    by one after each training-mode call with gradients enabled, with embeddings and no explicit step, as
    :class:`hieraloss.torch.HSSNLoss` does.

    Config keys: ``hierarchy``, ``tree_min_weight`` (5.0), ``focal_gamma`` (None = plain tree-min),
    ``ce_weights`` (one per depth or one number; default 1.0 each), ``total_steps``,
    ``triplet_weight``, ``max_per_class``, ``base_margin``, ``sampling``, ``node_weight``,
    ``loss_weight``, ``loss_name`` (default ``"loss_hssn"``), ``backend``, ``gather_across_ranks``
    (False; True draws triplets across the ranks of the default process group, a collective).
    """

    _default_name = "loss_hssn"

    def __init__(self, hierarchy: Any = "cityscapes", *, tree_min_weight: float = 5.0,
                 focal_gamma: float | None = None, ce_weights: Any = None, total_steps: int | None = None,
                 triplet_weight: float | None = None, max_per_class: int = 200, base_margin: float = 0.1,
                 sampling: str = "random", loss_weight: float = 1.0, loss_name: str | None = None,
                 node_weight: Any = None, backend: str = "auto", gather_across_ranks: bool = False):
        super().__init__(hierarchy, loss_weight=loss_weight, loss_name=loss_name, node_weight=node_weight,
                         backend=backend)
        if total_steps is not None and not total_steps > 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.options = dict(tree_min_weight=float(tree_min_weight), focal_gamma=focal_gamma,
                            ce_weights=ce_weights, triplet_weight=triplet_weight,
                            max_per_class=int(max_per_class), base_margin=float(base_margin),
                            sampling=sampling, gather_across_ranks=bool(gather_across_ranks))
        self.total_steps = total_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                ignore_index: int = 255, embeddings: torch.Tensor | None = None, step: int | None = None,
                generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """``loss_weight`` times :func:`hieraloss.torch.hssn_loss` of ``cls_score`` against ``label``."""
        self._check_extra(kwargs)
        if weight is not None:
            raise ValueError("HieraHSSNLoss does not take pixel weights (its cross-entropy terms have their "
                             "own normalisation); remove the pixel sampler or use HieraTreeMinLoss")
        current = int(self.step) if step is None else step
        if embeddings is not None and self.options["triplet_weight"] is None and self.total_steps is None:
            raise ValueError("HieraHSSNLoss got embeddings but has neither total_steps (for the published "
                             "schedule) nor triplet_weight in its config")
        loss = F.hssn_loss(cls_score, label, self.hierarchy, embeddings=embeddings, step=current,
                           total_steps=self.total_steps, ignore_index=ignore_index,
                           node_weight=self.node_weight, generator=generator, backend=self.backend,
                           **self.options)
        if self.training and torch.is_grad_enabled() and step is None and embeddings is not None:
            self.step += 1
        return self.loss_weight * loss


class HieraLogicSegLoss(_HieraLoss):
    """LogicSeg's objective (:func:`hieraloss.torch.logicseg_loss`) as an mmseg loss.

    ``asymmetric BCE + rule_weight * factor(step) * (C + D + E)``. mmseg's decode heads resize the
    logits to the labels before calling a loss, so the rules see those logits unless a custom head
    passes its pre-upsampling logits as ``rule_logits=`` (what the release does). The ramp reads the
    step passed as ``step=`` or this module's own counter (a buffer, saved in the state dict), which
    advances after each training-mode call with gradients enabled and no explicit step.

    Config keys: ``hierarchy``, ``rule_weight`` (0.2), ``ramp`` ((20000, 50000); None = rules at
    full weight), ``p`` (5.0), ``exclusion`` (``"siblings"`` or ``"level"``), ``easy_filter``
    (False), ``loss_weight``, ``loss_name`` (default ``"loss_logicseg"``).
    """

    _default_name = "loss_logicseg"

    def __init__(self, hierarchy: Any = "cityscapes", *, rule_weight: float = 0.2, ramp: Any = (20000, 50000),
                 p: float = 5.0, exclusion: str = "siblings", easy_filter: bool = False, loss_weight: float = 1.0,
                 loss_name: str | None = None):
        super().__init__(hierarchy, loss_weight=loss_weight, loss_name=loss_name)
        self.loss = LogicSegLoss(self.hierarchy, rule_weight=rule_weight, ramp=None if ramp is None else tuple(ramp),
                                 p=p, exclusion=exclusion, easy_filter=easy_filter)

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                ignore_index: int = 255, rule_logits: torch.Tensor | None = None, step: int | None = None,
                **kwargs: Any) -> torch.Tensor:
        """``loss_weight`` times :func:`hieraloss.torch.logicseg_loss` of ``cls_score`` against ``label``."""
        self._check_extra(kwargs)
        if weight is not None:
            raise ValueError("HieraLogicSegLoss does not take pixel weights (its rules use no labels); remove the "
                             "pixel sampler or use HieraTreeMinLoss")
        self.loss.ignore_index = ignore_index
        self.loss.train(self.training)
        return self.loss_weight * self.loss(cls_score, label, rule_logits, step=step)


class _LeafCELoss(_HieraLoss):
    """Shared plumbing of the leaf-logit losses: ``cls_score [B, K, H, W]`` (a flat head, K leaves in
    leaf-id order), node-id labels, optional pixel weights, ``reduction`` / ``reduction_override``."""

    _param = ""

    def __init__(self, hierarchy: Any, value: float, *, reduction: str = "mean", loss_weight: float = 1.0,
                 loss_name: str | None = None):
        super().__init__(hierarchy, loss_weight=loss_weight, loss_name=loss_name)
        setattr(self, self._param, check_nonnegative(value, self._param))
        check_leaf_reduction(reduction)
        self.reduction = reduction

    def _loss(self, cls_score: torch.Tensor, label: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None,
                ignore_index: int = 255, reduction_override: str | None = None, **kwargs: Any) -> torch.Tensor:
        """``loss_weight`` times the loss of ``cls_score [B, K, H, W]`` against ``label [B, H, W]``.

        ``weight`` (optional, ``[B, H, W]``) multiplies each pixel's loss; ``"mean"`` still divides
        by the number of counted (not ignored) pixels.
        """
        self._check_extra(kwargs)
        reduction = self.reduction if reduction_override is None else reduction_override
        check_leaf_reduction(reduction)
        if weight is None:
            return self.loss_weight * self._loss(cls_score, label, ignore_index, reduction)
        expected = (cls_score.shape[0], *cls_score.shape[2:])
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must be [B, *spatial] = {expected}, got {tuple(weight.shape)}")
        per_pixel = self._loss(cls_score, label, ignore_index, "none")
        weighted = per_pixel * weight.to(per_pixel.dtype)
        if reduction == "none":
            return self.loss_weight * weighted
        if reduction == "sum":
            return self.loss_weight * weighted.sum()
        counted = (label != ignore_index).sum().clamp(min=1).to(weighted.dtype)
        return self.loss_weight * weighted.sum() / counted

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self._param}={getattr(self, self._param)}, reduction={self.reduction!r}"


class HieraHierarchicalCELoss(_LeafCELoss):
    """Hierarchical cross-entropy (:func:`hieraloss.torch.hierarchical_cross_entropy`) as an mmseg loss.

    For a flat decode head (``num_classes`` = number of leaves). Config keys: ``hierarchy``,
    ``alpha`` (0.1; 0 is the flat cross-entropy), ``weighting`` (``"depth"``, the published
    weighting, or ``"height"``), ``normalize`` (False), ``reduction`` (``"mean"``, ``"sum"``,
    ``"none"``), ``loss_weight``, ``loss_name`` (default ``"loss_hxe"``).
    """

    _default_name = "loss_hxe"
    _param = "alpha"

    def __init__(self, hierarchy: Any = "cityscapes", *, alpha: float = 0.1, weighting: str = "depth",
                 normalize: bool = False, **kwargs: Any):
        super().__init__(hierarchy, alpha, **kwargs)
        check_hxe_weighting(weighting, normalize)
        self.weighting, self.normalize = weighting, bool(normalize)

    def _loss(self, cls_score, label, ignore_index, reduction):
        return _leaf.hierarchical_cross_entropy(cls_score, label, self.hierarchy, alpha=self.alpha,
                                                ignore_index=ignore_index, reduction=reduction,
                                                weighting=self.weighting, normalize=self.normalize)


class HieraSoftLabelCELoss(_LeafCELoss):
    """Soft-label cross-entropy (:func:`hieraloss.torch.soft_label_cross_entropy`) as an mmseg loss.

    For a flat decode head (``num_classes`` = number of leaves). Config keys: ``hierarchy``,
    ``beta`` (1.0; large values tend to the flat cross-entropy), ``reduction``, ``loss_weight``,
    ``loss_name`` (default ``"loss_soft_label_ce"``).
    """

    _default_name = "loss_soft_label_ce"
    _param = "beta"

    def __init__(self, hierarchy: Any = "cityscapes", *, beta: float = 1.0, **kwargs: Any):
        super().__init__(hierarchy, beta, **kwargs)

    def _loss(self, cls_score, label, ignore_index, reduction):
        return _leaf.soft_label_cross_entropy(cls_score, label, self.hierarchy, beta=self.beta,
                                              ignore_index=ignore_index, reduction=reduction)


_LOSSES: dict[str, type[nn.Module]] = {
    "HieraTreeMinLoss": HieraTreeMinLoss,
    "HieraFocalTreeMinLoss": HieraFocalTreeMinLoss,
    "HieraHSSNLoss": HieraHSSNLoss,
    "HieraLogicSegLoss": HieraLogicSegLoss,
    "HieraHierarchicalCELoss": HieraHierarchicalCELoss,
    "HieraSoftLabelCELoss": HieraSoftLabelCELoss,
}
LOSS_NAMES = tuple(_LOSSES)
# mmsegmentation 1.2.2 (its last release) asserts mmcv < 2.2.0 on import.
MMCV_FIX = ("mmsegmentation 1.2.x needs mmcv < 2.2: pip install 'mmcv-lite>=2.1,<2.2' "
            "(or pip install 'hieraloss[mmseg]')")


def _metric_class() -> type | None:
    """:class:`HieraSegMetric`, an mmengine ``BaseMetric`` (None without mmengine)."""
    if importlib.util.find_spec("mmengine") is None:
        return None
    from mmengine.evaluator import BaseMetric

    class HieraSegMetric(BaseMetric):
        """Per-depth hierarchical metrics in mmseg's evaluator (:class:`hieraloss.metrics.HierarchicalSegMetrics`).

        The predictions (``pred_sem_seg``) are leaf ids, as a decode head that returns
        :func:`path_scores` gives them; the targets (``gt_sem_seg``) node ids or ``ignore_index``.
        Each batch's counts are kept as one state vector, which mmengine gathers across ranks and
        :meth:`compute_metrics` sums. Results: ``HierarchicalSegMetrics.scalars()`` (``miou_depth1``,
        ``pixel_accuracy_depth1``, ..., ``consistency_rate``, ``mistake_severity``,
        ``hierarchical_f1``), under mmengine's prefix (default ``hiera``)::

            val_evaluator = [dict(type="IoUMetric", iou_metrics=["mIoU"]),
                             dict(type="HieraSegMetric", hierarchy="cityscapes")]
        """

        default_prefix = "hiera"

        def __init__(self, hierarchy: Any = "cityscapes", ignore_index: int = 255, collect_device: str = "cpu",
                     prefix: str | None = None, **kwargs: Any):
            super().__init__(collect_device=collect_device, prefix=prefix, **kwargs)
            self.hierarchy = load_hierarchy(hierarchy)
            self.ignore_index = int(ignore_index)
            HierarchicalSegMetrics(self.hierarchy, self.ignore_index)  # checks the arguments

        def process(self, data_batch: Any, data_samples: Any) -> None:
            batch = HierarchicalSegMetrics(self.hierarchy, self.ignore_index)
            for sample in data_samples:
                pred = sample["pred_sem_seg"]["data"].reshape(1, *sample["pred_sem_seg"]["data"].shape[-2:])
                target = sample["gt_sem_seg"]["data"].reshape(1, *sample["gt_sem_seg"]["data"].shape[-2:])
                batch.update(pred, target.to(pred.device))
            self.results.append(batch.state())

        def compute_metrics(self, results: list) -> dict[str, float]:
            total = HierarchicalSegMetrics(self.hierarchy, self.ignore_index)
            total.load_state(np.sum(np.stack(results), axis=0))
            return total.scalars()

    return HieraSegMetric


HieraSegMetric = _metric_class()


def register(force: bool = False) -> Any:
    """Register the losses in ``mmseg.registry.MODELS`` (and :class:`HieraSegMetric` in
    ``mmseg.registry.METRICS``) and return the models' registry.

    Idempotent: a name already bound to the same class is left alone. A name bound to another
    class raises ``KeyError`` unless ``force=True``. Raises ``ImportError`` when mmsegmentation is
    not installed.
    """
    try:
        from mmseg.registry import METRICS, MODELS
    except ImportError as exc:
        raise ImportError(
            f"hieraloss.integrations.mmseg.register() needs mmsegmentation>=1.0: {exc}") from exc
    except AssertionError as exc:  # mmseg asserts its mmcv range on import
        raise ImportError(f"mmsegmentation refused to import: {exc}. {MMCV_FIX}") from exc
    for name, cls in _LOSSES.items():
        existing = MODELS.module_dict.get(name)
        if existing is cls:
            continue
        same_origin = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__, cls.__qualname__)  # this module imported again (e.g. reloaded)
        if existing is not None and not (force or same_origin):
            raise KeyError(f"mmseg's MODELS already has a different {name!r} ({existing!r}); "
                           f"pass force=True to replace it")
        MODELS.register_module(name=name, module=cls, force=True)
    if HieraSegMetric is not None and METRICS.module_dict.get("HieraSegMetric") is not HieraSegMetric:
        METRICS.register_module(name="HieraSegMetric", module=HieraSegMetric, force=True)
    return MODELS


if importlib.util.find_spec("mmseg") is not None:
    try:
        register()
    except Exception as exc:  # the loss classes stay importable; only the registry entries are missing
        warnings.warn(f"hieraloss.integrations.mmseg: the losses were not registered in mmseg's MODELS: {exc}. "
                      f"Once fixed, call hieraloss.integrations.mmseg.register().", RuntimeWarning, stacklevel=2)
