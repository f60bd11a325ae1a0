"""Compiled against eager steps on the CPU: torch.compile (static and dynamic shapes) and
paddle.jit.to_static (SOT and full_graph), time and peak memory, forward+backward.

    python benchmarks/bench_compile.py            # Cityscapes, B=2, 26 x 128 x 256
    python benchmarks/bench_compile.py --quick    # B=2, 26 x 32 x 64, fewer repeats

Each case runs in a fresh subprocess: the first call (which compiles) is timed apart, then the best
and median of ``--repeats`` steps; the peak extra memory of those steps is ``VmHWM - VmRSS`` read
after the first call (Linux; the compiler's own memory left out), as a multiple of the logits'
size. Ratios are to the eager step of the same backend, measured in the same run. ``dynamic=True``
runs the vectorized torch ops as one tile for the whole batch (``hieraloss.torch.ops.tree_min.TILE_ELEMENTS_COMPILED``)
and the compiled CPU kernels as custom ops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    # name: (framework, objective, backend, how it is compiled)
    "torch hssn_loss eager (kernel)": ("torch", "hssn", "auto", None),
    "torch hssn_loss compile (kernel op)": ("torch", "hssn", "auto", "static"),
    "torch hssn_loss compile dynamic (kernel op)": ("torch", "hssn", "auto", "dynamic"),
    "torch hssn_loss eager (torch ops)": ("torch", "hssn", "torch", None),
    "torch hssn_loss compile (torch ops)": ("torch", "hssn", "torch", "static"),
    "torch hssn_loss compile dynamic (torch ops, one tile)": ("torch", "hssn", "torch", "dynamic"),
    "torch logicseg_loss eager (kernel)": ("torch", "logicseg", "auto", None),
    "torch logicseg_loss compile (kernel op)": ("torch", "logicseg", "auto", "static"),
    "paddle hssn_loss eager (paddle ops)": ("paddle", "hssn", "paddle", None),
    "paddle hssn_loss to_static SOT": ("paddle", "hssn", "paddle", "sot"),
    "paddle hssn_loss to_static full_graph": ("paddle", "hssn", "paddle", "full_graph"),
}


def _peak_extra() -> tuple[int, int]:
    """(peak, current) resident bytes of this process."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _step_paddle(objective, backend, mode, shape):
    import numpy as np
    import paddle

    import hieraloss
    import hieraloss.paddle as hp

    h = hieraloss.presets.cityscapes()
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(shape[0], h.num_nodes, *shape[1:])).astype("float32")
    y = paddle.to_tensor(rng.integers(0, h.num_leaves, size=shape))
    x = paddle.to_tensor(x_np, stop_gradient=False)

    def loss(logits, labels):
        return hp.hssn_loss(logits, labels, h, backend=backend)

    fn = loss if mode is None else paddle.jit.to_static(loss, full_graph=mode == "full_graph")

    def step():
        x.clear_gradient()
        fn(x, y).backward()
        return float(x.grad.abs().sum())

    return step, x_np.nbytes


def _step_torch(objective, backend, mode, shape):
    import torch

    import hieraloss
    from hieraloss.torch import hssn_loss, logicseg_loss

    torch.manual_seed(0)
    h = hieraloss.presets.cityscapes()
    x = torch.randn(shape[0], h.num_nodes, *shape[1:], requires_grad=True)
    y = torch.randint(0, h.num_leaves, shape)

    def loss(logits, labels):
        if objective == "logicseg":
            return logicseg_loss(logits, labels, h, backend=backend)
        return hssn_loss(logits, labels, h, backend=backend)

    fn = loss if mode is None else torch.compile(loss, fullgraph=True, dynamic=mode == "dynamic")

    def step():
        x.grad = None
        fn(x, y).backward()
        return float(x.grad.abs().sum())

    return step, x.numel() * 4


def _child(name: str, shape: tuple[int, ...], repeats: int) -> dict:
    framework, objective, backend, mode = CASES[name]
    step, logits_bytes = (_step_torch if framework == "torch" else _step_paddle)(objective, backend, mode, shape)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    _reset_peak()  # the steps' own memory, not the compiler's
    base = _peak_extra()[1]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _peak_extra()[0] - base
    return {"first_s": first, "best_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times),
            "peak_over_logits": peak / logits_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (2, 32, 64) if args.quick else (2, 128, 256)
    repeats = args.repeats or (3 if args.quick else 7)
    if args.case:
        print(json.dumps(_child(args.case, shape, repeats)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, Cityscapes logits "
          f"{shape[0]}x26x{shape[1]}x{shape[2]} float32, forward+backward, {repeats} repeats")
    print("| case | first call (compiles) | best / median | vs eager | peak extra / logits |")
    print("| --- | --- | --- | --- | --- |")
    eager = {}
    for name, (framework, objective, backend, mode) in CASES.items():
        quick = ["--quick"] if args.quick else []
        cmd = [sys.executable, __file__, "--case", name, "--repeats", str(repeats), *quick]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        key = (framework, objective, backend)
        if mode is None:
            eager[key] = r["best_ms"]
        ratio = r["best_ms"] / eager[key] if key in eager else float("nan")
        print(f"| {name} | {r['first_s']:.1f} s | {r['best_ms']:.1f} / {r['median_ms']:.1f} ms | {ratio:.2f}x | "
              f"{r['peak_over_logits']:.2f}x |")


if __name__ == "__main__":
    main()
