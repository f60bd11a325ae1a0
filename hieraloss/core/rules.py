"""The loss rules every backend shares (plain constants, numpy-free).

* :data:`REDUCTIONS`: the reductions of the tree-min losses (DEVELOPING.md "Losses"); the door's
  ``check_choice`` in :mod:`hieraloss.core.checks` lists them in this order in its message.
* :data:`HSSN_SCALE`: the ``hssn`` reduction multiplies its per-depth normalised sum by 5 (the
  published code's factor); the HSSN objective divides its tree-min weight by it.

Re-exported under their old names by :mod:`hieraloss.core.checks` (``REDUCTIONS``) and
:mod:`hieraloss.numpy.losses` (``REDUCTIONS``, ``HSSN_SCALE``).
"""

from __future__ import annotations

__all__ = ["REDUCTIONS", "HSSN_SCALE"]

REDUCTIONS = ("mean", "sum", "none", "hssn")
HSSN_SCALE = 5.0
