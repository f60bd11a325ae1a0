"""Throughput of HierarchicalSegMetrics.update on full-resolution label maps (CPU, numpy).

    python benchmarks/bench_metrics.py [--height 1024 --width 2048 --batch 1 --repeat 7]

For the Cityscapes and Mapillary Vistas 2.0 presets, times one ``update`` (leaf predictions as
int64 and as uint8; per-depth predictions as uint8, all paths of the tree or with about 10% of the
pixels off-path) and, as a baseline measured in the same
run on the same pixels, one plain ``np.bincount(target * K + pred)`` (a single flat confusion
matrix of int64 maps). Prints the best of ``--repeat`` runs in Mpixel/s and the ratio of the
update's time to the baseline's. When torch and torchmetrics are installed, the same inputs go
through ``hieraloss.integrations.torchmetrics.HierarchicalSegMetric.update`` as CPU tensors too
(rows marked "torchmetrics"; on a GPU that update runs on the device without a host sync).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hieraloss import presets
from hieraloss.metrics import HierarchicalSegMetrics


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_maps(h, shape, rng):
    """Leaf targets with 10% ignore pixels and 5% partial labels; predictions 80% right."""
    k = h.num_leaves
    target = rng.integers(0, k, size=shape)
    target = np.where(rng.random(shape) < 0.05, rng.integers(k, h.num_nodes, size=shape), target)
    target = np.where(rng.random(shape) < 0.10, 255, target)
    pred = np.where(rng.random(shape) < 0.8, np.where(target < k, target, 0), rng.integers(0, k, size=shape))
    per_depth = np.stack([h.labels_at_depth(pred, d + 1) for d in range(h.max_depth)], axis=1)
    # Unconstrained per-depth predictions: 10% of the pixels take their depth-1 label elsewhere.
    broken = per_depth.copy()
    moved = rng.random(shape) < 0.10
    broken[:, 0][moved] = np.roll(per_depth[:, 0], 1, axis=-1)[moved]
    return target.astype(np.int64), pred.astype(np.int64), per_depth, broken


def _torchmetrics_metric(h):
    """The torchmetrics metric, or None where torch or torchmetrics is not installed."""
    try:
        from hieraloss.integrations.torchmetrics import HierarchicalSegMetric
    except ImportError:
        return None
    return HierarchicalSegMetric(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256 x 512 maps, 3 repeats (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.height, args.width, args.repeat = 256, 512, 3
    shape = (args.batch, args.height, args.width)
    pixels = int(np.prod(shape))
    rng = np.random.default_rng(0)
    print(f"{pixels / 1e6:.2f} Mpixel per update ({args.batch} x {args.height} x {args.width}), "
          f"best of {args.repeat}")
    print(f"{'preset':<20} {'input':<38} {'Mpixel/s':>9} {'ms':>8} {'x baseline time':>16}")
    for name in ("cityscapes", "mapillary_vistas_v2"):
        h = presets.get(name)
        target, pred, per_depth, broken = make_maps(h, shape, rng)
        k = h.num_leaves
        base = best_seconds(lambda t=target, p=pred, k=k: np.bincount((t * k + p).ravel()), args.repeat)
        rows = [("np.bincount baseline", base)]
        metric = HierarchicalSegMetrics(h)
        cases = {
            "leaf int64": (pred, target),
            "leaf uint8": (pred.astype(np.uint8), target.astype(np.uint8)),
            f"per-depth uint8 (L={h.max_depth})": (per_depth.astype(np.uint8), target.astype(np.uint8)),
            "per-depth, ~10% off-path": (broken.astype(np.uint8), target.astype(np.uint8)),
        }
        for label, (p, t) in cases.items():
            rows.append((label, best_seconds(lambda p=p, t=t, m=metric: m.update(p, t), args.repeat)))
        device_metric = _torchmetrics_metric(h)
        if device_metric is not None:
            import torch

            for label, (p, t) in cases.items():
                pt, tt = torch.from_numpy(p), torch.from_numpy(t)
                rows.append((f"torchmetrics {label}",
                             best_seconds(lambda p=pt, t=tt, m=device_metric: m.update(p, t), args.repeat)))
        for label, sec in rows:
            print(f"{name:<20} {label:<38} {pixels / sec / 1e6:>9.1f} {sec * 1e3:>8.2f} {sec / base:>16.2f}")


if __name__ == "__main__":
    main()
