"""Forward+backward time and peak memory of hieraloss.torch against the published-style loss (CPU).

    python benchmarks/bench_torch.py            # Cityscapes B=2 26x512x1024, Mapillary B=1 149x512x1024
    python benchmarks/bench_torch.py --quick    # small sizes (64x128)
    HIERALOSS_NATIVE_ISA=avx2 python benchmarks/bench_torch.py   # cap the compiled kernel's ISA

Per configuration, all in the same run:
* time of ``tree_min_loss(..., reduction="hssn")`` forward+backward (best and median of
  ``--repeats``) with ``backend="native"`` (the compiled CPU kernel, what ``"auto"`` picks on the
  CPU when it is built) and ``backend="torch"`` (the vectorized torch ops), of the published-style
  per-class loop (``benchmarks/published_hssn.py``), and of one read+write pass over the logits
  (``dst.copy_(src)``); printed as ratios, per statistic;
* the ``hssn_loss`` objective without embeddings (``5 * TM(hssn) + sum_d CE_d``, every depth): the
  unfused path (the compiled tree-min kernel, then ``depth_cross_entropy_op`` per depth: an
  index_select + cross_entropy each, several more passes over the logits) against the fused kernel
  call (``hssn_objective_native``: tree-min and every depth's cross-entropy in one pass),
  forward+backward from label channels, as ratios to the same copy, with the compiled tree-min loss
  alone for scale; ``--objective-only`` runs just this row (and its memory);
* peak extra memory of one forward+backward / logits size. Measured honestly as resident memory:
  each measurement runs in a fresh subprocess that builds the inputs, warms up on a tiny input,
  resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs once and reads
  ``VmHWM - VmRSS(before)`` from ``/proc/self/status``. The gradient (same size as the logits) is
  included in the peak. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from published_hssn import published_tree_min_loss  # noqa: E402

import hieraloss  # noqa: E402
import hieraloss.torch as ht  # noqa: E402
from hieraloss import _native  # noqa: E402
from hieraloss.torch.ops.cross_entropy import depth_cross_entropy_op  # noqa: E402
from hieraloss.torch.ops.native import hssn_objective_native, tree_min_native  # noqa: E402

CONFIGS = {
    "cityscapes": dict(preset="cityscapes", batch=2),
    "mapillary": dict(preset="mapillary_vistas_v2", batch=1),
}


def make_inputs(name: str, height: int, width: int, seed: int = 0):
    cfg = CONFIGS[name]
    h = hieraloss.presets.get(cfg["preset"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["batch"], h.num_nodes, height, width, generator=gen) * 2
    labels = torch.randint(0, h.num_leaves, (cfg["batch"], height, width), generator=gen)
    labels[:, : height // 16] = 255  # some ignored rows
    return h, x, labels


IMPLS = ("native", "torch")  # ours: backend= values of hieraloss.torch
OBJECTIVE_IMPLS = ("unfused", "fused")  # the hssn_loss objective (no embeddings)


def label_channels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` label channels (-1 = ignored); for the presets channel == node id."""
    return torch.where(labels == 255, -1, labels).reshape(labels.shape[0], -1)


def objective(impl: str, h, x, lc):
    """``5 * TM(hssn) + sum_d CE_d`` from label channels ``lc``: unfused = the compiled tree-min kernel,
    then one ``depth_cross_entropy_op`` per depth (what ``hssn_loss`` runs today); fused = one kernel pass."""
    L = h.max_depth
    if impl == "fused":
        return hssn_objective_native(x, lc, h, gamma=0.0, node_weight=None, tree_min_weight=5.0,
                                                ce_weights=[1.0] * L)[0]
    tm = tree_min_native(x, lc, h, gamma=0.0, reduction="hssn", node_weight=None) / 5.0
    total = 5.0 * tm
    for d in range(1, L + 1):
        total = total + depth_cross_entropy_op(x, lc, h, d)
    return total


def run_once(impl: str, h, x, labels) -> None:
    x.grad = None
    if impl in IMPLS:
        loss = ht.tree_min_loss(x, labels, h, reduction="hssn", backend=impl)
    elif impl in OBJECTIVE_IMPLS:
        loss = objective(impl, h, x, label_channels(labels))
    else:
        loss = published_tree_min_loss(x, labels, h)
    loss.backward()


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall time of ``repeats`` calls: the best is the least disturbed by other
    processes on a shared machine, the median shows how much they disturbed it."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(impl: str, name: str, height: int, width: int) -> None:
    """Subprocess body: print the peak extra resident bytes of one forward+backward."""
    h, tiny_x, tiny_labels = make_inputs(name, 8, 8)
    run_once(impl, h, tiny_x.requires_grad_(), tiny_labels)  # warm-up: caches, thread pools
    h, x, labels = make_inputs(name, height, width)
    x.requires_grad_()
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run_once(impl, h, x, labels)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_extra_bytes": (peak - before) * 1024, "logits_bytes": x.numel() * x.element_size()}))


def peak_ratio(impl: str, name: str, height: int, width: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--probe", impl, name, str(height), str(width)],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["peak_extra_bytes"] / res["logits_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (64x128)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--published-repeats", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--objective-only", action="store_true", help="only the hssn_loss objective row")
    ap.add_argument("--probe", nargs=4, metavar=("IMPL", "CONFIG", "H", "W"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        impl, name, hh, ww = args.probe
        probe(impl, name, int(hh), int(ww))
        return
    height, width = (64, 128) if args.quick else (512, 1024)
    impls = IMPLS if _native.available() else ("torch",)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32 logits, "
          f"labels with 1/16 ignored rows, reduction='hssn'")
    print(f"compiled kernel: {_native.isa() or 'not available: ' + str(_native.load_error())}, "
          f"huge-page advice {'on' if os.environ.get('HIERALOSS_HUGEPAGES') == '1' else 'off'}")
    for name in args.configs:
        if not args.objective_only:
            bench_config(name, height, width, args, impls)
            gc.collect()
            if not args.no_memory:
                ratios = {impl: peak_ratio(impl, name, height, width) for impl in (*impls, "published")}
                print("  peak extra memory / logits: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        if _native.available():
            bench_objective(name, height, width, args)
            gc.collect()
            if not args.no_memory:
                ratios = {impl: peak_ratio(impl, name, height, width) for impl in OBJECTIVE_IMPLS}
                print("  hssn_loss peak extra memory / logits: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


def bench_config(name: str, height: int, width: int, args: argparse.Namespace, impls) -> None:
    h, x, labels = make_inputs(name, height, width)
    x.requires_grad_()
    shape = "x".join(map(str, x.shape))
    times = {}
    for impl in impls:
        run_once(impl, h, x, labels)  # warm-up
        times[impl] = timed(lambda impl=impl: run_once(impl, h, x, labels), args.repeats)
    t_pub = timed(lambda: run_once("published", h, x, labels), args.published_repeats)
    src = x.detach()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = timed(lambda: dst.copy_(src), max(5, args.repeats))
    values = {impl: ht.tree_min_loss(x, labels, h, reduction="hssn", backend=impl).item() for impl in impls}
    value_pub = published_tree_min_loss(x, labels, h).item()
    print(f"\n{name} [{shape}] ({x.numel() * 4 / 2**20:.0f} MiB logits)")
    print("  loss: " + "  ".join(f"{k} {v:.6f}" for k, v in values.items()) + f"  published-style {value_pub:.6f}")
    for label, i in (("best", 0), ("median", 1)):
        print(f"  fwd+bwd ({label}): published-style {t_pub[i] * 1e3:.1f} ms, copy {t_copy[i] * 1e3:.2f} ms")
        for impl in impls:
            t = times[impl][i]
            print(f"    {impl:>6}: {t * 1e3:7.1f} ms; published-style / {impl} = {t_pub[i] / t:6.1f}x, "
                  f"{impl} / copy = {t / t_copy[i]:5.1f}x")


def bench_objective(name: str, height: int, width: int, args: argparse.Namespace) -> None:
    """The hssn_loss row: unfused vs fused objective, forward+backward, and one copy, in the same run."""
    h, x, labels = make_inputs(name, height, width)
    lc = label_channels(labels)
    x.requires_grad_()

    def step(impl: str) -> None:
        x.grad = None
        objective(impl, h, x, lc).backward()

    def tree_min_only() -> None:  # the fused call's tree-min part alone, for scale
        x.grad = None
        tree_min_native(x, lc, h, gamma=0.0, reduction="hssn", node_weight=None).backward()

    times = {}
    for impl in OBJECTIVE_IMPLS:
        step(impl)  # warm-up
        times[impl] = timed(lambda impl=impl: step(impl), args.repeats)
    tree_min_only()
    t_tm = timed(tree_min_only, args.repeats)
    src = x.detach()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = timed(lambda: dst.copy_(src), max(5, args.repeats))
    values = {impl: objective(impl, h, x.detach(), lc).item() for impl in OBJECTIVE_IMPLS}
    shape = "x".join(map(str, x.shape))
    print(f"\n{name} [{shape}] hssn_loss objective (5 * TM(hssn) + CE at each of {h.max_depth} depths), "
          "fwd+bwd from label channels")
    print("  value: " + "  ".join(f"{k} {v:.6f}" for k, v in values.items()))
    for label, i in (("best", 0), ("median", 1)):
        t_un, t_fu = times["unfused"][i], times["fused"][i]
        print(f"  ({label}) copy {t_copy[i] * 1e3:.2f} ms; unfused {t_un * 1e3:7.1f} ms "
              f"({t_un / t_copy[i]:5.1f}x copy), fused {t_fu * 1e3:7.1f} ms ({t_fu / t_copy[i]:5.1f}x copy); "
              f"unfused / fused = {t_un / t_fu:4.2f}x; tree-min alone {t_tm[i] * 1e3:.1f} ms "
              f"({t_tm[i] / t_copy[i]:.1f}x copy)")


if __name__ == "__main__":
    main()
