"""A clean-room re-statement of the published HSSN tree-min loss formulation (SPEC section 9).

Written for benchmarking only: the same *style* of computation as the public code (sigmoid
probabilities, one Python iteration per class with ``torch.cat`` + ``min``/``max`` over the class's
ancestors or descendants, one-hot targets per level, ``log(p + 1e-8)``, per-level means, times 5),
generalised from the 2-level Cityscapes tree to any hierarchy. Unlike the public code it leaves the
caller's labels alone. Labels must hold leaf ids or ``ignore_index``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hieraloss import Hierarchy


def published_tree_min_loss(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy,
                            eps: float = 1e-8, ignore_index: int = 255) -> torch.Tensor:
    h = hierarchy
    p = torch.sigmoid(logits.float())
    valid = labels != ignore_index
    leaf = torch.where(valid, labels, torch.zeros_like(labels)).long()
    mask = valid.unsqueeze(1).float()
    num = valid.sum()
    total = p.new_zeros(())
    for d in range(1, h.max_depth + 1):
        nodes = [v for v in range(h.num_nodes) if h.depth[v] == d]
        # The label at depth d as an index among that level's nodes, then one-hot (published style).
        position = {v: i for i, v in enumerate(nodes)}
        anc = h.ancestor_table[h.leaf_channels, d - 1]
        to_level = torch.tensor([position.get(int(a), -1) for a in anc], device=labels.device)
        level_label = to_level[leaf]
        onehot = F.one_hot(level_label.clamp(min=0), len(nodes)).movedim(-1, 1).float()
        onehot = onehot * (level_label >= 0).unsqueeze(1)  # leaves shallower than d have no node here
        level_loss = p.new_zeros(())
        for i, v in enumerate(nodes):
            ancestors = [int(u) for u in h.ancestor_table[v, :d]]
            descendants = sorted(set(int(u) for u in h.descendant_table[v]))
            pos = torch.min(torch.cat([p[:, u:u + 1] for u in ancestors], dim=1), dim=1, keepdim=True)[0]
            neg = torch.max(torch.cat([p[:, u:u + 1] for u in descendants], dim=1), dim=1, keepdim=True)[0]
            y = onehot[:, i:i + 1]
            term = -y * torch.log(pos + eps) - (1.0 - y) * torch.log(1.0 - neg + eps)
            level_loss = level_loss + (term * mask).sum()
        total = total + level_loss / num / len(nodes)
    return 5 * total
