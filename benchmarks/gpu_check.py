"""One GPU check: the GPU tests, then the training-step table of issue 12, in a few minutes.

    make gpu-check                                  # = PYTHONPATH=. python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --skip-tests     # the table only
    python benchmarks/gpu_check.py --smoke          # no GPU: tiny sizes on the CPU under the Triton
                                                    # interpreter, to check that the script runs

Imports the library from the checkout, needs no network and installs nothing. Times are CUDA-event
medians of forward+backward steps; every ratio is to one copy of the logits (``dst.copy_(src)``)
measured in the same run. Rows:

* Cityscapes B=8, 26x512x1024 float32 (256-d embeddings at 64x128): tree-min (``reduction="hssn"``),
  ``depth_cross_entropy`` per depth against ``F.cross_entropy`` over the same channels, the triplet
  term, ``hssn_loss`` without / with embeddings, and the published-style tree-min loss
  (``benchmarks/published_hssn.py``) plus ``F.cross_entropy`` per depth as the published objective;
  bfloat16 logits; focal vs plain;
* Mapillary Vistas B=4, 149x512x1024: tree-min plain and focal;
* decoding (``path``, ``top_down``) on both;
* the triplet term on the fused kernels and on the torch ops;
* host syncs of a ``hssn_loss`` step with embeddings and ``check_labels=False`` (``torch.cuda.set_sync_debug_mode``
  raises on any), whether that step captures into a CUDA graph, and peak extra memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_gpu_tests() -> int:
    env = dict(os.environ, HIERALOSS_GPU_TESTS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
           "tests/kernels/test_kernels_triton.py", "tests/kernels/test_kernels_triplet.py",
           "tests/kernels/test_kernels_table.py", "tests/conformance/test_conformance_triton.py"]
    try:
        import xdist  # noqa: F401 - compiles run in parallel workers

        cmd += ["-n", "8"]
    except ImportError:
        pass
    print("$ HIERALOSS_GPU_TESTS=1 " + " ".join(cmd[1:]), flush=True)
    t = time.time()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    print(f"GPU tests: exit {rc} in {time.time() - t:.0f} s", flush=True)
    return rc


class Timer:
    def __init__(self, device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn) -> float:
        """Median seconds of ``fn()``."""
        import torch

        for _ in range(self.warmup):
            fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(self.iters):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def peak_extra(fn, device) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def best_time(fn, n: int, sync=lambda: None) -> float:
    """Seconds per call of ``fn``: the best of 5 rounds of ``n`` calls, ``sync()`` after each round
    (host time when nothing syncs inside a round)."""
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
        sync()
    return min(times)


def triton_launches(run, *, launch: bool = True) -> list[tuple]:
    """``run()`` once, recording its Triton launches as ``(kernel, args, grid, kwargs)``; with
    ``launch=False`` each stops before the driver call (``warmup=True``: binder, cache key, lookup).
    :func:`replay` launches one again."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run
    recorded = []

    def recording(self, *args, grid, warmup, **kwargs):
        recorded.append((self, args, grid, kwargs))
        return real(self, *args, grid=grid, warmup=warmup or not launch, **kwargs)

    JITFunction.run = recording
    try:
        run()
    finally:
        JITFunction.run = real
    return recorded


def replay(record, *, warmup: bool):
    """A call that repeats one launch :func:`triton_launches` recorded."""
    kernel, args, grid, kwargs = record
    return lambda: kernel.run(*args, grid=grid, warmup=warmup, **kwargs)


GROUPS = ("cs-treemin", "cs-focal", "cs-ce", "cs-triplet", "cs-hssn", "cs-bf16", "cs-decode",
          "mp-treemin", "mp-focal", "mp-decode")


def warm_up(jobs: int) -> None:
    """Compile every kernel the table launches, one process per group, so compiles run in parallel.

    Triton's on-disk cache is shared between processes; each group runs its steps once on the table's
    own shapes, so the timed run finds every specialisation compiled.
    """
    t = time.time()
    procs, pending = [], list(GROUPS)
    while pending or procs:
        while pending and len(procs) < jobs:
            g = pending.pop(0)
            procs.append((g, subprocess.Popen([sys.executable, __file__, "--skip-tests", "--warm-only", g],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        g, p = procs.pop(0)
        err = p.communicate()[1]
        if p.returncode:
            print(f"warm-up {g}: exit {p.returncode}: {err.decode()[-600:]}", flush=True)
    print(f"kernels compiled in {time.time() - t:.0f} s ({jobs} processes)", flush=True)


def graph_step(loss_fn, x):
    """A CUDA graph of one forward+backward (``torch.autograd.grad`` for ``x``, a tensor or a tuple),
    to time the device work without Python's launch overhead; None when capture fails."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                torch.autograd.grad(loss_fn(), x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.autograd.grad(loss_fn(), x)
        return graph.replay
    except Exception as exc:  # noqa: BLE001 - reported as a missing row
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:100]})", flush=True)
        return None


def table(args) -> None:
    import torch
    import torch.nn.functional as F
    import triton
    from published_hssn import published_tree_min_loss

    import hieraloss.torch as hlt
    from hieraloss import presets
    from hieraloss.torch import kernels

    dev = "cpu" if args.smoke else "cuda"
    warm = args.warm_only is not None

    def want(group):
        return not warm or group == args.warm_only

    if warm:
        def timer(fn):
            fn()
            return 1.0
    else:
        timer = Timer(dev, 1 if args.smoke else 3, 1 if args.smoke else args.iters)
        name = "CPU (Triton interpreter, smoke sizes)" if args.smoke else torch.cuda.get_device_name()
        print(f"\ndevice: {name}; torch {torch.__version__}; triton {triton.__version__}; "
              f"triton kernels available: {kernels.triton_available()}", flush=True)
    B, H, W, e_hw = (2, 8, 16, (4, 4)) if args.smoke else (8, 512, 1024, (64, 128))
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: list[tuple[str, str, str, str]] = []

    def add(r):
        rows.append(r)
        if not warm:
            print("  " + " | ".join(r), flush=True)

    def row(what, ms_ours, copy, ms_pub=None, note=""):
        pub = "" if ms_pub is None else f"{ms_pub * 1e3:.2f} ms (= {ms_pub / ms_ours:.2f}x ours)"
        add((what, f"{ms_ours * 1e3:.3f} ms", f"{ms_ours / copy:.1f}x", pub + note))

    def step(fn, x):
        def run():
            x.grad = None
            fn().backward()
        return run

    def graph_row(what, loss_fn, x, copy, note=""):
        """Adds the row and returns the device time (None without a GPU or a graph)."""
        if dev != "cuda" or warm:
            return None
        replay = graph_step(loss_fn, x)
        if replay is None:
            return None
        t = timer(replay)
        row(what + ", CUDA graph replay (device time)", t, copy, note=note(t) if callable(note) else note)
        return t

    def count_apart_row(what, loss_fn, x, copy, g_in):
        """The A/B of the label count: the same step with the count inside the objective's launch
        (HIERALOSS_LABEL_COUNT=in-kernel, its spin-wait; the same bits) against the default, a launch
        of its own before it."""
        previous = os.environ.get("HIERALOSS_LABEL_COUNT")
        os.environ["HIERALOSS_LABEL_COUNT"] = "in-kernel"
        try:
            graph_row(what + ", label count inside the objective's launch", loss_fn, x, copy,
                      note=lambda t: f" (count as a launch of its own: {g_in * 1e3:.3f} ms)" if g_in else "")
        finally:
            if previous is None:
                os.environ.pop("HIERALOSS_LABEL_COUNT")
            else:
                os.environ["HIERALOSS_LABEL_COUNT"] = previous

    # ------------------------------------------------------------------ Cityscapes
    h = presets.cityscapes()
    x = torch.randn(B, h.num_nodes, H, W, device=dev, generator=gen).requires_grad_(True)
    y = torch.randint(0, h.num_leaves, (B, H, W), device=dev, generator=gen)
    y[:, :2] = 255
    emb = torch.randn(B, 256, *e_hw, device=dev, generator=gen).requires_grad_(True)
    src = x.detach()
    dst = torch.empty_like(src)
    if dev == "cuda" and not warm:
        # The GPU idles at low clocks while the kernels compile: keep it busy for a second first,
        # or the first rows are timed during the clock ramp (seen: tree-min 1.6 ms first, 0.94 later).
        t_end = time.perf_counter() + 1.0
        while time.perf_counter() < t_end:
            for _ in range(20):
                dst.copy_(src)
            torch.cuda.synchronize()
    copy = timer(lambda: dst.copy_(src))
    add(("one copy of the logits (Cityscapes)", f"{copy * 1e3:.3f} ms", "1.0x", ""))
    kw = dict(backend="triton", check_labels=False)
    tm = step(lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x)
    t_tm = t_pub_tm = 1.0
    g_tm = None
    if want("cs-treemin"):
        t_tm = timer(tm)
        t_pub_tm = 1.0 if warm else timer(step(lambda: published_tree_min_loss(x, y, h), x))
        row("tree-min hssn fwd+bwd", t_tm, copy, t_pub_tm)
        g_tm = graph_row("tree-min hssn fwd+bwd", lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x,
                         copy)
        count_apart_row("tree-min hssn fwd+bwd", lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x, copy,
                        g_tm)
        # Logits from a channels_last model (common with AMP convolutions): the kernel reads them as
        # they are, node loads strided by the channel count, no copy.
        x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
        row("tree-min hssn fwd+bwd, channels_last logits",
            timer(step(lambda: hlt.tree_min_loss(x_cl, y, h, reduction="hssn", **kw), x_cl)), copy)
        graph_row("tree-min hssn fwd+bwd, channels_last logits",
                  lambda: hlt.tree_min_loss(x_cl, y, h, reduction="hssn", **kw), x_cl, copy,
                  note=lambda t: f" (contiguous: {g_tm * 1e3:.3f} ms)" if g_tm else "")
        x_cl = None
        # One pixel per image (hierarchical classification, point-sampled logits [points, N]): the
        # kernels run the points as the pixels of one image. Its ratio is to a copy of these logits.
        pts = torch.randn(B * H * W // 16, h.num_nodes, device=dev, generator=gen).requires_grad_(True)
        y_pts = y.reshape(-1)[: pts.shape[0]].clone()
        pts_src = pts.detach()
        pts_dst = torch.empty_like(pts_src)
        copy_pts = timer(lambda: pts_dst.copy_(pts_src))
        what = f"tree-min hssn fwd+bwd, one pixel per image ({pts.shape[0]} x {h.num_nodes} logits)"
        row(what, timer(step(lambda: hlt.tree_min_loss(pts, y_pts, h, reduction="hssn", **kw), pts)), copy_pts,
            note=f" (their copy: {copy_pts * 1e3:.3f} ms)")
        graph_row(what, lambda: hlt.tree_min_loss(pts, y_pts, h, reduction="hssn", **kw), pts, copy_pts)
    if want("cs-focal"):
        t_focal = timer(step(lambda: hlt.focal_tree_min_loss(x, y, h, reduction="hssn", **kw), x))
        row("focal tree-min fwd+bwd", t_focal, copy, note=f" (focal / plain {t_focal / t_tm:.2f})")
        graph_row("focal tree-min fwd+bwd", lambda: hlt.focal_tree_min_loss(x, y, h, reduction="hssn", **kw), x,
                  copy, note=lambda t: f" (focal / plain {t / g_tm:.2f})" if g_tm else "")
    t_plain = {1: 1.0, 2: 1.0}
    if want("cs-ce"):
        leaf_ch = torch.tensor(list(h.depth_channels[-1]), device=dev)
        cat_ch = torch.tensor(list(h.depth_channels[0]), device=dev)
        cat_of_leaf = torch.tensor(h.ancestor_table[:, 0].tolist(), device=dev)
        pos = torch.full((h.num_nodes,), -100, dtype=torch.int64, device=dev)
        pos[cat_ch] = torch.arange(cat_ch.numel(), device=dev)
        y_cat = torch.where(y == 255, -100, pos[cat_of_leaf[y.clamp_max(h.num_nodes - 1)]])
        y_leaf = torch.where(y == 255, -100, y)
        plain = {1: lambda: F.cross_entropy(x[:, cat_ch], y_cat, ignore_index=-100),
                 2: lambda: F.cross_entropy(x[:, leaf_ch], y_leaf, ignore_index=-100)}
        for d in (1, 2):
            t_plain[d] = 1.0 if warm else timer(step(plain[d], x))
            row(f"depth_cross_entropy depth {d}",
                timer(step(lambda d=d: hlt.depth_cross_entropy(x, y, h, d, **kw), x)),
                copy, t_plain[d], note=" (F.cross_entropy)")
    if want("cs-triplet"):
        def triplet(backend):
            return lambda: hlt.hierarchy_triplet_loss(emb, y, h, sampling="first", check_labels=False, backend=backend)
        t_ops = timer(step(triplet("torch"), emb))
        row("triplet, torch ops (256-d, embeddings only)", t_ops, copy)
        g_ops = graph_row("triplet, torch ops", triplet("torch"), emb, copy)
        row("triplet, fused kernels", timer(step(triplet("triton"), emb)), copy, t_ops, note=" (torch ops)")
        graph_row("triplet, fused kernels", triplet("triton"), emb, copy,
                  note=lambda t: f"{g_ops * 1e3:.2f} ms (= {g_ops / t:.2f}x ours) (torch ops)" if g_ops else "")
    if want("cs-hssn"):
        t_obj = timer(step(lambda: hlt.hssn_loss(x, y, h, **kw), x))
        row("hssn_loss without embeddings", t_obj, copy, t_pub_tm + t_plain[1] + t_plain[2],
            note=" (published TM + F.cross_entropy x2)")
        graph_row("hssn_loss without embeddings", lambda: hlt.hssn_loss(x, y, h, **kw), x, copy)

        def full():
            x.grad = None
            emb.grad = None
            hlt.hssn_loss(x, y, h, embeddings=emb, triplet_weight=0.5, sampling="first", **kw).backward()
        row("hssn_loss with embeddings", timer(full), copy)
        graph_row("hssn_loss with embeddings", lambda: hlt.hssn_loss(x, y, h, embeddings=emb, triplet_weight=0.5,
                                                                     sampling="first", **kw), (x, emb), copy)
    if not warm:
        peak = peak_extra(tm, dev)
        if peak is not None:
            add(("peak extra memory, tree-min step", f"{peak / 2**20:.0f} MiB",
                 f"{peak / (x.numel() * x.element_size()):.2f}x logits", ""))
    if want("cs-bf16"):
        xb = x.detach().to(torch.bfloat16).requires_grad_(True)
        row("tree-min hssn, bfloat16 logits",
            timer(step(lambda: hlt.tree_min_loss(xb, y, h, reduction="hssn", **kw), xb)), copy,
            note=f" (float32: {t_tm * 1e3:.3f} ms)")
        graph_row("tree-min hssn, bfloat16 logits",
                  lambda: hlt.tree_min_loss(xb, y, h, reduction="hssn", **kw), xb, copy,
                  note=lambda t: f" (float32: {g_tm * 1e3:.3f} ms)" if g_tm else "")
        xb = None
    if want("cs-decode"):
        for method in ("path", "top_down"):
            row(f"decode {method}", timer(lambda m=method: hlt.decode(src, h, m, backend="triton")), copy)
    if dev == "cuda" and not warm:
        syncs = "0 (set_sync_debug_mode raised nothing)"

        def whole():  # the whole objective, embeddings included
            return hlt.hssn_loss(x, y, h, embeddings=emb, triplet_weight=0.5, sampling="first", **kw)
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.autograd.grad(whole(), (x, emb))
            torch.cuda.synchronize()
        except RuntimeError as exc:
            syncs = f"a sync: {str(exc)[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    torch.autograd.grad(whole(), (x, emb))
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                torch.autograd.grad(whole(), (x, emb))
            graph.replay()
            torch.cuda.synchronize()
            captured = "yes"
        except Exception as exc:  # noqa: BLE001 - reported
            captured = f"no: {type(exc).__name__}: {str(exc)[:100]}"
        add(("hssn_loss step with embeddings, check_labels=False: host syncs", syncs, "", ""))
        add(("... captured in a CUDA graph", captured, "", ""))
    x = emb = src = dst = None  # free the Cityscapes tensors before Mapillary

    # ------------------------------------------------------------------ Mapillary
    if not warm or args.warm_only.startswith("mp-"):
        h = presets.mapillary_vistas_v2()
        Bm = 1 if args.smoke else 4
        x = torch.randn(Bm, h.num_nodes, H, W, device=dev, generator=gen).requires_grad_(True)
        y = torch.randint(0, h.num_leaves, (Bm, H, W), device=dev, generator=gen)
        src = x.detach()
        dst = torch.empty_like(src)
        copy = timer(lambda: dst.copy_(src))
        add(("one copy of the logits (Mapillary)", f"{copy * 1e3:.3f} ms", "1.0x", ""))
        t_plain = 1.0
        g_plain = None
        if want("mp-treemin"):
            t_plain = timer(step(lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x))
            row("Mapillary tree-min fwd+bwd", t_plain, copy)
            g_plain = graph_row("Mapillary tree-min fwd+bwd",
                                lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x, copy)
            count_apart_row("Mapillary tree-min fwd+bwd",
                            lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x, copy, g_plain)
        if want("mp-focal"):
            t_focal = timer(step(lambda: hlt.focal_tree_min_loss(x, y, h, reduction="hssn", **kw), x))
            row("Mapillary focal tree-min fwd+bwd", t_focal, copy, note=f" (focal / plain {t_focal / t_plain:.2f})")
            graph_row("Mapillary focal tree-min fwd+bwd",
                      lambda: hlt.focal_tree_min_loss(x, y, h, reduction="hssn", **kw), x, copy,
                      note=lambda t: f" (focal / plain {t / g_plain:.2f})" if g_plain else "")
        if want("mp-decode"):
            for method in ("path", "top_down"):
                row(f"Mapillary decode {method}",
                    timer(lambda m=method: hlt.decode(src, h, m, backend="triton")), copy)
    if warm:
        return
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'part':<{width}} | time | x copy | published code / note |")
    print(f"| {'-' * width} | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]:<{width}} | {r[1]} | {r[2]} | {r[3]} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="no GPU: tiny sizes, CPU, Triton interpreter")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=8, help="processes compiling the table's kernels up front "
                    "(alongside the tests); 0: compile in the timed run")
    ap.add_argument("--warm-only", choices=GROUPS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warm_only:
        table(args)
        return 0
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: GPU speed unmeasured (use --smoke to check the script on the CPU)")
            return 1
    rc = 0
    if not args.smoke:
        warm = None
        if args.jobs:
            warm = threading.Thread(target=warm_up, args=(args.jobs,))
            warm.start()
        if not args.skip_tests:
            rc = run_gpu_tests()
        if warm is not None:
            warm.join()
    t = time.time()
    table(args)
    print(f"\ntable in {time.time() - t:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
