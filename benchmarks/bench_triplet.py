"""Forward+backward time and host syncs of the torch hierarchy triplet loss: the sync-free selection
against the earlier one (kept below as the baseline), measured in the same run.

    python benchmarks/bench_triplet.py                  # B=8, C=256, 64x128 embeddings, Cityscapes 512x1024 labels
    python benchmarks/bench_triplet.py --device cuda    # on a GPU (wall time around torch.cuda.synchronize)
    python benchmarks/bench_triplet.py --quick          # B=2, C=32, 16x32 embeddings, 128x256 labels

Per ``sampling`` ("first", "random") and implementation ("before": the selection before this change,
with nonzero, unique, ``int(max)``, ``int(T.sum())`` and boolean indexing, normalising the whole
embedding map; "after": the fixed-size, sync-free one of ``hieraloss.torch._ops``), in the same run:

* ``op``: ``triplet_op`` alone on a prepared leaf map (what the change is about);
* ``loss``: the whole ``hierarchy_triplet_loss`` (label mapping and its one sync included), with the
  baseline op swapped in for "before";
* ``syncs``: host reads inside the op during one forward+backward, counted as
  ``/work/shared/tools/step_profile.py`` counts them (``Tensor.item/tolist/__bool__/__int__/__float__/
  __index__/cpu/numpy`` and the dispatcher ops ``_local_scalar_dense``, ``nonzero``, ``unique``,
  ``_unique2``, ``masked_select``, ``bincount``);
* whether value and gradient are bitwise equal between the two (same generator seed for "random").

Times: best and median wall time, and best process CPU time (all threads; less disturbed by other
processes), of ``--repeats`` forward+backward calls after a warm-up round, the two implementations
called in turn in each round so that a busy machine slows both alike. On the CPU host syncs cost
nothing; the saving there comes from normalising only the embedding rows the triplets use instead of
all B*h*w pixels, forward and backward. The earlier op's float32 gradient on the CPU is not
reproducible run to run once the triplets are many (indexing's backward adds float32 rows from
several threads with atomics): the last column compares two runs of it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _sync_counter import CountSyncs  # noqa: E402 - the tests' host-sync counter

import hieraloss  # noqa: E402
import hieraloss.torch as ht  # noqa: E402
from hieraloss.torch import functional as torch_functional  # noqa: E402
from hieraloss.torch._tables import tables_for  # noqa: E402
from hieraloss.torch.ops.device import compute_dtype  # noqa: E402
from hieraloss.torch.ops.labels import label_channels  # noqa: E402
from hieraloss.torch.ops.triplet import key_order, resize_labels_nearest, triplet_op  # noqa: E402


# ---------------------------------------------------------------------------- baseline (before)
def _legacy_ith_outside(members_pos, seg_start, seg_of_query, i, stride):
    k = torch.arange(members_pos.numel(), device=members_pos.device)
    seg = torch.searchsorted(seg_start, k, right=True) - 1
    key = members_pos - (k - seg_start[seg]) + seg * stride
    found = torch.searchsorted(key, i + seg_of_query * stride, right=True) - seg_start[seg_of_query]
    return i + found


def legacy_triplet_op(embeddings, leaf, hierarchy, *, max_per_class, base_margin, sampling, generator):
    """The selection before this change: nonzero, unique, int(max), int(T.sum()), boolean indexing."""
    C = embeddings.shape[1]
    ct = compute_dtype(embeddings.dtype)
    emb = torch.nn.functional.normalize(embeddings.to(ct), dim=1, eps=1e-12)
    emb = emb.permute(0, 2, 3, 1).reshape(-1, C)
    flat = leaf.reshape(-1)
    pixels = torch.nonzero(flat >= 0).squeeze(1)
    if sampling == "random":
        pixels = key_order(flat, sampling, generator)[:pixels.numel()]  # the same draw as "after"
    chosen = legacy_triplet_select(flat, pixels, hierarchy, max_per_class=max_per_class)
    if chosen is None:
        return embeddings.reshape(-1)[:0].sum().to(ct)
    slot_cls, anchor, positive, negative, T = chosen
    return legacy_triplet_score(emb[anchor], emb[positive], emb[negative], slot_cls, flat[positive],
                                flat[negative], T, hierarchy, base_margin)


def legacy_triplet_select(flat, pixels, hierarchy, *, max_per_class):
    tab = tables_for(hierarchy, flat.device)
    dev = flat.device
    K = hierarchy.num_leaves
    seq_cls = flat[pixels]
    n_pix = pixels.numel()
    parent_of_leaf = tab.parent[tab.leaf_channels]
    group_of_leaf = torch.unique(parent_of_leaf, return_inverse=True)[1]
    G = int(group_of_leaf.max()) + 1
    seq_grp = group_of_leaf[seq_cls]
    n_cls = torch.bincount(seq_cls, minlength=K)
    n_grp = torch.zeros(G, dtype=torch.int64, device=dev).index_add_(0, group_of_leaf, n_cls)
    n_pos = n_grp[group_of_leaf] - n_cls
    n_neg = n_pix - n_grp[group_of_leaf]
    T = torch.minimum(torch.minimum(n_cls, n_pos), torch.minimum(n_neg, torch.full_like(n_cls, max_per_class)))
    total = int(T.sum())
    if total == 0:
        return None
    cls_start = torch.cumsum(n_cls, 0) - n_cls
    grp_start = torch.cumsum(n_grp, 0) - n_grp
    slot_cls = torch.repeat_interleave(torch.arange(K, device=dev), T, output_size=total)
    slot_i = torch.arange(total, device=dev) - (torch.cumsum(T, 0) - T)[slot_cls]
    slot_grp = group_of_leaf[slot_cls]
    by_cls = torch.sort(seq_cls, stable=True).indices
    by_grp = torch.sort(seq_grp, stable=True).indices
    anchor = pixels[by_cls[cls_start[slot_cls] + slot_i]]
    neg_at = _legacy_ith_outside(by_grp, grp_start, slot_grp, slot_i, n_pix + 1)
    negative = pixels[neg_at]
    local = torch.empty(n_pix, dtype=torch.int64, device=dev)
    local[by_grp] = torch.arange(n_pix, device=dev) - grp_start[seq_grp[by_grp]]
    pos_local = _legacy_ith_outside(local[by_cls], cls_start, slot_cls, slot_i, n_pix + 1)
    positive = pixels[by_grp[grp_start[slot_grp] + pos_local]]
    return slot_cls, anchor, positive, negative, T


def legacy_triplet_score(e_a, e_p, e_n, slot_cls, cls_p, cls_n, T, hierarchy, base_margin):
    tab = tables_for(hierarchy, e_a.device)
    ct = e_a.dtype
    psi = tab.leaf_distance
    margin = base_margin + (psi[slot_cls, cls_n] - psi[slot_cls, cls_p]).to(ct) / (2.0 * hierarchy.max_depth)
    d_ap = 1.0 - (e_a * e_p).sum(dim=1)
    d_an = 1.0 - (e_a * e_n).sum(dim=1)
    per_triplet = torch.relu(d_ap - d_an + margin)
    per_class = torch.zeros(T.numel(), dtype=ct, device=e_a.device).index_add_(0, slot_cls, per_triplet)
    has = T > 0
    return (per_class[has] / T[has].to(ct)).sum() / has.sum().to(ct)


OPS = {"before": legacy_triplet_op, "after": triplet_op}


@contextlib.contextmanager
def op_swapped(impl: str):
    """``hierarchy_triplet_loss`` with the triplet op of ``impl``."""
    saved = torch_functional.triplet_op
    torch_functional.triplet_op = OPS[impl]
    try:
        yield
    finally:
        torch_functional.triplet_op = saved


# ---------------------------------------------------------------------------- inputs and timing
def make_inputs(batch, channels, height, width, label_size, device, seed=0):
    """Embeddings [B, C, h, w] and Cityscapes train-id labels [B, H, W]: blocks of 32x32 label pixels
    with one random leaf each, and 1/16 of the rows ignored (255)."""
    h = hieraloss.presets.cityscapes()
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, channels, height, width, generator=gen)
    H, W = label_size
    coarse = torch.randint(0, h.num_leaves, (batch, max(1, H // 32), max(1, W // 32)), generator=gen)
    labels = torch.nn.functional.interpolate(coarse[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    labels[:, : H // 16] = 255
    return h, emb.to(device), labels.to(device)


def leaf_map(emb, labels, h):
    lc, _ = label_channels(labels, h, 255)
    small = resize_labels_nearest(lc, tuple(emb.shape[2:]))
    tab = tables_for(h, emb.device)
    leaf = torch.where(small >= 0, tab.node_ids[small.clamp(min=0)], torch.full_like(small, -1))
    return torch.where(leaf < h.num_leaves, leaf, torch.full_like(leaf, -1))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_alternating(fns: dict, repeats: int, device) -> dict:
    """{name: (best, median, best process CPU time)} of each of ``fns``, called in turn within each of
    ``repeats`` rounds after one warm-up round, so that a busy machine slows them alike. The CPU time
    (all threads of this process) is less disturbed by other processes than the wall time."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if r:
                times[k].append((time.perf_counter() - t0, time.process_time() - c0))
    return {k: (min(w for w, _ in v), statistics.median(w for w, _ in v), min(c for _, c in v))
            for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="B=2, C=32, 16x32 embeddings, 128x256 labels")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-per-class", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        B, C, hh, ww, lab = 2, 32, 16, 32, (128, 256)
    else:
        B, C, hh, ww, lab = 8, 256, 64, 128, (512, 1024)
    h, emb, labels = make_inputs(B, C, hh, ww, lab, device)
    emb.requires_grad_()
    leaf = leaf_map(emb, labels, h)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads; "
          f"embeddings {B}x{C}x{hh}x{ww} float32, Cityscapes labels {B}x{lab[0]}x{lab[1]}, "
          f"max_per_class={args.max_per_class}; best / median of {args.repeats}")
    kw = dict(max_per_class=args.max_per_class, base_margin=0.1)

    def op_step(impl, sampling):
        gen = torch.Generator(device="cpu").manual_seed(0)
        emb.grad = None
        loss = OPS[impl](emb, leaf, h, sampling=sampling, generator=gen, **kw)
        loss.backward()
        return loss.detach(), emb.grad

    def loss_step(impl, sampling):
        gen = torch.Generator(device="cpu").manual_seed(0)
        emb.grad = None
        with op_swapped(impl):
            loss = ht.hierarchy_triplet_loss(emb, labels, h, sampling=sampling, generator=gen, **kw)
        loss.backward()

    print(f"\n{'sampling':<8} {'impl':<7} {'op best':>9} {'op median':>10} {'op cpu':>9} {'loss best':>10} "
          f"{'loss median':>12} {'loss cpu':>9} {'syncs in op':>12}")
    for sampling in ("first", "random"):
        t_op = timed_alternating({impl: lambda impl=impl, s=sampling: op_step(impl, s) for impl in OPS}, args.repeats,
                                 device)
        t_loss = timed_alternating({impl: lambda impl=impl, s=sampling: loss_step(impl, s) for impl in OPS},
                                   args.repeats, device)
        results = {}
        for impl in OPS:
            with CountSyncs() as counter:
                value, grad = op_step(impl, sampling)
            results[impl] = (value, grad.clone())
            print(f"{sampling:<8} {impl:<7} {t_op[impl][0] * 1e3:7.2f}ms {t_op[impl][1] * 1e3:8.2f}ms "
                  f"{t_op[impl][2] * 1e3:7.2f}ms {t_loss[impl][0] * 1e3:8.2f}ms {t_loss[impl][1] * 1e3:10.2f}ms "
                  f"{t_loss[impl][2] * 1e3:7.2f}ms {len(counter.events):>6} {counter.events}")
        (v0, g0), (v1, g1) = results["before"], results["after"]
        _, g0_again = op_step("before", sampling)
        ratio = [t_op["before"][i] / t_op["after"][i] for i in (0, 1, 2)]
        ratio_loss = [t_loss["before"][i] / t_loss["after"][i] for i in (0, 1, 2)]
        print(f"{'':<8} before/after: op {ratio[0]:.2f}x (median {ratio[1]:.2f}x, cpu {ratio[2]:.2f}x), loss "
              f"{ratio_loss[0]:.2f}x (median {ratio_loss[1]:.2f}x, cpu {ratio_loss[2]:.2f}x)")
        print(f"{'':<8} value {v1.item():.9g}, before - after {(v0 - v1).item():.3g}; gradient bitwise equal "
              f"{torch.equal(g0, g1)} (max |diff| {(g0 - g1).abs().max().item():.3g}; before vs a second "
              f"before: bitwise equal {torch.equal(g0, g0_again)})")


if __name__ == "__main__":
    main()
