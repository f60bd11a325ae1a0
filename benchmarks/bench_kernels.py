"""Fused Triton tree-min loss vs the vectorized torch op vs the published-style loop code (GPU).

(``benchmarks/gpu_check.py`` prints the whole training-step table; this script is the tree-min detail.)

    python benchmarks/bench_kernels.py                  # Cityscapes (B=8) and Mapillary (B=4), 512x1024
    python benchmarks/bench_kernels.py --quick          # small sizes
    python benchmarks/bench_kernels.py --interpret-check  # no GPU: tiny correctness check on the CPU
    python benchmarks/bench_kernels.py --compile-check    # no GPU: compile for sm_90, show registers
    python benchmarks/bench_kernels.py --launch-python    # no GPU: Triton's Python share of each launch, host step

Per implementation and scale: forward+backward time (CUDA events, warmup, median of --iters), peak
extra memory (``torch.cuda.max_memory_allocated`` minus what was allocated before, i.e. the inputs),
achieved bandwidth (logits-sized bytes the fused pair must move: forward reads logits + labels,
backward reads them again and writes the gradient), and the time relative to one read+write pass over
the logits (``dst.copy_(src)``). Also times the fused and torch decoders.

Without CUDA it prints that the GPU figures are unmeasured and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_check import Timer, best_time, peak_extra, replay, triton_launches  # noqa: E402 - shared timers

SCALES = {  # name: (preset, batch, height, width)
    "cityscapes": ("cityscapes", 8, 512, 1024),
    "mapillary": ("mapillary_vistas_v2", 4, 512, 1024),
}
QUICK = {"cityscapes": ("cityscapes", 2, 128, 256), "mapillary": ("mapillary_vistas_v2", 1, 128, 256)}


def _published():
    """benchmarks/published_hssn.py if present: (module, callable) or (None, reason)."""
    path = HERE / "published_hssn.py"
    if not path.exists():
        return None, "benchmarks/published_hssn.py not present"
    spec = importlib.util.spec_from_file_location("published_hssn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("published_tree_min_loss", "tree_min_loss", "published_hssn_loss", "hssn_loss"):
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn, name
    return None, "no known entry point in published_hssn.py"


def _time_cuda(fn, warmup: int, iters: int) -> float:
    return Timer("cuda", warmup, iters)(fn)


def _peak_extra(fn) -> float:
    return peak_extra(fn, "cuda")


def bench_scale(name, spec, args, rows):
    import torch

    from hieraloss import presets
    from hieraloss.torch.kernels import fused_decode, fused_tree_min_loss

    preset, B, H, W = spec
    h = presets.get(preset) if hasattr(presets, "get") else getattr(presets, preset)()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, h.num_nodes, H, W, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    labels = torch.randint(0, h.num_leaves, (B, H, W), device="cuda", generator=gen)
    labels[:, :8] = 255  # a band of ignored pixels
    lc = torch.as_tensor(h.channel_of, device="cuda")[labels.clamp_max(h.num_nodes - 1)]
    lc = torch.where(labels == 255, -1, lc)
    logits_bytes = logits.numel() * logits.element_size()
    label_bytes = lc.numel() * lc.element_size()

    src = logits.detach()
    dst = torch.empty_like(src)
    t_copy = _time_cuda(lambda: dst.copy_(src), args.warmup, args.iters)

    impls = {"fused": lambda: fused_tree_min_loss(logits, lc, h, gamma=None, reduction=args.reduction,
                                                  node_weight=None)}
    try:
        from hieraloss.torch._ops import tree_min_op

        impls["torch"] = lambda: tree_min_op(logits, lc, h, gamma=0.0, reduction=args.reduction,
                                             node_weight=None)
    except ImportError as exc:
        print(f"  torch backend op unavailable: {exc}")
    pub, why = _published()
    if pub is not None and not args.skip_published:
        impls["published"] = lambda: pub(logits, labels, h)
    else:
        print(f"  published-style code skipped: {why if pub is None else '--skip-published'}")

    fused_bytes = 3 * logits_bytes + 2 * label_bytes
    for impl, loss_fn in impls.items():
        def step(loss_fn=loss_fn):
            logits.grad = None
            loss_fn().backward()

        try:
            t = _time_cuda(step, args.warmup, args.iters)
            peak = _peak_extra(step)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the loop code
            print(f"  {impl}: failed: {exc!r}"[:300])
            torch.cuda.empty_cache()
            continue
        rows.append(dict(scale=name, impl=impl, B=B, N=h.num_nodes, H=H, W=W, dtype=args.dtype,
                         ms=t * 1e3, peak_extra_MiB=peak / 2**20,
                         peak_over_logits=peak / logits_bytes,
                         GBps=fused_bytes / t / 1e9 if impl == "fused" else None,
                         over_copy=t / t_copy))
    logits.grad = None

    try:
        from hieraloss.torch._ops import decode_op
    except ImportError:
        decode_op = None
    for method in ("path", "top_down"):
        t_fused = _time_cuda(lambda m=method: fused_decode(src, h, m), args.warmup, args.iters)
        row = dict(scale=name, impl=f"decode-{method}-fused", ms=t_fused * 1e3,
                   GBps=(logits_bytes + (h.max_depth + 1) * label_bytes) / t_fused / 1e9,
                   over_copy=t_fused / t_copy)
        rows.append(row)
        if decode_op is not None:
            t_torch = _time_cuda(lambda m=method: decode_op(src, h, m), args.warmup, args.iters)
            rows.append(dict(scale=name, impl=f"decode-{method}-torch", ms=t_torch * 1e3,
                             over_copy=t_torch / t_copy))
    print(f"  copy pass over the logits: {t_copy * 1e3:.3f} ms "
          f"({2 * logits_bytes / t_copy / 1e9:.0f} GB/s read+write)")


def interpret_check() -> None:
    """A tiny fused-vs-torch comparison under the Triton interpreter (CPU)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from hieraloss import presets
    from hieraloss.torch.kernels import fused_decode, fused_tree_min_loss, triton_available

    if not triton_available():
        print("interpreter check skipped: triton is not importable")
        return
    try:
        from hieraloss.torch._ops import decode_op, tree_min_op
    except ImportError:
        print("interpreter check skipped: hieraloss.torch._ops not available")
        return
    h = presets.cityscapes()
    x = torch.randn(2, h.num_nodes, 9, 13, dtype=torch.float64, requires_grad=True)
    lc = torch.randint(-1, h.num_nodes, (2, 9, 13))
    worst = 0.0
    for reduction in ("mean", "hssn"):
        a = fused_tree_min_loss(x, lc, h, gamma=None, reduction=reduction, node_weight=None)
        (ga,) = torch.autograd.grad(a, x)
        b = tree_min_op(x, lc, h, gamma=0.0, reduction=reduction, node_weight=None)
        (gb,) = torch.autograd.grad(b, x)
        worst = max(worst, float((a - b).abs().detach()), float((ga - gb).abs().max()))
    same = all(torch.equal(p, q) for m in ("path", "top_down")
               for p, q in zip(fused_decode(x, h, m), decode_op(x.detach(), h, m), strict=True))
    print(f"interpreter check (Cityscapes 2x9x13, float64): max |fused - torch| = {worst:.2e}, "
          f"decode equal: {same}")


def compile_check(arch: int) -> None:
    """Compile the presets' specialisations for ``sm_<arch>`` ahead of time (ptxas from the triton
    wheel; no GPU needed), as a launch on torch tensors compiles them, and print registers and spill
    stack per thread."""
    os.environ.pop("TRITON_INTERPRET", None)
    import time

    import triton

    from hieraloss import presets
    from hieraloss.torch.kernels import _aot

    print(f"triton {triton.__version__}, sm_{arch}")
    for preset in ("cityscapes", "mapillary_vistas_v2"):
        h = getattr(presets, preset)()
        for dtype, mode, weighted, focal, contiguous in (("float32", "value", False, False, True),
                                                         ("float32", "value+grad", False, False, True),
                                                         ("float32", "value+grad", False, True, True),
                                                         ("float32", "value+grad", False, False, False),
                                                         ("float32", "objective", False, False, True),
                                                         ("float32", "objective", False, True, True),
                                                         ("bfloat16", "objective", True, True, True),
                                                         ("float32", "map grad", True, True, True)):
            t = time.time()
            kernel = _aot.compile_objective(h, arch, dtype=dtype, mode=mode, focal=focal, weighted=weighted,
                                            contiguous_out=contiguous)
            seconds = time.time() - t
            ops = _aot.instruction_counts(kernel)
            what = mode + ("" if contiguous else " cl")
            print(f"{preset:<20} objective {what:<16} {dtype:<9} weighted={weighted!s:<5} focal={focal!s:<5} "
                  f"{_aot.usage(kernel)}, {ops['total']} SASS instructions ({ops.get('MUFU', 0)} MUFU) "
                  f"(compiled in {seconds:.0f} s)", flush=True)
        for top_down in (False, True):
            kernel = _aot.compile_decode(h, arch, dtype="float16", top_down=top_down)
            print(f"{preset:<20} decode {'top_down' if top_down else 'path':<9} float16: {_aot.usage(kernel)}",
                  flush=True)
    # The kernels every tree shares, as a Cityscapes training step launches them (256-d embeddings).
    for name, kernel in (
            ("gradient scale float32", _aot.compile_gradient_scale(arch)),
            ("gradient scale bfloat16", _aot.compile_gradient_scale(arch, dtype="bfloat16")),
            ("label count (A/B launch)", _aot.compile_label_count(arch)),
            ("triplet codes", _aot.compile_triplet(arch, kernel="codes")),
            ("triplet select random", _aot.compile_triplet(arch, kernel="select", ordered=True)),
            ("triplet score float32", _aot.compile_triplet(arch, kernel="score")),
            ("triplet score bfloat16", _aot.compile_triplet(arch, kernel="score", dtype="bfloat16"))):
        print(f"{'any tree':<20} {name:<36} {_aot.usage(kernel)}", flush=True)


def launch_python(n: int = 2000) -> None:
    """Triton's Python share of each launch of a training step (binder, cache key, kernel lookup), on
    the CPU: the driver is mocked to an sm_90 target, so every launch stops before the driver call
    (``warmup=True``) and the kernels are compiled ahead of time; then the host time of whole
    training steps so launched. The C launcher and the CUDA driver are not in it;
    ``profile_gpu_step.py --launch-cost`` measures whole launches on a GPU."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    import triton.language as tl

    import hieraloss.torch as hlt
    from hieraloss import presets
    from hieraloss.torch.kernels import _aot

    @triton.jit
    def trivial(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    h = presets.cityscapes()
    x = torch.randn(2, h.num_nodes, 16, 16, requires_grad=True)
    y = torch.randint(0, h.num_leaves, (2, 16, 16))

    kw = dict(backend="triton", check_labels=False)

    def step():
        trivial[(1,)](torch.zeros(16), 16, BLOCK=16)
        hlt.hssn_loss(x, y, h, **kw)

    with _aot.compile_only(90, stop_launches=False):  # the recording and the replays pass warmup=True
        recorded = triton_launches(step, launch=False)
        print(f"triton {triton.__version__}: Python share of a launch (binder, cache key, lookup), best of 5 x {n}")
        for record in recorded:
            us = best_time(replay(record, warmup=True), n) * 1e6
            print(f"  {record[0].fn.__name__:<22} {len(record[1]):>3} arguments: {us:.1f} us", flush=True)
    # The whole step's host time on CPU tensors: the library's Python and torch ops plus Triton's
    # share (not the C launcher, the driver or CUDA's allocator).
    with _aot.compile_only(90):
        for name, loss in (("tree_min_loss", lambda: hlt.tree_min_loss(x, y, h, reduction="hssn", **kw)),
                           ("hssn_loss", lambda: hlt.hssn_loss(x, y, h, **kw))):
            def train_step(loss=loss):
                x.grad = None
                loss().backward()
            us = best_time(train_step, max(1, n // 4)) * 1e6
            print(f"  {name} forward + backward, launches stopped before the driver: {us:.1f} us per step",
                  flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reduction", default="hssn", choices=["mean", "sum", "hssn"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-published", action="store_true", help="do not time the loop code")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--interpret-check", action="store_true",
                    help="without CUDA: run a tiny fused-vs-torch check under the Triton interpreter")
    ap.add_argument("--compile-check", type=int, nargs="?", const=90, metavar="ARCH",
                    help="without a GPU: compile the kernels for sm_ARCH (default 90) and print registers")
    ap.add_argument("--launch-python", action="store_true",
                    help="without a GPU: Triton's Python share of each launch of a training step, and the "
                         "host time of the step")
    args = ap.parse_args(argv)
    if args.launch_python:
        launch_python()
        return 0
    if args.compile_check:
        compile_check(args.compile_check)
        return 0

    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("No CUDA device (or TRITON_INTERPRET=1): GPU figures (time, peak memory, bandwidth) are "
              "UNMEASURED in this run.")
        if args.interpret_check:
            interpret_check()
        return 0

    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}, reduction {args.reduction}")
    rows: list[dict] = []
    for name in args.scales:
        spec = (QUICK if args.quick else SCALES)[name]
        print(f"[{name}] preset {spec[0]}, B={spec[1]}, {spec[2]}x{spec[3]}")
        bench_scale(name, spec, args, rows)
        torch.cuda.empty_cache()
    print(f"{'scale':<11}{'impl':<22}{'ms':>10}{'peak MiB':>10}{'peak/logits':>12}{'GB/s':>8}{'x copy':>8}")
    for r in rows:
        peak = r.get("peak_extra_MiB")
        print(f"{r['scale']:<11}{r['impl']:<22}{r['ms']:>10.3f}"
              f"{'' if peak is None else f'{peak:.0f}':>10}"
              f"{'' if peak is None else format(r['peak_over_logits'], '.2f'):>12}"
              f"{'' if r.get('GBps') is None else format(r['GBps'], '.0f'):>8}{r['over_copy']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
