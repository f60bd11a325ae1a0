"""``hieraloss bench``: a quick timing run (always well under a minute).

From a source checkout with a ``benchmarks/`` folder, run each ``benchmarks/bench_*.py`` with ``--quick``
(other files there are helpers).
Otherwise time, on the CPU (or the current CUDA device if there is one), the tree-min loss forward
+ backward and ``decode(..., "path")`` against one read + write pass over the same logits
(``clone``): the ratio says how many memory passes the op costs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["run_bench", "benchmark_scripts"]

SCRIPT_TIMEOUT_S = 300


def benchmark_scripts(root: Path | None = None) -> list[Path]:
    """``benchmarks/bench_*.py`` of the source checkout this package runs from (empty if installed)."""
    root = Path(__file__).resolve().parents[2] / "benchmarks" if root is None else root
    if not root.is_dir():
        return []
    return sorted(root.glob("bench_*.py"))


def _median_ms(fn: Callable[[], object], sync: Callable[[], None], repeats: int = 5) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _builtin_torch(hierarchy, shape: tuple[int, int, int]) -> list[tuple[str, float]]:
    import torch

    from .. import torch as hl

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    b, hgt, wid = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, hierarchy.num_nodes, hgt, wid, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, hierarchy.num_leaves, (b, hgt, wid), generator=gen).to(device)

    def loss_fwd_bwd():
        x.grad = None
        hl.tree_min_loss(x, labels, hierarchy).backward()

    def decode():
        with torch.no_grad():
            hl.decode(x, hierarchy, method="path")

    def read_write():
        with torch.no_grad():
            x.clone()

    return [(f"one read+write pass (clone) [{device.type}]", _median_ms(read_write, sync)),
            ("tree_min_loss forward+backward", _median_ms(loss_fwd_bwd, sync)),
            ("decode(method='path')", _median_ms(decode, sync))]


def _builtin_paddle(hierarchy, shape: tuple[int, int, int]) -> list[tuple[str, float]]:
    import paddle

    from .. import paddle as hl

    b, hgt, wid = shape
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((b, hierarchy.num_nodes, hgt, wid)).astype(np.float32),
                         stop_gradient=False)
    labels = paddle.to_tensor(rng.integers(0, hierarchy.num_leaves, (b, hgt, wid)))

    def loss_fwd_bwd():
        x.clear_gradient()
        hl.tree_min_loss(x, labels, hierarchy).backward()

    def decode():
        with paddle.no_grad():
            hl.decode(x, hierarchy, method="path")

    def read_write():
        with paddle.no_grad():
            x.clone()

    def sync():
        return None

    return [(f"one read+write pass (clone) [{paddle.get_device()}]", _median_ms(read_write, sync)),
            ("tree_min_loss forward+backward", _median_ms(loss_fwd_bwd, sync)),
            ("decode(method='path')", _median_ms(decode, sync))]


def run_bench(backend: str = "torch", preset: str = "cityscapes", shape: tuple[int, int, int] = (2, 128, 256),
              scripts: list[Path] | None = None) -> int:
    """Run the checkout's benchmark scripts (``--quick``) or the built-in timing; returns an exit status."""
    scripts = benchmark_scripts() if scripts is None else scripts
    if scripts:
        status = 0
        # The scripts import the checkout's hieraloss even when it is not pip-installed.
        checkout = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": checkout + (os.pathsep + path if path else "")}
        for script in scripts:
            print(f"== {script.name} --quick", flush=True)
            try:
                rc = subprocess.run([sys.executable, str(script), "--quick"], cwd=script.parent.parent,
                                    env=env, timeout=SCRIPT_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                print(f"{script.name}: no result after {SCRIPT_TIMEOUT_S} s", file=sys.stderr)
                rc = 1
            if rc != 0:
                print(f"{script.name} exited with status {rc}", file=sys.stderr)
                status = 1
        return status

    from .. import presets

    hierarchy = presets.load(preset)
    rows = (_builtin_torch if backend == "torch" else _builtin_paddle)(hierarchy, shape)
    b, hgt, wid = shape
    print(f"built-in timing ({backend}): logits [{b}, {hierarchy.num_nodes}, {hgt}, {wid}] float32 "
          f"({preset}), median of 5 runs")
    base = rows[0][1]
    width = max(len(name) for name, _ in rows)
    for name, ms in rows:
        print(f"  {name:<{width}}  {ms:9.2f} ms  {ms / base:7.1f}x the read+write pass")
    return 0
