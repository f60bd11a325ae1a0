"""The GPU session's scripts still run: ``benchmarks/gpu_check.py --smoke`` (its table at tiny sizes,
on the CPU under the Triton interpreter), ``benchmarks/profile_gpu_step.py`` (its options; without
a GPU it says so), ``benchmarks/gpu_ab.py`` (its commands name real steps and options, and its table
reads their output) and ``benchmarks/bench_kernels.py --launch-python`` (a mocked driver). A broken
script would cost a session's scarce GPU time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


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
                "tree-min hssn fwd+bwd, channels_last logits", "tree-min hssn fwd+bwd, one pixel per image"):
        assert f"| {row}" in table, row


def test_profile_gpu_step_options():
    proc = _run("benchmarks/profile_gpu_step.py", "--help", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in ("--host", "--maxnreg", "--load-group", "--block-p", "--warps", "--focal-exp", "--plain-math",
                   "--launch-cost", "--count-chunk", "--count-in-kernel", "--small-maxnreg"):
        assert option in proc.stdout, option
    if not _cuda():
        proc = _run("benchmarks/profile_gpu_step.py", "triplet", timeout=300)
        assert proc.returncode == 1 and "no CUDA device" in proc.stdout


def test_gpu_ab_commands_name_real_steps_and_options():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_ab
    import profile_gpu_step

    steps = set(re.findall(r'yield "([^"]+)"', (ROOT / "benchmarks/profile_gpu_step.py").read_text()))
    help_text = _run("benchmarks/profile_gpu_step.py", "--help", timeout=300).stdout
    assert len({name for name, *_ in gpu_ab.VARIANTS}) == len(gpu_ab.VARIANTS)
    for name, options, variant_steps, _ in gpu_ab.VARIANTS:
        assert set(variant_steps) <= steps, (name, set(variant_steps) - steps)
        cmd = gpu_ab.command(options, variant_steps, 3)
        assert cmd[1] == "benchmarks/profile_gpu_step.py" and "--summary" in cmd and "--exact" in cmd
        assert all(o in help_text for o in options if o.startswith("--")), name
    listed = _run("benchmarks/gpu_ab.py", "--list", timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert all(f"{name}:" in listed.stdout for name, *_ in gpu_ab.VARIANTS)

    # the table from two variants' output, as profile_gpu_step.py --summary prints it
    def out(times):
        return "noise\n" + "".join(f"{profile_gpu_step.SUMMARY}\t{s}\t{ms}\n" for s, ms in times.items())
    base = gpu_ab.parse(out({gpu_ab.MV: 2.0, gpu_ab.MV_FOCAL: 2.5, gpu_ab.CS: 0.5}))
    assert base == {gpu_ab.MV: 2.0, gpu_ab.MV_FOCAL: 2.5, gpu_ab.CS: 0.5}
    rows = gpu_ab.table({"default": base, "count in kernel": gpu_ab.parse(out({gpu_ab.MV: 3.0}))})
    assert rows[0] == "| step | default | count in kernel |"
    assert f"| {gpu_ab.MV} | 2.000 ms | 3.000 ms (1.500x) |" in rows
    assert f"| {gpu_ab.CS} | 0.500 ms |  |" in rows
    assert f"default: {gpu_ab.MV_FOCAL} / {gpu_ab.MV} = 1.250" in rows
    assert not any(gpu_ab.CS_HSSN in row for row in rows)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_launch_python_share_lists_each_launch_of_a_step():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--launch-python"], cwd=ROOT,
                          env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.endswith(" us")}
    # the label count is a launch of its own by default (HIERALOSS_LABEL_COUNT=separate)
    assert set(rows) == {"trivial", "_label_count_kernel", "objective_kernel"}, proc.stdout
    assert all(float(line.split()[-2]) > 0 for line in rows.values()), rows
