"""The GPU session's scripts still run: ``benchmarks/gpu_check.py --smoke`` (its table at tiny sizes,
on the CPU under the Triton interpreter), ``benchmarks/profile_gpu_step.py`` (its options; without
a GPU it says so) and ``benchmarks/bench_kernels.py --launch-python`` (a mocked driver). A broken
script would cost a session's scarce GPU time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_smoke_prints_every_row():
    proc = _run("benchmarks/gpu_check.py", "--smoke", "--skip-tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| part"):]
    for row in ("tree-min hssn fwd+bwd", "focal tree-min fwd+bwd", "depth_cross_entropy depth 2",
                "triplet, torch ops", "triplet, fused kernels", "hssn_loss with embeddings",
                "tree-min hssn, bfloat16 logits", "decode top_down", "Mapillary focal tree-min fwd+bwd",
                "tree-min hssn fwd+bwd, channels_last logits"):
        assert f"| {row}" in table, row


def test_profile_gpu_step_options():
    proc = _run("benchmarks/profile_gpu_step.py", "--help", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in ("--host", "--maxnreg", "--load-group", "--block-p", "--warps", "--focal-exp", "--plain-math",
                   "--launch-cost", "--count-chunk", "--count-apart", "--small-maxnreg"):
        assert option in proc.stdout, option
    if not _cuda():
        proc = _run("benchmarks/profile_gpu_step.py", "triplet", timeout=300)
        assert proc.returncode == 1 and "no CUDA device" in proc.stdout


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_launch_python_share_lists_each_launch_of_a_step():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--launch-python"], cwd=ROOT,
                          env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.endswith(" us")}
    assert set(rows) == {"trivial", "objective_kernel"}, proc.stdout
    assert all(float(line.split()[-2]) > 0 for line in rows.values()), rows
