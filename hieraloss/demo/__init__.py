"""``python -m hieraloss demo``: flat cross-entropy, HSSN and the leaf-logit hierarchical objectives
on procedural scenes, on the CPU.

:mod:`.data` draws the scenes, :mod:`.model` holds the tiny FCN (torch and paddle),
:mod:`.backends` trains one model per objective, :mod:`.train` runs and scores them, :mod:`.figure`
draws the comparison and :mod:`.bench` is ``hieraloss bench``. Needs ``pip install hieraloss[demo]``
(torch, matplotlib, tqdm).
"""

from .data import appearance, make_scenes, make_splits

__all__ = ["make_scenes", "make_splits", "appearance"]
