import os

# Triton kernels run on the CPU under the interpreter unless a GPU run is asked for explicitly.
# This must happen before anything imports triton.
if os.environ.get("HIERALOSS_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=50, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_framework_generators():
    """Every test draws the same numbers from torch's and paddle's global generators on every run, as
    hypothesis does under the "ci" profile: a failure reproduces instead of coming and going."""
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    if "paddle" in sys.modules:
        sys.modules["paddle"].seed(0)
