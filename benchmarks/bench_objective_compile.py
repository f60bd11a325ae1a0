"""Compile cost of the Triton objective without a GPU: the generated kernel (one per tree) against the
table-driven one (``HIERALOSS_TRITON_OBJECTIVE=table``, one per tree depth), as trees grow.

    python benchmarks/bench_objective_compile.py            # every tree, sm_90
    python benchmarks/bench_objective_compile.py --arch 80 --trees cityscapes mapillary

Each (tree, kernel) runs in a process of its own with an empty Triton cache: one ``hssn_loss``
training step (float32, 2 x N x 16 x 16 CPU tensors) under a mocked ``sm_<arch>`` driver
(``_aot.compile_only``), which compiles every kernel the step launches (the objective, the label
count, the gradient scaling) and runs none. The figure is that step's wall time: the cold compile
a first training step pays. For the table kernel the same process then takes a second tree of the
same depth (a full tree of that depth): its time is what a new hierarchy costs once the depth has
been compiled. Also: the generated kernel's source lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def uniform(fan_out: int, depth: int) -> list[int]:
    """Parents of a full tree of ``depth`` levels with ``fan_out`` children per node (leaves first)."""
    levels, start = [], 0
    for d in range(depth, 0, -1):  # leaves first: ids 0..K-1
        n = fan_out ** d
        levels.append(range(start, start + n))
        start += n
    parents = []
    for d, level in enumerate(levels):
        above = levels[d + 1] if d + 1 < len(levels) else None
        parents += [above[i // fan_out] if above is not None else -1 for i in range(len(level))]
    return parents


TREES = {
    "cityscapes": "cityscapes",
    "mapillary": "mapillary_vistas_v2",
    "258 nodes": uniform(6, 3),
    "584 nodes": uniform(8, 3),
}


def _hierarchy(spec):
    from hieraloss import Hierarchy, presets

    return getattr(presets, spec)() if isinstance(spec, str) else Hierarchy(spec)


def _step(h) -> float:
    import torch

    import hieraloss.torch as ht

    x = torch.randn(2, h.num_nodes, 16, 16, requires_grad=True)
    y = torch.tensor(h.node_ids)[torch.randint(0, h.num_nodes, (2, 16, 16))]
    start = time.perf_counter()
    ht.hssn_loss(x, y, h, backend="triton", check_labels=False, ignore_index=-1).backward()
    return time.perf_counter() - start


def child(spec: dict) -> dict:
    """One measurement (in its own process)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["HIERALOSS_TRITON_OBJECTIVE"] = spec["kernel"]
    from hieraloss.torch.kernels import _aot, _codegen

    h = _hierarchy(spec["tree"])
    out = {"nodes": h.num_nodes, "depth": h.max_depth}
    with _aot.compile_only(spec["arch"]):
        out["first"] = _step(h)
        if spec.get("second") is not None:
            out["second"] = _step(_hierarchy(spec["second"]))
    if spec["kernel"] == "generated":
        out["lines"] = len(_codegen.objective_source(h).splitlines())
    return out


def run(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--trees", nargs="*", default=list(TREES), choices=list(TREES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import triton

    print(f"triton {triton.__version__}, sm_{args.arch}, one hssn_loss training step (float32, 2 x N x 16 x 16), "
          "cold Triton cache")
    print("| tree | nodes | depth | generated: lines, first step | table: first step | table: next tree, same depth |")
    print("| --- | --- | --- | --- | --- | --- |")
    second = {2: uniform(10, 2), 3: uniform(5, 3), 4: uniform(3, 4)}  # other trees of the same depths
    for name in args.trees:
        tree = TREES[name]
        gen = run(dict(kernel="generated", tree=tree, arch=args.arch))
        depth = gen.get("depth")
        tab = run(dict(kernel="table", tree=tree, arch=args.arch, second=second.get(depth)))
        if "error" in gen or "error" in tab:
            print(f"| {name} | | | {gen.get('error', '')} | {tab.get('error', '')} | |")
            continue
        nxt = f"{tab['second']:.1f} s" if "second" in tab else ""
        print(f"| {name} | {gen['nodes']} | {depth} | {gen['lines']} lines, {gen['first']:.1f} s "
              f"| {tab['first']:.1f} s | {nxt} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
