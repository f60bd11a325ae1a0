"""The GPU comparisons still open, in one command: each variant of the kernels (an option of
``profile_gpu_step.py``) in a process of its own, against the default measured in the same run.

    make gpu-ab                                   # = PYTHONPATH=. python benchmarks/gpu_ab.py
    python benchmarks/gpu_ab.py --list            # the variants and their commands (no GPU needed)
    python benchmarks/gpu_ab.py --only count      # the variants whose name contains "count"

Each figure is the device time of one training step (forward + backward, ``check_labels=False``,
the sizes of ``gpu_check.py``): the sum of its kernels' times under ``torch.profiler``, per step, over
``--iters`` steps (``profile_gpu_step.py --summary``). The default runs first and last; the table
gives each variant's time over the first default's and the last default's over the first (the drift
of the run). A variant that fails or runs out of time is reported, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_gpu_step import SUMMARY  # noqa: E402

CS, CS_FOCAL = "cityscapes tree-min", "cityscapes focal tree-min"
CS_HSSN, CS_FOCAL_HSSN = "cityscapes hssn_loss", "cityscapes focal hssn_loss"
MV, MV_FOCAL = "mapillary tree-min", "mapillary focal tree-min"
DEFAULT_STEPS = (CS, CS_FOCAL, CS_HSSN, CS_FOCAL_HSSN, MV, MV_FOCAL)

# (name, profile_gpu_step.py options, steps, the question it answers)
VARIANTS = (
    ("default", (), DEFAULT_STEPS, "focal / plain (goal <= 1.2 on Mapillary)"),
    ("plain math", ("--plain-math",), (CS, MV, MV_FOCAL), "tl.exp and a division against the ftz MUFU ops"),
    ("small-tree maxnreg 80", ("--small-maxnreg", "80"), (CS, CS_HSSN, CS_FOCAL_HSSN),
     "no spill at 80 registers against a few spilled values at 72"),
    ("table-driven objective", ("--table-objective",), DEFAULT_STEPS,
     "the table-driven objective kernel (one per tree depth, zmax in a scratch buffer) against the generated one"),
    ("count in kernel", ("--count-in-kernel",), (CS, CS_HSSN, MV),
     "the label count inside the objective launch (spin-wait) against a launch of its own (the default)"),
    ("count in kernel, chunk 2048", ("--count-in-kernel", "--count-chunk", "2048"), (CS, MV),
     "labels per chunk of the in-kernel count (4096)"),
    ("count in kernel, chunk 8192", ("--count-in-kernel", "--count-chunk", "8192"), (CS, MV),
     "labels per chunk of the in-kernel count (4096)"),
    ("default, again", (), DEFAULT_STEPS, "the drift of the run"),
)


def command(options, steps, iters: int) -> list[str]:
    return [sys.executable, "benchmarks/profile_gpu_step.py", "--summary", "--exact", "--iters", str(iters),
            *options, *steps]


def parse(stdout: str) -> dict[str, float]:
    """``{step: device ms per step}`` from ``profile_gpu_step.py --summary``'s output."""
    times = {}
    for line in stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == SUMMARY:
            times[fields[1]] = float(fields[2])
    return times


def table(results: dict[str, dict[str, float]], steps=DEFAULT_STEPS) -> list[str]:
    """Markdown rows: each step's device ms per variant, and its ratio to the first default."""
    names = [name for name, *_ in VARIANTS if name in results]
    base = results.get("default", {})
    lines = ["| step | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for step in steps:
        cells = []
        for name in names:
            ms = results[name].get(step)
            if ms is None:
                cells.append("")
            elif name != "default" and step in base:
                cells.append(f"{ms:.3f} ms ({ms / base[step]:.3f}x)")
            else:
                cells.append(f"{ms:.3f} ms")
        if any(cells):
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for name in names:
        r = results[name]
        for plain, focal in ((CS, CS_FOCAL), (CS_HSSN, CS_FOCAL_HSSN), (MV, MV_FOCAL)):
            if plain in r and focal in r:
                lines.append(f"{name}: {focal} / {plain} = {r[focal] / r[plain]:.3f}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the variants and their commands, run nothing")
    ap.add_argument("--only", action="append", default=[], help="variants whose name contains this (repeatable)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=120, help="seconds per variant")
    ap.add_argument("--budget", type=int, default=300, help="seconds for all of them: later ones are skipped")
    args = ap.parse_args(argv)
    chosen = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only)]
    if args.list:
        for name, options, steps, question in chosen:
            print(f"{name}: {question}\n  $ " + " ".join(repr(a) if " " in a else a
                                                       for a in command(options, steps, args.iters)[1:]))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start, results, failed = time.time(), {}, []
    for i, (name, options, steps, question) in enumerate(chosen):
        left = args.budget - (time.time() - start)
        if left < (30 if i == len(chosen) - 1 else 90):  # keeps a minute for the last (the default again)
            failed.append(f"{name}: skipped, {args.budget} s budget spent")
            continue
        t = time.time()
        try:
            proc = subprocess.run(command(options, steps, args.iters), cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=min(args.timeout, left))
        except subprocess.TimeoutExpired:
            failed.append(f"{name}: timed out after {time.time() - t:.0f} s")
            continue
        times = parse(proc.stdout)
        print(f"{name} [{question}] ({time.time() - t:.0f} s, exit {proc.returncode}): "
              + ", ".join(f"{s} {ms:.3f} ms" for s, ms in times.items()), flush=True)
        if proc.returncode != 0 or set(times) != set(steps):
            failed.append(f"{name}: exit {proc.returncode}, steps {sorted(times)}\n"
                          + (proc.stdout + proc.stderr)[-2000:])
        if times:
            results[name] = times
    print()
    print("\n".join(table(results)) if results else "no variant gave a time")
    if "default" in results and "default, again" in results:
        first, last = results["default"], results["default, again"]
        print("drift (last default / first): " + ", ".join(f"{s} {last[s] / first[s]:.3f}"
                                                          for s in first if s in last))
    for line in failed:
        print("FAILED " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
