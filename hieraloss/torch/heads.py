"""A hierarchical head, and adapters that put it on a stock segmentation model.

HSSN needs two outputs from a network: one logit per node of the tree (``hierarchy.num_nodes``
channels, not one per leaf) and, for the triplet term, a pixel embedding. A stock model from
segmentation_models_pytorch, Hugging Face transformers or torchvision has a classifier with one
channel per class and no embedding. :func:`make_hierarchical` finds that classifier, replaces it
with a :class:`HierarchicalHead` on the same features, and returns a :class:`HierarchicalModel`
whose forward gives both outputs, without rewriting the model's forward::

    model = make_hierarchical(smp.Unet("resnet18", encoder_weights=None, classes=1), h)
    logits, embeddings = model(images)      # [B, N, H, W], [B, 64, H, W]

The model's own forward still runs end to end: whatever it does after its classifier (smp's and
torchvision's upsampling to the input size, a DPT head's 2x) happens to the node logits too, and
the embeddings come from the features the classifier saw, at their resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..hierarchy import Hierarchy
from .functional import _check_hierarchy

__all__ = ["HierarchicalOutput", "HierarchicalHead", "HierarchicalModel", "make_hierarchical",
           "node_label_maps", "CLASSIFIER_PATHS"]


class HierarchicalOutput(NamedTuple):
    """What a hierarchical head or model returns: ``logits [B, N, *spatial]`` (one per node, in
    channel order) and ``embeddings [B, E, h, w]`` (None without an embedding projection)."""

    logits: torch.Tensor
    embeddings: torch.Tensor | None


def _num_nodes(hierarchy: Hierarchy) -> int:
    _check_hierarchy(hierarchy)
    return hierarchy.num_nodes


def _positive(value: Any, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an int {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


class HierarchicalHead(nn.Module):
    """A node classifier plus an embedding projection on one feature map.

    ``forward(features [B, C, h, w], size=None)`` returns :class:`HierarchicalOutput`:

    * ``logits = classifier(dropout(features))``, ``hierarchy.num_nodes`` channels (a
      ``kernel_size`` x ``kernel_size`` convolution, padded to keep ``h x w``); with ``size`` given,
      upsampled to it bilinearly with ``align_corners=False``;
    * ``embeddings = projection(features)``, ``embedding_dim`` channels at ``h x w``: 1x1 conv,
      batch norm, ReLU, 1x1 conv, as the projection head of the published HSSN code (the triplet
      loss L2-normalises them). ``embedding_dim=0`` drops the projection (embeddings None).
    """

    def __init__(self, in_channels: int, hierarchy: Hierarchy, *, embedding_dim: int = 64,
                 projection_channels: int | None = None, kernel_size: int = 1, dropout: float = 0.0):
        super().__init__()
        n = _num_nodes(hierarchy)
        in_channels = _positive(in_channels, "in_channels")
        embedding_dim = _positive(embedding_dim, "embedding_dim", allow_zero=True)
        kernel_size = _positive(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the logits keep the features' size), got {kernel_size}")
        self.hierarchy = hierarchy
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, n, kernel_size, padding=kernel_size // 2)
        self.projection: nn.Module | None = None
        if embedding_dim:
            mid = in_channels if projection_channels is None else _positive(projection_channels, "projection_channels")
            self.projection = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                            nn.ReLU(inplace=True), nn.Conv2d(mid, embedding_dim, 1))

    def forward(self, features: torch.Tensor, size: Sequence[int] | None = None) -> HierarchicalOutput:
        logits = self.classifier(self.dropout(features))
        if size is not None and tuple(size) != tuple(logits.shape[2:]):
            logits = nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        embeddings = None if self.projection is None else self.projection(features)
        return HierarchicalOutput(logits, embeddings)


class _ClassifierTap(nn.Module):
    """Stands where the stock classifier stood: returns the node logits to the model's forward and
    keeps the embeddings of the same features for :class:`HierarchicalModel` to collect."""

    def __init__(self, head: HierarchicalHead):
        super().__init__()
        self.head = head
        self.embeddings: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        self.embeddings = out.embeddings
        return out.logits


# Where each family keeps its classifier: (module path of the main classifier, paths of the other
# classifiers that emit class channels: auxiliary heads, LRASPP's low-resolution branch).
CLASSIFIER_PATHS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    # smp: Unet, Unet++, FPN, PSPNet, Linknet, PAN, MAnet, DeepLabV3(+), UPerNet, Segformer, DPT
    "segmentation_models_pytorch": [("segmentation_head.0", ()), ("segmentation_head.head.4", ())],
    # HF: SegFormer, UperNet (ConvNeXt, Swin, DINOv2 backbones), BEiT / Data2Vec; DPT
    "transformers": [("decode_head.classifier", ("auxiliary_head.classifier",)),
                     ("head.head.4", ("auxiliary_head.head.4",))],
    # torchvision: FCN, DeepLabV3 (with their aux_classifier), LRASPP
    "torchvision": [("classifier.4", ("aux_classifier.4",)),
                    ("classifier.high_classifier", ("classifier.low_classifier",))],
}


def node_label_maps(hierarchy: Hierarchy) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` over the logit channels: channel c is node ``hierarchy.node_names[c]``
    (what a Hugging Face config with ``num_labels = hierarchy.num_nodes`` holds)."""
    _check_hierarchy(hierarchy)
    id2label = dict(enumerate(hierarchy.node_names))
    return id2label, {name: c for c, name in id2label.items()}


def _family(model: nn.Module) -> str:
    return type(model).__module__.split(".")[0]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _node_conv(conv: nn.Conv2d, num_nodes: int) -> nn.Conv2d:
    """A fresh convolution like ``conv`` with ``num_nodes`` output channels."""
    return nn.Conv2d(conv.in_channels, num_nodes, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, bias=conv.bias is not None)


def _find_classifier(model: nn.Module, classifier: str | None) -> tuple[str, tuple[str, ...]]:
    if classifier is not None:
        found = _get(model, classifier)
        if not isinstance(found, nn.Conv2d):
            what = "no such submodule" if found is None else f"a {type(found).__name__}"
            raise ValueError(f"classifier={classifier!r} does not name an nn.Conv2d of {type(model).__name__} "
                             f"(found {what}; see model.named_modules())")
        return classifier, ()
    family = _family(model)
    candidates = CLASSIFIER_PATHS.get(family, [])
    for main, others in candidates:
        if isinstance(_get(model, main), nn.Conv2d):
            return main, tuple(p for p in others if isinstance(_get(model, p), nn.Conv2d))
    looked = [main for main, _ in candidates] or [p for c in CLASSIFIER_PATHS.values() for p, _ in c]
    raise ValueError(
        f"make_hierarchical could not find the classifier of {type(model).__name__} (from {family!r}): it looked "
        f"for an nn.Conv2d at {', '.join(looked)}. Pass classifier='<module path>' naming the final "
        f"convolution that emits the class channels (see model.named_modules())")


class HierarchicalModel(nn.Module):
    """A stock segmentation model whose classifier was replaced by a :class:`HierarchicalHead`
    (built by :func:`make_hierarchical`).

    ``forward(pixel_values)`` runs the stock model and returns :class:`HierarchicalOutput`
    ``(logits, embeddings)``: the node logits where the stock model returns its logits (smp and
    torchvision: the input's size; Hugging Face SegFormer: 1/4 of it, so pass
    ``upsample_logits=True`` to the loss, or ``output_size="input"`` here), and the embeddings of
    the features the classifier sees. ``model`` is the stock model (its other outputs, such as
    auxiliary logits, are not returned); ``head`` the new head.
    """

    def __init__(self, model: nn.Module, hierarchy: Hierarchy, classifier: str, output_size: str | None):
        super().__init__()
        self.model = model
        self.hierarchy = hierarchy
        self.classifier_path = classifier  # where the head sits in ``model`` (held once, in ``model``)
        self.output_size = output_size

    @property
    def head(self) -> HierarchicalHead:
        return self._tap().head

    def _tap(self) -> _ClassifierTap:
        return self.model.get_submodule(self.classifier_path)

    def forward(self, pixel_values: torch.Tensor) -> HierarchicalOutput:
        out = self.model(pixel_values)
        if isinstance(out, torch.Tensor):
            logits = out
        elif isinstance(out, dict) and "out" in out:  # torchvision
            logits = out["out"]
        else:  # Hugging Face ModelOutput
            logits = out.logits
        if self.output_size == "input" and tuple(logits.shape[2:]) != tuple(pixel_values.shape[2:]):
            logits = nn.functional.interpolate(logits, size=pixel_values.shape[2:], mode="bilinear",
                                               align_corners=False)
        tap = self._tap()
        embeddings, tap.embeddings = tap.embeddings, None
        return HierarchicalOutput(logits, embeddings)


def make_hierarchical(model: nn.Module, hierarchy: Hierarchy, *, embedding_dim: int = 64,
                      projection_channels: int | None = None, output_size: str | None = None,
                      classifier: str | None = None) -> HierarchicalModel:
    """Make a stock segmentation model predict ``hierarchy``: its classifier becomes a
    :class:`HierarchicalHead` with ``hierarchy.num_nodes`` channels (same kernel, stride, padding
    and input features; freshly initialised) plus an ``embedding_dim``-wide projection (0: none).

    Found by the model's package (:data:`CLASSIFIER_PATHS`):

    * segmentation_models_pytorch: every model with a ``segmentation_head`` (Unet, FPN,
      DeepLabV3+, Segformer, UPerNet, DPT, ...);
    * Hugging Face transformers: SegFormer, UperNet and BEiT-style ``decode_head.classifier``, DPT's
      ``head``; auxiliary heads are resized to the nodes too, and ``config.num_labels``,
      ``id2label`` and ``label2id`` become the node names in channel order;
    * torchvision: FCN and DeepLabV3 (and their ``aux_classifier``), LRASPP (both branches, the
      embeddings from the high-resolution one).

    ``classifier="path.to.conv"`` names the classifier of any other model. ``output_size="input"``
    upsamples the logits to the input's size when the model returns them smaller. The model is
    changed in place and wrapped; its weights elsewhere are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = _num_nodes(hierarchy)
    if output_size not in (None, "input"):
        raise ValueError(f"output_size must be None or 'input', got {output_size!r}")
    main, others = _find_classifier(model, classifier)
    conv = _get(model, main)
    head = HierarchicalHead(conv.in_channels, hierarchy, embedding_dim=embedding_dim,
                            projection_channels=projection_channels)
    head.classifier = _node_conv(conv, n)
    place = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    _set(model, main, _ClassifierTap(head).to(**place))
    for path in others:
        _set(model, path, _node_conv(_get(model, path), n).to(**place))
    config = getattr(model, "config", None)
    if config is not None and _family(model) == "transformers":
        config.id2label, config.label2id = node_label_maps(hierarchy)
        config.num_labels = n
    return HierarchicalModel(model, hierarchy, main, output_size)
