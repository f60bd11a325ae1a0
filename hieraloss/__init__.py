"""hieraloss: hierarchical semantic segmentation losses, decoders and metrics (HSSN, CVPR 2022).

``import hieraloss`` needs numpy only; the backends live in ``hieraloss.numpy``,
``hieraloss.torch`` and ``hieraloss.paddle``.
"""

from . import presets
from ._native import release_cpu_buffers
from .hierarchy import Hierarchy, HierarchyError, LabelError

__version__ = "0.1.0"

__all__ = ["Hierarchy", "HierarchyError", "LabelError", "presets", "release_cpu_buffers", "__version__"]
