"""LogicSeg's objective against hssn_loss (no embeddings) on the CPU: time and peak memory.

    python benchmarks/bench_logicseg.py              # Cityscapes B=2 26x512x1024, then the scaling table
    python benchmarks/bench_logicseg.py --quick      # small sizes
    python benchmarks/bench_logicseg.py --no-scaling --no-memory

All in one run, forward+backward, best and median of ``--repeats``:

* ``hssn_loss(x, y, h)`` (``backend="auto"``: the compiled CPU kernel when it is built);
* ``logicseg_loss(x, y, h, step=None)``: the paper's form (sibling exclusion, rules at full weight);
* ``logicseg_loss(..., exclusion="level", easy_filter=True)``: the release's form;
* the asymmetric BCE alone (compiled kernel) and the three rule functions alone (they run as torch
  ops: only ``logicseg_loss`` takes them to the kernel);
* one ``dst.copy_(src)`` pass over the logits, for scale.

Each is printed with its ratio to ``hssn_loss`` measured in the same run. Peak extra memory: each
measurement runs in a fresh subprocess that resets the peak-RSS counter and reads ``VmHWM - VmRSS``
(Linux), as a multiple of the logits' size. The scaling table times the LogicSeg objective on
synthetic trees (two levels of ``b`` x ``b`` nodes; a chain of depths) and pixel counts, against
``hssn_loss`` on the same input.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hieraloss  # noqa: E402
import hieraloss.torch as ht  # noqa: E402


def inputs(h, batch: int, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h.num_nodes, height, width, generator=gen) * 2
    y = torch.randint(0, h.num_leaves, (batch, height, width), generator=gen)
    y[:, : height // 16] = 255
    return x, y


CASES = {
    "hssn_loss": lambda x, y, h: ht.hssn_loss(x, y, h),
    "logicseg_loss": lambda x, y, h: ht.logicseg_loss(x, y, h, step=None),
    "logicseg_loss release form": lambda x, y, h: ht.logicseg_loss(x, y, h, step=None, exclusion="level",
                                                                   easy_filter=True),
    "asymmetric_bce_loss": lambda x, y, h: ht.asymmetric_bce_loss(x, y, h),
    "three rules (torch ops)": lambda x, y, h: (ht.child_implies_parent_loss(x, h) + ht.parent_implies_child_loss(x, h)
                                    + ht.exclusion_loss(x, h)),
}


def step_time(fn, x, y, h, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):
        xg = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        fn(xg, y, h).backward()
        if i:  # the first call warms the caches
            times.append(time.perf_counter() - t0)
    return times


def copy_time(x, repeats: int) -> list[float]:
    dst = torch.empty_like(x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(x)
        out.append(time.perf_counter() - t0)
    return out


def peak_memory(case: str, preset: str, batch: int, height: int, width: int) -> float:
    """Peak extra resident memory of one forward+backward, in multiples of the logits' size."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import hieraloss
from bench_logicseg import CASES, inputs
h = hieraloss.presets.get({preset!r})
x, y = inputs(h, {batch}, {height}, {width})
small_x, small_y = inputs(h, 1, 8, 8)
CASES[{case!r}](small_x.requires_grad_(True), small_y, h).backward()
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')
before = rss('VmRSS')
xg = x.requires_grad_(True)
CASES[{case!r}](xg, y, h).backward()
print((rss('VmHWM') - before) / (x.numel() * x.element_size()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def taxonomy(branching: int, depth: int) -> hieraloss.Hierarchy:
    """A balanced tree of ``branching`` children per internal node and ``depth`` levels."""
    paths = [[f"n{i}"] for i in range(branching)]
    for _ in range(depth - 1):
        paths = [p + [f"{p[-1]}_{i}"] for p in paths for i in range(branching)]
    return hieraloss.Hierarchy.from_names(["--".join(p) for p in paths])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    height, width = (64, 128) if args.quick else (512, 1024)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, native kernel: {hieraloss._native.available()}")
    h = hieraloss.presets.cityscapes()
    x, y = inputs(h, 2, height, width)
    results = {"shape": list(x.shape), "cases": {}}
    base = None
    print(f"\nCityscapes B=2 26x{height}x{width}, forward+backward, best / median of {args.repeats} (s)")
    for name, fn in CASES.items():
        t = step_time(fn, x, y, h, args.repeats)
        best, med = min(t), statistics.median(t)
        if base is None:
            base = (best, med)
        row = {"best": best, "median": med, "vs_hssn_best": best / base[0], "vs_hssn_median": med / base[1]}
        if not args.no_memory:
            row["peak_extra_memory_x_logits"] = peak_memory(name, "cityscapes", 2, height, width)
        results["cases"][name] = row
        mem = f", peak {row['peak_extra_memory_x_logits']:.2f}x logits" if "peak_extra_memory_x_logits" in row else ""
        print(f"  {name:<28} {best:.4f} / {med:.4f}   {best / base[0]:.2f}x / {med / base[1]:.2f}x hssn_loss{mem}")
    c = copy_time(x, args.repeats)
    print(f"  {'one copy of the logits':<28} {min(c):.4f} / {statistics.median(c):.4f}")
    results["copy"] = {"best": min(c), "median": statistics.median(c)}

    if not args.no_scaling:
        print("\nscaling: logicseg_loss / hssn_loss, best of 3, forward+backward")
        size = (32, 64) if args.quick else (128, 256)
        rows = []
        for label, tree in [("2 levels, 4x4", taxonomy(4, 2)), ("2 levels, 8x8", taxonomy(8, 2)),
                            ("2 levels, 12x12", taxonomy(12, 2)), ("3 levels, 4x4x4", taxonomy(4, 3)),
                            ("4 levels, 3^4", taxonomy(3, 4))]:
            for hw in (size, (size[0] * 2, size[1] * 2)):
                xs, ys = inputs(tree, 1, *hw)
                t_l = min(step_time(CASES["logicseg_loss"], xs, ys, tree, 3))
                t_h = min(step_time(CASES["hssn_loss"], xs, ys, tree, 3))
                rows.append({"tree": label, "nodes": tree.num_nodes, "depth": tree.max_depth, "pixels": hw[0] * hw[1],
                             "logicseg_s": t_l, "hssn_s": t_h})
                print(f"  {label:<16} N={tree.num_nodes:<4} {hw[0]}x{hw[1]:<5} logicseg {t_l:.4f} s, hssn {t_h:.4f} s, "
                      f"{t_l / t_h:.2f}x")
        results["scaling"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
