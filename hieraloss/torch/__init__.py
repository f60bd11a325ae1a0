"""PyTorch backend of hieraloss: functional losses and decoders plus thin ``nn.Module`` wrappers.

Works on CPU and CUDA with any spatial rank; on CUDA with Triton installed, ``backend="auto"``
uses the fused kernels of :mod:`hieraloss.torch.kernels` (imported lazily).
"""

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
from .heads import HierarchicalHead, HierarchicalModel, HierarchicalOutput, make_hierarchical
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
from .modules import (
    FocalTreeMinLoss,
    HierarchicalCrossEntropyLoss,
    HierarchyDecoder,
    HierarchyTripletLoss,
    HSSNLoss,
    SoftLabelCrossEntropyLoss,
    TreeMinLoss,
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
    "make_hierarchical",
    "HierarchicalHead",
    "HierarchicalModel",
    "HierarchicalOutput",
    "upsample_to_labels",
    "REDUCTIONS",
    "DECODE_METHODS",
    "BACKENDS",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]
