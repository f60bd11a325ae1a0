"""Where the time of one GPU training step goes: the CUDA kernels of each loss step, by device time.

    PYTHONPATH=. python benchmarks/profile_gpu_step.py            # every step below
    PYTHONPATH=. python benchmarks/profile_gpu_step.py triplet    # the steps whose name contains "triplet"
    PYTHONPATH=. python benchmarks/profile_gpu_step.py --host     # host (Python) time per step, cProfile
    PYTHONPATH=. python benchmarks/profile_gpu_step.py --launch-cost   # host time: Triton launches against the rest
    PYTHONPATH=. python benchmarks/profile_gpu_step.py --summary --exact "mapillary tree-min"  # one line per step

Each step (forward + backward, ``check_labels=False``, the sizes of ``gpu_check.py``) runs a few times
to warm up, then ``--iters`` times under ``torch.profiler``; the table lists the kernels with the most
device time (per call: divide by ``--iters``); ``--summary`` prints instead one line per step, its
kernels' device time per step (``benchmarks/gpu_ab.py`` reads those). Needs a CUDA device;
complements ``gpu_check.py``, which gives the totals.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SUMMARY = "step-device-ms"


def steps():
    import torch

    import hieraloss.torch as hlt
    from hieraloss import presets

    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(backend="triton", check_labels=False)

    def data(h, B, H=512, W=1024):
        x = torch.randn(B, h.num_nodes, H, W, device="cuda", generator=gen).requires_grad_(True)
        y = torch.randint(0, h.num_leaves, (B, H, W), device="cuda", generator=gen)
        return x, y

    def step(fn, *leaves):
        def run():
            for t in leaves:
                t.grad = None
            fn().backward()
        return run

    cs = presets.cityscapes()
    x, y = data(cs, 8)
    emb = torch.randn(8, 256, 64, 128, device="cuda", generator=gen).requires_grad_(True)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    yield "cityscapes tree-min", step(lambda: hlt.tree_min_loss(x, y, cs, reduction="hssn", **kw), x)
    yield "cityscapes focal tree-min", step(lambda: hlt.focal_tree_min_loss(x, y, cs, reduction="hssn", **kw), x)
    yield "cityscapes tree-min bfloat16", step(lambda: hlt.tree_min_loss(xb, y, cs, reduction="hssn", **kw), xb)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    yield "cityscapes tree-min channels_last", step(lambda: hlt.tree_min_loss(xc, y, cs, reduction="hssn", **kw), xc)
    xc = None
    yield "cityscapes depth_cross_entropy 1", step(lambda: hlt.depth_cross_entropy(x, y, cs, 1, **kw), x)
    yield "cityscapes triplet", step(lambda: hlt.hierarchy_triplet_loss(emb, y, cs, sampling="first",
                                                                                 check_labels=False), emb)
    yield "cityscapes hssn_loss", step(lambda: hlt.hssn_loss(x, y, cs, **kw), x)
    yield "cityscapes focal hssn_loss", step(lambda: hlt.hssn_loss(x, y, cs, focal_gamma=2.0, **kw), x)
    yield "cityscapes hssn_loss + embeddings", step(
        lambda: hlt.hssn_loss(x, y, cs, embeddings=emb, triplet_weight=0.5, sampling="first", **kw), x, emb)
    x = xb = emb = None
    mv = presets.mapillary_vistas_v2()
    x, y = data(mv, 4)
    yield "mapillary tree-min", step(lambda: hlt.tree_min_loss(x, y, mv, reduction="hssn", **kw), x)
    yield "mapillary focal tree-min", step(lambda: hlt.focal_tree_min_loss(x, y, mv, reduction="hssn", **kw), x)


def host_profile(name, run, rows: int) -> None:
    """Host (Python) time of a step, and where it goes: the step's launches are queued without a sync
    in between, so the time is the host's; then cProfile of the same steps."""
    import cProfile
    import pstats
    import time

    import torch

    def timed(n):
        t = time.perf_counter()
        for _ in range(n):
            run()
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        return host / n

    host = min(timed(20) for _ in range(5))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        run()
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n## {name}: host {host * 1e3:.3f} ms per step (best of 5 x 20, no sync in between)", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def launch_costs(name, run, n: int = 50) -> None:
    """Where a step's host time goes: the step, the step with every Triton launch stubbed out (what
    is left is hieraloss's Python, torch's ops and autograd), and each Triton launch replayed alone
    with the step's arguments, whole and its Python part alone (binder, cache key and lookup:
    ``warmup=True``, which stops before the driver call). Replayed launches reuse the step's
    workspace, so their results are garbage; only times are read."""
    import torch
    from gpu_check import best_time, replay, triton_launches
    from triton.runtime.jit import JITFunction

    def ms(fn):
        return best_time(fn, n, torch.cuda.synchronize) * 1e3

    step = ms(run)
    real = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        stubbed = ms(run)
    finally:
        JITFunction.run = real
    recorded = triton_launches(run)
    torch.cuda.synchronize()
    print(f"\n## {name}: host ms per step {step:.3f}, with the Triton launches stubbed out {stubbed:.3f}",
          flush=True)
    for record in recorded:
        whole, python = ms(replay(record, warmup=False)), ms(replay(record, warmup=True))
        print(f"  {record[0].fn.__name__:<24} {len(record[1])} arguments: launch {whole:.3f} ms, of which "
              f"Triton's Python {python:.3f} ms", flush=True)


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="substrings of the step names to run")
    ap.add_argument("--exact", action="store_true", help="the names given are whole step names")
    ap.add_argument("--summary", action="store_true",
                    help=f"one line per step instead of the table: '{SUMMARY}<TAB>step<TAB>device ms per step'")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--block-p", type=int, help="pixels per program of the objective kernel (default: automatic)")
    ap.add_argument("--warps", type=int, help="warps per program of the objective kernel")
    ap.add_argument("--host", action="store_true",
                    help="host time instead: Python time per step (GPU kept busy) and a cProfile of the step")
    ap.add_argument("--launch-cost", action="store_true",
                    help="host time of each step with its Triton launches stubbed out, and of each launch alone")
    ap.add_argument("--maxnreg", type=int,
                    help="register cap of the objective kernel of wide trees (_common.MAX_REGISTERS; 0: none)")
    ap.add_argument("--small-maxnreg", type=int,
                    help="register cap of the objective kernel of small trees (none by default; triton 3.6: 80 "
                         "takes the spills out of Cityscapes' hssn_loss kernels)")
    ap.add_argument("--load-group", type=int,
                    help="node loads in flight together (every _codegen load group: plain, focal, wide trees)")
    ap.add_argument("--focal-exp", action="store_true",
                    help="focal kernels take sigmoid^gamma as one exp for every gamma (A/B of the products)")
    ap.add_argument("--plain-math", action="store_true",
                    help="tree-min terms with tl.exp and a division instead of the ftz MUFU ops (A/B of _terms.exp "
                         "and _terms.reciprocal)")
    ap.add_argument("--count-chunk", type=int,
                    help="labels per chunk of the objective kernel's label count (_reduce.COUNT_CHUNK; a power of 2)")
    ap.add_argument("--table-objective", action="store_true",
                    help="the table-driven objective kernel (HIERALOSS_TRITON_OBJECTIVE=table), not the generated one")
    ap.add_argument("--count-in-kernel", action="store_true",
                    help="count the labels inside the objective kernel's launch (its spin-wait), not in a launch "
                         "of their own before it (the default)")
    args = ap.parse_args(argv)
    if args.count_in_kernel:
        os.environ["HIERALOSS_LABEL_COUNT"] = "in-kernel"
        print("label count: inside the objective kernel's launch (spin-wait)")
    if args.table_objective:
        os.environ["HIERALOSS_TRITON_OBJECTIVE"] = "table"
        print("objective kernel: the table-driven one (one kernel per tree depth)")
    if args.count_chunk:
        os.environ["HIERALOSS_TRITON_LABEL_CHUNK"] = str(args.count_chunk)
        print(f"objective kernel: label count in chunks of {args.count_chunk} labels")
    if args.plain_math:
        from hieraloss.torch.kernels import _terms

        _terms.exp, _terms.reciprocal = _terms.plain_exp, _terms.plain_reciprocal
        print("tree-min terms: tl.exp and 1.0 / x")
    if args.focal_exp:
        from hieraloss.torch.kernels import objective

        objective.focal_code = lambda gamma: 0 if float(gamma) == 0.0 else -1
        print("focal kernels: sigmoid^gamma as one exp")
    if args.load_group:
        from hieraloss.torch.kernels import _codegen

        _codegen.LOAD_GROUP = _codegen.FOCAL_LOAD_GROUP = _codegen.WIDE_TREE_LOAD_GROUP = args.load_group
        print(f"objective kernel: LOAD_GROUP {args.load_group} (focal too)")
    if args.maxnreg is not None:
        from hieraloss.torch.kernels import _common

        _common.MAX_REGISTERS, _common._CAP_REGISTERS = args.maxnreg, args.maxnreg > 0
        print(f"objective kernel of wide trees: maxnreg {args.maxnreg or 'none'}")
    if args.small_maxnreg:
        from hieraloss.torch.kernels import _common, objective

        wide_cap = objective.register_cap
        objective.register_cap = lambda num_nodes: (
            wide_cap(num_nodes) if num_nodes > _common.WIDE_TREE_NODES else {"maxnreg": args.small_maxnreg})
        print(f"objective kernel of small trees: maxnreg {args.small_maxnreg}")
    if args.block_p or args.warps:
        from hieraloss.torch.kernels import objective

        auto = objective.launch_sizes

        def sizes(num_nodes, num_pixels):
            bp, w = auto(num_nodes, num_pixels)
            return args.block_p or bp, args.warps or w
        objective.launch_sizes = sizes
        print(f"objective kernel: BLOCK_P {args.block_p or 'auto'}, warps {args.warps or 'auto'}")
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    for name, run in steps():
        if args.only and not any(s == name if args.exact else s in name for s in args.only):
            continue
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        if args.host:
            host_profile(name, run, args.rows)
            continue
        if args.launch_cost:
            launch_costs(name, run)
            continue
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                run()
            torch.cuda.synchronize()
        events = prof.key_averages()
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        if args.summary:
            from torch.autograd import DeviceType

            # the device's own rows (kernels, memsets): a host op's row would count its kernels again
            total_us = sum(getattr(e, key) for e in events if e.device_type == DeviceType.CUDA)
            if total_us <= 0:
                print(f"{name}: the profiler recorded no device time", flush=True)
                return 1
            print(f"{SUMMARY}\t{name}\t{total_us / args.iters / 1e3:.4f}", flush=True)
            continue
        print(f"\n## {name} ({args.iters} steps)", flush=True)
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=70), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
