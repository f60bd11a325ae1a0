"""The conformance suite on the fused Triton kernels: every test of test_conformance_backends.py, run
with ``backend="triton"`` (tests/_adapter_torch_triton.py): the objective kernel for the tree-min
losses (the generated one and the table-driven one, ``HIERALOSS_TRITON_OBJECTIVE``), the fused
decoder and the fused triplet loss. On a CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py), which is slow: the property tests
draw fewer examples here (``EXAMPLES``) than for the other backends.

The tests are the suite's own functions, re-declared here with this backend as their only
``adapter`` (a copy per test: the suite's functions and marks are left as they are).
"""

from __future__ import annotations

import functools

import pytest
import test_conformance_backends as suite
from backends import triton_adapters
from hypothesis import given, settings
from hypothesis import strategies as st

EXAMPLES = 8
ADAPTERS = triton_adapters()


@pytest.fixture(autouse=True)
def _objective_kernel(request, monkeypatch):
    """The adapter's objective kernel for the whole test."""
    adapter = request.node.callspec.params.get("adapter")
    if adapter is not None:
        from hieraloss.torch.kernels._common import OBJECTIVE_ENV

        monkeypatch.setenv(OBJECTIVE_ENV, adapter.objective)


def _on_triton(test):
    inner = getattr(getattr(test, "hypothesis", None), "inner_test", None)

    @functools.wraps(inner or test)
    def run(*args, **kw):
        return (inner or test)(*args, **kw)

    if inner is not None:  # a property test: the same strategy, fewer examples
        run = settings(max_examples=EXAMPLES)(given(data=st.data())(run))
    run.pytestmark = list(getattr(test, "pytestmark", []))  # its other parametrizations
    return pytest.mark.parametrize("adapter", ADAPTERS)(run)


for _name, _test in list(vars(suite).items()):
    if _name.startswith("test_") and callable(_test):
        globals()[_name] = _on_triton(_test)
