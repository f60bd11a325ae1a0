"""PaddleSeg integration: the hieraloss losses as PaddleSeg loss components.

:func:`register` adds seven classes to PaddleSeg's loss manager (``paddleseg.cvlibs.manager.LOSSES``):

* ``HieraTreeMinLoss``: :func:`hieraloss.paddle.tree_min_loss`,
* ``HieraFocalTreeMinLoss``: :func:`hieraloss.paddle.focal_tree_min_loss`,
* ``HieraHSSNLoss``: :func:`hieraloss.paddle.hssn_loss` without the triplet term (tree-min with the
  published normalisation plus the per-depth cross-entropies),
* ``HieraTripletLoss``: the hierarchy-margin triplet term times its published schedule ``w(step)``,
* ``HieraLogicSegLoss``: :func:`hieraloss.paddle.logicseg_loss` (LogicSeg: asymmetric BCE plus the three
  logic rules, ramped in by the layer's own step count),
* ``HieraHierarchicalCELoss`` / ``HieraSoftLabelCELoss``: :func:`hieraloss.paddle.hierarchical_cross_entropy`
  and :func:`hieraloss.paddle.soft_label_cross_entropy` (Bertinetto et al., CVPR 2020) on a flat
  model's leaf logits ``[B, K, H, W]``.

PaddleSeg calls every loss as ``loss(logits, label)``, where ``logits`` is the i-th output of the
model and the i-th entry of ``loss.types``. The classes hold the hierarchy, given in the config as
a preset name (``hieraloss.presets.names()``), a path to a JSON file written by
``Hierarchy.to_json``, or a mapping (``to_dict()`` form or a nested tree for ``Hierarchy.from_dict``).

The triplet term needs embeddings and the training step. Let the model return
``[logits, embeddings]`` while training (and ``[path_scores(logits, hierarchy)]`` in eval, so that
PaddleSeg's argmax evaluation is the exact ``path`` decoding over leaves), and give the triplet
loss the second slot; it counts its own calls (one per training iteration, a persistable ``step``
buffer) to follow the schedule. After resuming, call ``set_step(iteration)``::

    import hieraloss.integrations.paddleseg as hps
    hps.register()   # before PaddleSeg builds the config, e.g. at the top of your train script

    # config.yml
    model:
      type: MyHierarchicalModel     # returns [logits (num_nodes channels), embeddings] in training
    loss:
      types:
        - type: HieraHSSNLoss
          hierarchy: cityscapes
        - type: HieraTripletLoss
          hierarchy: cityscapes
          total_steps: 80000          # the schedule's horizon T (usually the iters)
      coef: [1, 1]

With this, ``loss_computation`` sums ``HieraHSSNLoss(logits, label)`` and
``w(t) * HieraTripletLoss(embeddings, label)``: the published Cityscapes objective (plus the user's
auxiliary heads, if any).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
from paddle import nn

from .. import presets
from ..core.checks import check_leaf_reduction, check_nonnegative, check_reduction
from ..core.leaf import check_hxe_weighting
from ..hierarchy import Hierarchy
from ..paddle import functional as F
from ..paddle import leaf_losses as _leaf
from ..paddle.logic import LogicSegLoss

__all__ = [
    "HieraTreeMinLoss",
    "HieraFocalTreeMinLoss",
    "HieraHSSNLoss",
    "HieraTripletLoss",
    "HieraLogicSegLoss",
    "HieraHierarchicalCELoss",
    "HieraSoftLabelCELoss",
    "LOSS_CLASSES",
    "load_hierarchy",
    "path_scores",
    "register",
]


load_hierarchy = presets.load  # kept under this name: configs and docs refer to it


def _label_map(label: paddle.Tensor, ndim: int) -> paddle.Tensor:
    """PaddleSeg hands labels as ``[B, H, W]`` or ``[B, 1, H, W]``; the losses want ``[B, H, W]``."""
    if isinstance(label, paddle.Tensor) and label.ndim == ndim and label.shape[1] == 1:
        return label.squeeze(1)
    return label


def path_scores(logits: paddle.Tensor, hierarchy: Hierarchy) -> paddle.Tensor:
    """Leaf scores ``[B, K, *spatial]`` in leaf-id order: the sum of the logits along each leaf's path
    (:func:`hieraloss.paddle.path_scores`; float32, or float64 for float64 logits).

    Their argmax over axis 1 is the ``path`` decoding as a leaf id, so a model can return them in
    eval mode and PaddleSeg's evaluation (argmax, mIoU over the K leaf classes) just works.
    """
    return F.path_scores(logits, hierarchy)


class HieraTreeMinLoss(nn.Layer):
    """Tree-min loss for PaddleSeg: ``loss(logits [B, N, H, W], label [B, (1,) H, W])``."""

    def __init__(
        self,
        hierarchy: Any = "cityscapes",
        ignore_index: int = 255,
        reduction: str = "mean",
        node_weight: Sequence[float] | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.hierarchy = load_hierarchy(hierarchy)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.node_weight = node_weight
        self.backend = backend
        check_reduction(reduction)
        self.hierarchy.check_ignore_index(ignore_index)

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            node_weight=self.node_weight,
            backend=self.backend,
        )

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        return F.tree_min_loss(logits, _label_map(label, logits.ndim), self.hierarchy, **self._kwargs())


class HieraFocalTreeMinLoss(HieraTreeMinLoss):
    """Focal tree-min loss for PaddleSeg (``gamma`` as in :func:`hieraloss.paddle.focal_tree_min_loss`,
    which checks it on each call)."""

    def __init__(self, hierarchy: Any = "cityscapes", gamma: float = 2.0, **kwargs: Any):
        super().__init__(hierarchy, **kwargs)
        self.gamma = gamma

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        return F.focal_tree_min_loss(
            logits, _label_map(label, logits.ndim), self.hierarchy, gamma=self.gamma, **self._kwargs()
        )


class HieraHSSNLoss(nn.Layer):
    """``tree_min_weight * TM + sum_d ce_weights[d-1] * CE_d`` (:func:`hieraloss.paddle.hssn_loss`
    without embeddings); put :class:`HieraTripletLoss` on the embeddings output for the triplet term."""

    def __init__(
        self,
        hierarchy: Any = "cityscapes",
        ignore_index: int = 255,
        tree_min_weight: float = 5.0,
        focal_gamma: float | None = None,
        ce_weights: float | Sequence[float] | None = None,
        node_weight: Sequence[float] | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.hierarchy = load_hierarchy(hierarchy)
        self.hierarchy.check_ignore_index(ignore_index)
        self.ignore_index = ignore_index
        self.tree_min_weight = tree_min_weight
        self.focal_gamma = focal_gamma
        self.ce_weights = ce_weights
        self.node_weight = node_weight
        self.backend = backend

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        return F.hssn_loss(
            logits,
            _label_map(label, logits.ndim),
            self.hierarchy,
            ignore_index=self.ignore_index,
            tree_min_weight=self.tree_min_weight,
            focal_gamma=self.focal_gamma,
            ce_weights=self.ce_weights,
            node_weight=self.node_weight,
            backend=self.backend,
        )


class HieraTripletLoss(nn.Layer):
    """``w(step) * L_TT(embeddings, label)`` for PaddleSeg: ``loss(embeddings [B, C, h, w], label)``.

    ``w`` is the published ramp :func:`hieraloss.paddle.triplet_weight` over ``total_steps``
    (``None``: a constant 1, leaving the weight to the config's ``coef``). Each call in training
    mode advances the persistable ``step`` buffer by one; ``set_step`` sets it (after a resume).
    ``seed`` makes the random triplet sampling reproducible (a numpy Generator kept by the layer).
    ``gather_across_ranks=True`` draws triplets across the ranks of the default process group (a
    collective: see :mod:`hieraloss.paddle.distributed`). ``sampling``, ``max_per_class`` and
    ``base_margin`` are checked on each call by :func:`hieraloss.paddle.hierarchy_triplet_loss`.
    """

    def __init__(
        self,
        hierarchy: Any = "cityscapes",
        total_steps: int | None = None,
        ignore_index: int = 255,
        max_per_class: int = 200,
        base_margin: float = 0.1,
        sampling: str = "random",
        seed: int | None = None,
        gather_across_ranks: bool = False,
    ):
        super().__init__()
        self.hierarchy = load_hierarchy(hierarchy)
        self.hierarchy.check_ignore_index(ignore_index)
        if total_steps is not None and not total_steps > 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.total_steps = total_steps
        self.ignore_index = ignore_index
        self.max_per_class = max_per_class
        self.base_margin = base_margin
        self.sampling = sampling
        self.generator = np.random.default_rng(seed)
        self.gather_across_ranks = bool(gather_across_ranks)
        self.register_buffer("step", paddle.zeros([], dtype="int64"), persistable=True)

    def set_step(self, step: int) -> None:
        self.step.set_value(paddle.full([], int(step), dtype="int64"))

    def weight(self) -> float:
        """The schedule's weight at the current step."""
        return 1.0 if self.total_steps is None else F.triplet_weight(int(self.step), self.total_steps)

    def forward(self, embeddings: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        w = self.weight()
        loss = F.hierarchy_triplet_loss(
            embeddings,
            _label_map(label, embeddings.ndim),
            self.hierarchy,
            max_per_class=self.max_per_class,
            base_margin=self.base_margin,
            sampling=self.sampling,
            generator=self.generator,
            ignore_index=self.ignore_index,
            gather_across_ranks=self.gather_across_ranks,
        )
        if self.training and paddle.is_grad_enabled():  # evaluation never advances the schedule
            self.step.set_value(self.step + 1)
        return w * loss


class _LeafCELoss(nn.Layer):
    """Shared configuration of the leaf-logit losses: ``loss(logits [B, K, H, W], label [B, (1,) H, W])``."""

    _param = ""

    def __init__(self, hierarchy: Any, value: float, ignore_index: int = 255, reduction: str = "mean"):
        super().__init__()
        self.hierarchy = load_hierarchy(hierarchy)
        self.hierarchy.check_ignore_index(ignore_index)
        setattr(self, self._param, check_nonnegative(value, self._param))
        check_leaf_reduction(reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction


class HieraHierarchicalCELoss(_LeafCELoss):
    """Hierarchical cross-entropy for PaddleSeg (``alpha``, ``weighting`` and ``normalize`` as in
    :func:`hieraloss.paddle.hierarchical_cross_entropy`; the model outputs K leaf logits)."""

    _param = "alpha"

    def __init__(self, hierarchy: Any = "cityscapes", alpha: float = 0.1, ignore_index: int = 255,
                 reduction: str = "mean", weighting: str = "depth", normalize: bool = False):
        super().__init__(hierarchy, alpha, ignore_index, reduction)
        check_hxe_weighting(weighting, normalize)
        self.weighting, self.normalize = weighting, bool(normalize)

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        return _leaf.hierarchical_cross_entropy(
            logits, _label_map(label, logits.ndim), self.hierarchy, alpha=self.alpha,
            ignore_index=self.ignore_index, reduction=self.reduction, weighting=self.weighting,
            normalize=self.normalize,
        )


class HieraSoftLabelCELoss(_LeafCELoss):
    """Soft-label cross-entropy for PaddleSeg (``beta`` as in
    :func:`hieraloss.paddle.soft_label_cross_entropy`; the model outputs K leaf logits)."""

    _param = "beta"

    def __init__(self, hierarchy: Any = "cityscapes", beta: float = 1.0, ignore_index: int = 255,
                 reduction: str = "mean"):
        super().__init__(hierarchy, beta, ignore_index, reduction)

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        return _leaf.soft_label_cross_entropy(
            logits, _label_map(label, logits.ndim), self.hierarchy, beta=self.beta,
            ignore_index=self.ignore_index, reduction=self.reduction,
        )


class HieraLogicSegLoss(nn.Layer):
    """LogicSeg's objective (:func:`hieraloss.paddle.logicseg_loss`) for PaddleSeg:
    ``loss(logits [B, N, H, W], label [B, (1,) H, W])``. The rules' ramp follows the layer's own
    persistable ``step`` (one per training call; ``set_step`` after a resume); ``ramp=None`` keeps
    the rules at full weight."""

    def __init__(self, hierarchy: Any = "cityscapes", ignore_index: int = 255, rule_weight: float = 0.2,
                 ramp: Sequence[float] | None = (20000, 50000), p: float = 5.0, exclusion: str = "siblings",
                 easy_filter: bool = False):
        super().__init__()
        self.hierarchy = load_hierarchy(hierarchy)
        self.hierarchy.check_ignore_index(ignore_index)
        self.loss = LogicSegLoss(self.hierarchy, rule_weight=rule_weight, ramp=None if ramp is None else tuple(ramp),
                                 p=p, exclusion=exclusion, easy_filter=easy_filter, ignore_index=ignore_index)

    def set_step(self, step: int) -> None:
        self.loss.step.set_value(paddle.full([], int(step), dtype="int64"))

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        self.loss.train() if self.training else self.loss.eval()
        return self.loss(logits, _label_map(label, logits.ndim))


LOSS_CLASSES = (HieraTreeMinLoss, HieraFocalTreeMinLoss, HieraHSSNLoss, HieraTripletLoss, HieraLogicSegLoss,
                HieraHierarchicalCELoss, HieraSoftLabelCELoss)


def register(manager: Any = None) -> Any:
    """Add the loss classes to ``manager`` (default ``paddleseg.cvlibs.manager.LOSSES``) and return it.

    Idempotent: classes already registered under their name are left alone.
    """
    if manager is None:
        try:
            from paddleseg.cvlibs import manager as paddleseg_manager
        except ImportError as exc:
            raise ImportError(f"hieraloss.integrations.paddleseg.register() needs paddleseg: {exc}") from exc
        manager = paddleseg_manager.LOSSES
    for cls in LOSS_CLASSES:
        if manager.components_dict.get(cls.__name__) is not cls:
            manager.add_component(cls)
    return manager
