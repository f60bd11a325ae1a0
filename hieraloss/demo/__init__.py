"""``python -m hieraloss demo``: flat cross-entropy vs HSSN on procedural scenes, on the CPU.

:mod:`.data` draws the scenes, :mod:`.model` holds the tiny FCN (torch and paddle), :mod:`.train`
runs and scores both models, :mod:`.figure` draws the comparison and :mod:`.bench` is
``hieraloss bench``. Needs ``pip install hieraloss[demo]`` (torch, matplotlib, tqdm).
"""

from .data import appearance, make_scenes, make_splits

__all__ = ["make_scenes", "make_splits", "appearance"]
