"""A fused kernel that fails to import is never a silent fall back (HIERALOSS_REQUIRE_TRITON)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Makes the import of the objective kernel fail, as a broken triton install or a kernel bug would.
BREAK = """
import sys
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "hieraloss.torch.kernels.objective":
            raise RuntimeError("simulated kernel bug")
sys.meta_path.insert(0, Broken())
"""


def _run(code: str, require: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HIERALOSS_REQUIRE_TRITON", None)
    if require:
        env["HIERALOSS_REQUIRE_TRITON"] = "1"
    return subprocess.run([sys.executable, "-W", "always", "-c", BREAK + code], env=env, capture_output=True,
                          text=True, timeout=300)


def test_required_kernels_that_fail_to_import_raise():
    out = _run("import hieraloss.torch.kernels", require=True)
    assert out.returncode != 0
    assert "HIERALOSS_REQUIRE_TRITON=1, but the fused Triton kernels failed to import" in out.stderr
    assert "simulated kernel bug" in out.stderr


def test_kernels_that_fail_to_import_warn_and_name_the_reason():
    code = ("import hieraloss.torch.kernels as k\n"
            "assert not k.triton_available()\n"
            "print(repr(k.import_error()))\n")
    out = _run(code, require=False)
    assert out.returncode == 0, out.stderr
    assert "simulated kernel bug" in out.stdout
    assert "the fused Triton kernels failed to import" in out.stderr and "HIERALOSS_REQUIRE_TRITON=1" in out.stderr
