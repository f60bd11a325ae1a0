"""The paddle side's operations below the doors (:mod:`hieraloss.paddle.functional` checks inputs and
composes; nothing here validates but the label values), one file per operation as in
:mod:`hieraloss.torch.ops`, each with the routing that picks its implementation (the fused Triton
kernel through the DLPack bridge, the compiled CPU kernel or the paddle ops, by :mod:`.route`):

* :mod:`.route`: which implementation runs (``backend``: auto, paddle, native, triton);
* :mod:`.labels`: node-id labels to channels on the place, the label check, the program assertion;
* :mod:`.device`: the compute dtype, the empty-input answer, the reduction's per-depth factors;
* :mod:`.tree_min`: the tree-min loss in paddle ops (sweeps, its ``PyLayer``), its routing, and the
  expanded targets;
* :mod:`.cross_entropy`: the cross-entropy over the classes of one depth;
* :mod:`.objective`: the HSSN objective's fused step (Triton or the compiled CPU kernel);
* :mod:`.decode`: the decoders and the path scores;
* :mod:`.triplet`: the triplet loss (eager and inside a static program) and its routing;
* :mod:`.collective`: the cross-rank triplet op over ``paddle.distributed``;
* :mod:`.native`: the compiled CPU kernel's glue (tree-min and the fused HSSN objective);
* :mod:`.logicseg`: LogicSeg's operations (the compiled CPU kernel or paddle ops).
"""
