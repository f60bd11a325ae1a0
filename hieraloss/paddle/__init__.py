"""hieraloss for PaddlePaddle: the same public names, arguments and semantics as ``hieraloss.torch``.

Functional API (:mod:`hieraloss.paddle.functional`) and ``paddle.nn.Layer`` classes
(:mod:`hieraloss.paddle.layers`). On a GPU with torch and Triton installed, ``backend="auto"``
routes the tree-min losses and the path/top-down decoders through the fused Triton kernels of
``hieraloss.torch.kernels`` with zero-copy DLPack views (:mod:`hieraloss.paddle._bridge`). On the
CPU, ``backend="auto"`` runs the tree-min losses on the compiled kernel of ``hieraloss._native``
when it was built (:mod:`hieraloss.paddle.ops.native`).

Under ``paddle.jit.to_static(full_graph=True)`` the library's own code runs as Python while paddle
builds the program (it is registered with ``paddle.jit.ignore_module``: its control flow depends on
shapes and options, never on tensor values, so there is nothing to transcribe); the losses then
take the paddle ops, check labels with an assertion of the program, and hold their tables as
constants of it.
"""

import paddle as _paddle

import hieraloss as _hieraloss

from .functional import (
    BACKENDS,
    DECODE_METHODS,
    REDUCTIONS,
    decode,
    depth_cross_entropy,
    expand_targets,
    focal_tree_min_loss,
    hierarchy_triplet_loss,
    hssn_loss,
    path_scores,
    tree_min_loss,
    triplet_weight,
    upsample_to_labels,
)
from .layers import (
    FocalTreeMinLoss,
    HierarchicalCrossEntropyLoss,
    HierarchyDecoder,
    HierarchyTripletLoss,
    HSSNLoss,
    SoftLabelCrossEntropyLoss,
    TreeMinLoss,
)
from .leaf_losses import (
    LEAF_DECODE_METHODS,
    LEAF_REDUCTIONS,
    decode_leaf_logits,
    hierarchical_cross_entropy,
    soft_label_cross_entropy,
)
from .logic import (
    LogicSegLoss,
    asymmetric_bce_loss,
    child_implies_parent_loss,
    exclusion_loss,
    logic_refine,
    logicseg_loss,
    parent_implies_child_loss,
)

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
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "TreeMinLoss",
    "FocalTreeMinLoss",
    "HierarchyTripletLoss",
    "HSSNLoss",
    "HierarchyDecoder",
    "HierarchicalCrossEntropyLoss",
    "SoftLabelCrossEntropyLoss",
    "logicseg_loss",
    "asymmetric_bce_loss",
    "child_implies_parent_loss",
    "parent_implies_child_loss",
    "exclusion_loss",
    "logic_refine",
    "LogicSegLoss",
    "upsample_to_labels",
    "REDUCTIONS",
    "DECODE_METHODS",
    "BACKENDS",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]

_paddle.jit.ignore_module([_hieraloss])
