"""Forward + backward time and peak memory of the hieraloss.paddle tree-min loss on the CPU.

Compared, in one run, on the same logits (Cityscapes scale by default: B=2, 26 channels, 512x1024):

* ``hieraloss_auto``: ``hieraloss.paddle.tree_min_loss(..., reduction="hssn")`` with the default
  ``backend="auto"``, which on the CPU is the compiled kernel (``hieraloss._native``; the forward
  pass writes the gradient, backward scales it) when it was built;
* ``hieraloss_paddle``: the same with ``backend="paddle"``, the vectorized paddle op (forward sweeps,
  backward recomputes them);
* ``per_class_loop``: a published-style formulation written here: sigmoid probabilities, a Python
  loop over the classes that stacks each class's ancestors (descendants) and takes their min (max),
  ``log(p + 1e-8)``, per-depth normalisation times 5, differentiated by paddle's autograd;
* ``read_write``: one elementwise pass that reads the logits and writes a tensor of the same size
  (``x * 2``): the memory-traffic floor of anything that touches every logit.

Each contender runs in its own subprocess so that its peak resident memory (``VmHWM``) can be
measured; "peak extra" is the peak minus the resident memory once the inputs exist.

    python benchmarks/bench_paddle.py            # full size (slow on a small CPU)
    python benchmarks/bench_paddle.py --quick    # 2 x 26 x 128 x 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

CONTENDERS = ("hieraloss_auto", "hieraloss_paddle", "per_class_loop", "read_write")
BACKEND = {"hieraloss_auto": "auto", "hieraloss_paddle": "paddle"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def per_class_loop_loss(x, labels, hierarchy, ignore_index=255, eps=1e-8):
    """Published-style tree-min loss: per-class Python loops over probabilities (clean-room)."""
    import paddle

    h = hierarchy
    prob = paddle.nn.functional.sigmoid(x)
    valid = (labels != ignore_index).astype(x.dtype)
    safe = paddle.where(labels == ignore_index, paddle.zeros_like(labels), labels)
    pos_scores, neg_scores, targets = [], [], []
    for v in range(h.num_nodes):
        ancestors = [int(a) for a in h.ancestor_table[v, : h.depth[v]]]
        descendants = sorted({int(u) for u in h.descendant_table[v]})
        pos_scores.append(paddle.stack([prob[:, a] for a in ancestors], axis=0).min(axis=0))
        neg_scores.append(paddle.stack([prob[:, u] for u in descendants], axis=0).max(axis=0))
        leaves_under = [int(h.node_ids[u]) for u in descendants if h.is_leaf[u]]
        on_path = paddle.zeros_like(safe, dtype="bool")
        for leaf in leaves_under:
            on_path = on_path | (safe == leaf)
        targets.append(on_path.astype(x.dtype))
    total = 0.0
    for d in range(1, h.max_depth + 1):
        terms = []
        for v in np.flatnonzero(h.depth == d):
            y = targets[v]
            term = -y * paddle.log(pos_scores[v] + eps) - (1 - y) * paddle.log(1 - neg_scores[v] + eps)
            terms.append((term * valid).sum())
        count = valid.sum() * len(terms)
        total = total + paddle.add_n(terms) / count
    return 5 * total


def worker(name: str, batch: int, height: int, width: int, repeats: int) -> dict:
    import paddle

    import hieraloss.paddle as hp
    from hieraloss import _native, presets

    paddle.set_device("cpu")
    h = presets.cityscapes()
    rng = np.random.default_rng(0)
    x_np = rng.normal(0, 2, size=(batch, h.num_nodes, height, width)).astype(np.float32)
    lab_np = rng.integers(0, h.num_leaves, size=(batch, height, width))
    lab_np[rng.random(lab_np.shape) < 0.1] = 255
    x = paddle.to_tensor(x_np)
    labels = paddle.to_tensor(lab_np)
    del x_np, lab_np
    x.stop_gradient = False

    def step():
        if name in BACKEND:
            loss = hp.tree_min_loss(x, labels, h, reduction="hssn", backend=BACKEND[name])
        elif name == "per_class_loop":
            loss = per_class_loop_loss(x, labels, h)
        else:
            out = x.detach() * 2.0
            return float(out[0, 0, 0, 0])
        loss.backward()
        value = float(loss)
        x.clear_gradient()
        return value

    base = _status_kib("VmRSS")
    step()  # warm-up: builds the hierarchy tables and first-call state; not timed
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    return dict(
        name=name,
        seconds=min(times),
        median_seconds=float(np.median(times)),
        value=value,
        peak_extra_mib=(peak - base) / 1024,
        logits_mib=batch * h.num_nodes * height * width * 4 / 2**20,
        auto_is=f"native ({_native.isa()})" if _native.available() else f"paddle ({_native.load_error()})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 x 26 x 128 x 256 instead of 2 x 26 x 512 x 1024"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per contender (best and median are shown)"
    )
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or ([2, 128, 256] if args.quick else [2, 512, 1024])
    repeats = args.repeats or (3 if args.quick else 2)
    if args.worker:
        print(json.dumps(worker(args.worker, *size, repeats)))
        return

    results = {}
    for name in CONTENDERS:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--size",
            *map(str, size),
            "--repeats",
            str(repeats),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    b, hgt, w = size
    print(
        f"CPU, B={b}, 26 channels, {hgt}x{w}; logits {results['hieraloss_auto']['logits_mib']:.0f} MiB float32; "
        f"{repeats} timed runs each (after one warm-up run); auto = {results['hieraloss_auto']['auto_is']}"
    )
    print(f"{'contender':<18}{'best s':>10}{'median s':>10}{'peak extra MiB':>16}{'loss':>14}")
    for name, r in results.items():
        value = "" if name == "read_write" else f"{r['value']:.6f}"
        print(
            f"{name:<18}{r['seconds']:>10.3f}{r['median_seconds']:>10.3f}{r['peak_extra_mib']:>16.0f}{value:>14}"
        )
    loop, floor = results["per_class_loop"], results["read_write"]
    for name in BACKEND:
        ours = results[name]
        print(
            f"{name}: time (best) / per_class_loop = {ours['seconds'] / loop['seconds']:.3f}, "
            f"/ read_write = {ours['seconds'] / floor['seconds']:.1f}; "
            f"time (median) / per_class_loop = {ours['median_seconds'] / loop['median_seconds']:.3f}, "
            f"/ read_write = {ours['median_seconds'] / floor['median_seconds']:.1f}; "
            f"memory / per_class_loop = {ours['peak_extra_mib'] / loop['peak_extra_mib']:.3f}, "
            f"/ read_write = {ours['peak_extra_mib'] / max(floor['peak_extra_mib'], 1e-9):.1f}"
        )


if __name__ == "__main__":
    main()
