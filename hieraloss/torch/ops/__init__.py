"""The torch side's operations below the doors (:mod:`hieraloss.torch.functional` checks inputs and
composes; nothing here validates), one file per operation:

* :mod:`.device`: the hierarchy's tables on one device (:class:`~.device.DevicePlan`), the compute dtype;
* :mod:`.tree_min`: the tree-min loss in torch ops (tiles, sweeps, its autograd function) and the
  expanded targets;
* :mod:`.cross_entropy`: the cross-entropy over the classes of one depth;
* :mod:`.decode`: the decoders and the path scores;
* :mod:`.triplet`: the triplet loss's selection and score on the device;
* :mod:`.native`: the compiled CPU kernel's glue (tree-min and the fused HSSN objective: autograd
  functions and the ``torch.ops.hieraloss.native_*`` custom ops);
* :mod:`.logicseg`: LogicSeg's operations (the compiled CPU kernel or torch ops).

The Triton kernels live in :mod:`hieraloss.torch.kernels`, one file per fused op.
"""
