"""The torch side's operations below the doors (:mod:`hieraloss.torch.functional` checks inputs and
composes; nothing here validates but the label values), one file per operation, each with the
routing that picks its implementation (the fused Triton kernel, the compiled CPU kernel or the
torch ops, by the rules of :mod:`.route`):

* :mod:`.route`: which implementation runs (``backend``: auto, torch, native, triton);
* :mod:`.labels`: node-id labels to channels on the device, and the label check;
* :mod:`.device`: the hierarchy's tables on one device (:class:`~.device.DevicePlan`), the compute dtype;
* :mod:`.tree_min`: the tree-min loss in torch ops (tiles, sweeps, its autograd function), its
  routing, and the expanded targets;
* :mod:`.cross_entropy`: the cross-entropy over the classes of one depth;
* :mod:`.objective`: the HSSN objective's fused step (Triton or the compiled CPU kernel);
* :mod:`.decode`: the decoders and the path scores;
* :mod:`.triplet`: the triplet loss's selection and score on the device, the cross-rank op, and its
  routing;
* :mod:`.native`: the compiled CPU kernel's glue (tree-min and the fused HSSN objective: autograd
  functions and the ``torch.ops.hieraloss.native_*`` custom ops);
* :mod:`.logicseg`: LogicSeg's operations (the compiled CPU kernel or torch ops).

The Triton kernels live in :mod:`hieraloss.torch.kernels`, one file per fused op.
"""
