"""hieraloss in plain numpy (forward only): the reference every other backend is checked against.

Same public names and arguments as ``hieraloss.torch`` and ``hieraloss.paddle``; see
``DEVELOPING.md`` for index spaces, targets, reductions, the tie rule and decoding.
"""

from .decode import DECODE_METHODS, decode
from .leaf_losses import (
    LEAF_DECODE_METHODS,
    LEAF_REDUCTIONS,
    decode_leaf_logits,
    hierarchical_cross_entropy,
    soft_label_cross_entropy,
)
from .logic import (
    asymmetric_bce_loss,
    child_implies_parent_loss,
    exclusion_loss,
    logic_refine,
    logicseg_loss,
    parent_implies_child_loss,
)
from .losses import REDUCTIONS, expand_targets, focal_tree_min_loss, tree_min_loss
from .triplet import (
    hierarchy_triplet_loss,
    resize_labels_nearest,
    sample_triplets,
    triplet_margin,
    triplet_weight,
)

__all__ = [
    "tree_min_loss",
    "focal_tree_min_loss",
    "expand_targets",
    "decode",
    "triplet_margin",
    "sample_triplets",
    "resize_labels_nearest",
    "hierarchy_triplet_loss",
    "triplet_weight",
    "hierarchical_cross_entropy",
    "soft_label_cross_entropy",
    "decode_leaf_logits",
    "logicseg_loss",
    "asymmetric_bce_loss",
    "child_implies_parent_loss",
    "parent_implies_child_loss",
    "exclusion_loss",
    "logic_refine",
    "REDUCTIONS",
    "DECODE_METHODS",
    "LEAF_REDUCTIONS",
    "LEAF_DECODE_METHODS",
]
