"""Cross-rank triplet loss over ``torch.distributed`` (opt-in: ``gather_across_ranks=True``).

Rule (what every rank computes). The pixels of all ranks of the process group form one *global*
batch: rank 0's pixels in flat ``(b, i, j)`` order, then rank 1's, and so on. Triplets are chosen
on that global batch exactly as :func:`hieraloss.torch.hierarchy_triplet_loss` chooses them on one
batch, so class presence, the per-class counts ``T`` and the anchors / positives / negatives are
global and every rank computes the same triplets and the same loss value. When all ranks hold
embeddings of the same shape, that value equals the single-process loss on the batch concatenated
along dim 0 in rank order (``sampling="first"``, and ``sampling="random"`` with rank 0's generator:
rank 0 draws the permutation of the global pixels and broadcasts it; the other ranks' generators
are not used).

Gradients flow only into the calling rank's own embeddings (the standard all-gather behaviour: the
rows received from other ranks are constants). Summed over ranks, the local gradients are exactly
the gradient of the global loss; DistributedDataParallel *averages* over ranks, so the parameter
gradient of this term is the global gradient divided by the world size (multiply the loss by
``world_size`` to undo that). The result is always connected to the local embeddings (an exact
zero where no local pixel takes part), so DDP with ``find_unused_parameters=False`` works.

Communication: one all-gather of a few integers (sizes and checks), one of the leaf maps, one
broadcast of the permutation (``"random"`` only) and one of the embedding rows that the chosen
triplets use (at most ``3 * max_per_class`` rows per class, not the whole maps). Tensors travel on
the CPU for gloo and on the current CUDA device for nccl.
"""

from .ops.triplet import gathered_triplet_op, is_distributed

__all__ = ["is_distributed", "gathered_triplet_op"]
