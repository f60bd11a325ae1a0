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
* host syncs of a ``hssn_loss`` step with ``check_labels=False`` (``torch.cuda.set_sync_debug_mode``
  raises on any), whether that step captures into a CUDA graph, and peak extra memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_gpu_tests() -> int:
    env = dict(os.environ, HIERALOSS_GPU_TESTS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_triton.py"]
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


def table(args) -> None:
    import torch
    import torch.nn.functional as F
    import triton
    from published_hssn import published_tree_min_loss

    import hieraloss.torch as hlt
    from hieraloss import presets
    from hieraloss.torch import kernels

    dev = "cpu" if args.smoke else "cuda"
    timer = Timer(dev, 1 if args.smoke else 3, 1 if args.smoke else args.iters)
    name = "CPU (Triton interpreter, smoke sizes)" if args.smoke else torch.cuda.get_device_name()
    print(f"\ndevice: {name}; torch {torch.__version__}; triton {triton.__version__}; "
          f"triton kernels available: {kernels.triton_available()}")
    B, H, W, e_hw = (2, 8, 16, (4, 4)) if args.smoke else (8, 512, 1024, (64, 128))
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: list[tuple[str, str, str, str]] = []

    def row(what, ms_ours, copy, ms_pub=None, note=""):
        pub = "" if ms_pub is None else f"{ms_pub * 1e3:.2f} ms (ours {ms_pub / ms_ours:.1f}x faster)"
        rows.append((what, f"{ms_ours * 1e3:.3f} ms", f"{ms_ours / copy:.1f}x", pub + note))

    def step(fn, x):
        def run():
            x.grad = None
            fn().backward()
        return run

    # ------------------------------------------------------------------ Cityscapes
    h = presets.cityscapes()
    x = torch.randn(B, h.num_nodes, H, W, device=dev, generator=gen).requires_grad_(True)
    y = torch.randint(0, h.num_leaves, (B, H, W), device=dev, generator=gen)
    y[:, :2] = 255
    emb = torch.randn(B, 256, *e_hw, device=dev, generator=gen).requires_grad_(True)
    src = x.detach()
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src))
    rows.append(("one copy of the logits (Cityscapes)", f"{copy * 1e3:.3f} ms", "1.0x", ""))
    kw = dict(backend="triton", check_labels=False)
    tm = step(lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x)
    pub_tm = step(lambda: published_tree_min_loss(x, y, h), x)
    t_tm, t_pub_tm = timer(tm), timer(pub_tm)
    row("tree-min hssn fwd+bwd", t_tm, copy, t_pub_tm)
    row("focal tree-min fwd+bwd", timer(step(lambda: hlt.focal_tree_min_loss(x, y, h, reduction="hssn", **kw), x)),
        copy, note=" (focal / plain: see ms)")
    leaf_ch = torch.tensor(list(h.depth_channels[-1]), device=dev)
    cat_ch = torch.tensor(list(h.depth_channels[0]), device=dev)
    cat_of_leaf = torch.tensor(h.ancestor_table[:, 0].tolist(), device=dev)
    pos = torch.full((h.num_nodes,), -100, dtype=torch.int64, device=dev)
    pos[cat_ch] = torch.arange(cat_ch.numel(), device=dev)
    y_cat = torch.where(y == 255, -100, pos[cat_of_leaf[y.clamp_max(h.num_nodes - 1)]])
    y_leaf = torch.where(y == 255, -100, y)
    plain = {1: lambda: F.cross_entropy(x[:, cat_ch], y_cat, ignore_index=-100),
             2: lambda: F.cross_entropy(x[:, leaf_ch], y_leaf, ignore_index=-100)}
    t_plain = {}
    for d in (1, 2):
        t_plain[d] = timer(step(plain[d], x))
        row(f"depth_cross_entropy depth {d}", timer(step(lambda d=d: hlt.depth_cross_entropy(x, y, h, d, **kw), x)),
            copy, t_plain[d], note=" (F.cross_entropy)")
    row("triplet (256-d, embeddings only)",
        timer(step(lambda: hlt.hierarchy_triplet_loss(emb, y, h, sampling="first"), emb)), copy)
    t_obj = timer(step(lambda: hlt.hssn_loss(x, y, h, **kw), x))
    row("hssn_loss without embeddings", t_obj, copy, t_pub_tm + t_plain[1] + t_plain[2],
        note=" (published TM + F.cross_entropy x2)")

    def full():
        x.grad = None
        emb.grad = None
        hlt.hssn_loss(x, y, h, embeddings=emb, triplet_weight=0.5, sampling="first", **kw).backward()
    row("hssn_loss with embeddings", timer(full), copy)
    peak = peak_extra(tm, dev)
    if peak is not None:
        rows.append(("peak extra memory, tree-min step", f"{peak / 2**20:.0f} MiB",
                     f"{peak / (x.numel() * x.element_size()):.2f}x logits", ""))
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    row("tree-min hssn, bfloat16 logits", timer(step(lambda: hlt.tree_min_loss(xb, y, h, reduction="hssn", **kw),
                                                     xb)), copy, note=f" (float32: {t_tm * 1e3:.3f} ms)")
    for method in ("path", "top_down"):
        row(f"decode {method}", timer(lambda m=method: hlt.decode(src, h, m, backend="triton")), copy)
    syncs = "0 (set_sync_debug_mode raised nothing)"
    if dev == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            full_step = step(lambda: hlt.hssn_loss(x, y, h, **kw), x)
            full_step()
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
                    hlt.hssn_loss(x, y, h, **kw)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                loss = hlt.hssn_loss(x, y, h, **kw)
                (g,) = torch.autograd.grad(loss, x)
            graph.replay()
            torch.cuda.synchronize()
            captured = "yes"
        except Exception as exc:  # noqa: BLE001 - reported
            captured = f"no: {type(exc).__name__}: {str(exc)[:100]}"
        rows.append(("hssn_loss step, check_labels=False: host syncs", syncs, "", ""))
        rows.append(("... captured in a CUDA graph", captured, "", ""))

    # ------------------------------------------------------------------ Mapillary
    h = presets.mapillary_vistas_v2()
    Bm = 1 if args.smoke else 4
    x = torch.randn(Bm, h.num_nodes, H, W, device=dev, generator=gen).requires_grad_(True)
    y = torch.randint(0, h.num_leaves, (Bm, H, W), device=dev, generator=gen)
    src = x.detach()
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src))
    rows.append(("one copy of the logits (Mapillary)", f"{copy * 1e3:.3f} ms", "1.0x", ""))
    t_plain = timer(step(lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw), x))
    row("Mapillary tree-min fwd+bwd", t_plain, copy)
    t_focal = timer(step(lambda: hlt.focal_tree_min_loss(x, y, h, reduction="hssn", **kw), x))
    row("Mapillary focal tree-min fwd+bwd", t_focal, copy, note=f" (focal / plain {t_focal / t_plain:.2f})")
    for method in ("path", "top_down"):
        row(f"Mapillary decode {method}", timer(lambda m=method: hlt.decode(src, h, m, backend="triton")), copy)

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
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: GPU speed unmeasured (use --smoke to check the script on the CPU)")
            return 1
    rc = 0 if args.skip_tests or args.smoke else run_gpu_tests()
    t = time.time()
    table(args)
    print(f"\ntable in {time.time() - t:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
