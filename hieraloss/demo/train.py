"""The demo: flat cross-entropy vs the HSSN losses on the same procedural scenes and budget.

Both models are the same tiny FCN (:mod:`hieraloss.demo.model`) with the same initial weights
(one seed), batches, steps and learning-rate schedule. They differ only in the output head and the
objective:

* ``flat``: K leaf logits, cross-entropy on the leaves; depth-d labels are read off the predicted
  leaf's path. Its "independent" prediction takes, at each depth, the argmax of the summed leaf
  probabilities under each class (a marginal), which need not agree with the leaf argmax.
* ``hssn``: N node logits plus a 1/4-resolution embedding head, trained with ``hssn_loss``
  (tree-min loss + per-depth cross-entropy + the hierarchy triplet loss on its ramp); decoded with
  ``decode(..., "path")``; its "independent" prediction is ``decode(..., "independent")``.

Both are scored on a held-out split with :class:`hieraloss.metrics.HierarchicalSegMetrics`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..hierarchy import Hierarchy
from ..metrics import HierarchicalSegMetrics
from .data import make_splits

__all__ = ["DemoConfig", "run_demo", "MODELS"]

MODELS = ("flat", "hssn")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run (written to ``results.json``)."""

    preset: str = "cityscapes"
    backend: str = "torch"
    seed: int = 0
    epochs: int = 7
    num_train: int = 2048
    num_test: int = 256
    size: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 32
    embed_dim: int = 16
    figure_images: int = 4
    quick: bool = False
    threads: int | None = None  # CPU threads of the framework; None keeps its default

    @classmethod
    def preset_defaults(cls, quick: bool = False, epochs: int | None = None, **kwargs: Any) -> DemoConfig:
        """The default run, or with ``quick=True`` a smoke run (few scenes, 2 epochs)."""
        base = cls(num_train=64, num_test=16, epochs=2, figure_images=2, quick=True) if quick else cls()
        changes = {k: v for k, v in kwargs.items() if v is not None}
        if epochs is not None:
            changes["epochs"] = epochs
        return replace(base, **changes)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_train // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def batch_order(config: DemoConfig) -> list[np.ndarray]:
    """The training batches (indices into the train split), shared by both models."""
    rng = np.random.default_rng([config.seed, 2])
    out = []
    for _ in range(config.epochs):
        perm = rng.permutation(config.num_train)
        for s in range(config.steps_per_epoch):
            out.append(perm[s * config.batch_size:(s + 1) * config.batch_size])
    return out


def learning_rate(config: DemoConfig, step: int) -> float:
    """Cosine decay from ``lr`` to 0 over the run, after a short linear warm-up."""
    warm = max(1, config.total_steps // 20)
    if step < warm:
        return config.lr * (step + 1) / warm
    t = (step - warm) / max(1, config.total_steps - warm)
    return config.lr * 0.5 * (1 + math.cos(math.pi * t))


def flat_depth_labels(leaf_ids: np.ndarray, hierarchy: Hierarchy) -> np.ndarray:
    """Per-depth node ids ``[B, L, ...]`` along the path of each predicted leaf id ``[B, ...]``."""
    chans = hierarchy.leaf_paths[leaf_ids]  # [B, ..., L] channels
    return np.moveaxis(hierarchy.node_ids[chans], -1, 1)


def flat_marginal_labels(leaf_probs: np.ndarray, hierarchy: Hierarchy) -> np.ndarray:
    """Per-depth argmax of the leaf probabilities summed under each class ``[B, L, ...]``."""
    out = []
    for d in range(hierarchy.max_depth):
        classes = hierarchy.depth_channels[d]
        member = (hierarchy.leaf_paths[:, d][:, None] == classes[None, :]).astype(leaf_probs.dtype)  # [K, C]
        marginal = np.einsum("bk...,kc->bc...", leaf_probs, member)
        out.append(hierarchy.node_ids[classes[np.argmax(marginal, axis=1)]])
    return np.stack(out, axis=1)


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _set_threads(config: DemoConfig) -> None:
    if config.threads is None:
        return
    if config.backend == "torch":
        import torch

        torch.set_num_threads(config.threads)
    else:
        import paddle

        setter = getattr(getattr(paddle, "base", None), "core", None)
        if setter is not None and hasattr(setter, "set_num_threads"):
            setter.set_num_threads(config.threads)


def _runner(config: DemoConfig, hierarchy: Hierarchy, mode: str):
    if config.backend == "torch":
        from .backends import TorchRunner

        return TorchRunner(config, hierarchy, mode)
    if config.backend == "paddle":
        from .backends import PaddleRunner

        return PaddleRunner(config, hierarchy, mode)
    raise ValueError(f"backend must be 'torch' or 'paddle', got {config.backend!r}")


def _predict(runner, images: np.ndarray, hierarchy: Hierarchy, mode: str, batch_size: int):
    """Decoded per-depth labels and the 'independent' per-depth labels, ``[n, L, H, W]`` each."""
    decoded, independent = [], []
    for s in range(0, len(images), batch_size):
        out = runner.predict(images[s:s + batch_size])
        if mode == "flat":
            leaf = np.argmax(out, axis=1)
            decoded.append(flat_depth_labels(leaf, hierarchy))
            independent.append(flat_marginal_labels(_softmax(out.astype(np.float64)), hierarchy))
        else:
            decoded.append(out[0])
            independent.append(out[1])
    return np.concatenate(decoded), np.concatenate(independent)


def _score(depth_labels: np.ndarray, independent: np.ndarray, labels: np.ndarray,
           hierarchy: Hierarchy) -> dict[str, Any]:
    metrics = HierarchicalSegMetrics(hierarchy, ignore_index=IGNORE_INDEX)
    metrics.update(depth_labels, labels)
    indep = HierarchicalSegMetrics(hierarchy, ignore_index=IGNORE_INDEX)
    indep.update(independent, labels)
    result = metrics.to_dict()
    result["table"] = metrics.format_table()
    ind = indep.to_dict()
    result["independent"] = {
        "consistency_rate": ind["consistency_rate"],
        "miou_per_depth": [r["miou"] for r in ind["per_depth"]],
    }
    return result


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def format_comparison(results: dict[str, Any], hierarchy: Hierarchy) -> str:
    """The side-by-side table printed at the end of the demo."""
    flat, hssn = results["models"]["flat"], results["models"]["hssn"]
    rows = [("", "flat CE", "HSSN")]
    for d in range(hierarchy.max_depth):
        n_cls = len(hierarchy.depth_channels[d])
        rows.append((f"mIoU % depth {d + 1} ({n_cls} classes)",
                     _pct(flat["per_depth"][d]["miou"]), _pct(hssn["per_depth"][d]["miou"])))
    for d in range(hierarchy.max_depth):
        rows.append((f"pixel acc % depth {d + 1}", _pct(flat["per_depth"][d]["pixel_accuracy"]),
                     _pct(hssn["per_depth"][d]["pixel_accuracy"])))
    rows.append(("consistency % (decoded)", _pct(flat["consistency_rate"]), _pct(hssn["consistency_rate"])))
    rows.append(("consistency % (independent argmax)", _pct(flat["independent"]["consistency_rate"]),
                 _pct(hssn["independent"]["consistency_rate"])))

    def sev(m):
        v = m["mistake_severity"]
        return "-" if v is None else f"{v:6.3f}"

    rows.append(("mistake severity (1 = sibling)", sev(flat), sev(hssn)))
    rows.append(("wrong leaf pixels", str(flat["num_mistakes"]), str(hssn["num_mistakes"])))
    rows.append(("hierarchical F1 %", _pct(flat["hierarchical_f1"]), _pct(hssn["hierarchical_f1"])))
    rows.append(("train time s", f"{flat['train_seconds']:.1f}", f"{hssn['train_seconds']:.1f}"))
    w = max(len(r[0]) for r in rows)
    notes = [
        "decoded: flat = leaf argmax, coarser depths read off its path; HSSN = decode(method='path').",
        "independent: argmax at each depth on its own (flat: leaf probabilities summed per class), "
        "scored only for consistency.",
    ]
    return "\n".join([f"{a:<{w}}  {b:>9}  {c:>9}" for a, b, c in rows] + notes)


def run_demo(config: DemoConfig, out_dir: str | os.PathLike = "demo_out", progress: bool = True,
             log=print) -> dict[str, Any]:
    """Train both models, score them, write ``results.json`` and ``demo.png`` to ``out_dir``."""
    from tqdm.auto import tqdm

    from ..cli import load_hierarchy
    from .figure import save_figure

    started = time.perf_counter()
    hierarchy = load_hierarchy(config.preset)
    os.makedirs(out_dir, exist_ok=True)
    log(f"hieraloss demo: {config.preset} tree ({hierarchy.num_leaves} leaves, {hierarchy.num_nodes} "
        f"channels, depth {hierarchy.max_depth}), backend {config.backend}, seed {config.seed}")
    t0 = time.perf_counter()
    splits = make_splits(hierarchy, config.num_train, config.num_test, size=config.size, seed=config.seed,
                         ignore_index=IGNORE_INDEX)
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    log(f"scenes: {config.num_train} train / {config.num_test} test, {config.size}x{config.size} "
        f"({time.perf_counter() - t0:.1f} s); {config.epochs} epochs x {config.steps_per_epoch} steps "
        f"of {config.batch_size} per model")
    batches = batch_order(config)
    _set_threads(config)

    results: dict[str, Any] = {"config": asdict(config), "models": {}}
    figure_predictions = {}
    for mode in MODELS:
        runner = _runner(config, hierarchy, mode)
        history = []
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"train {mode:>4}", unit="step", disable=None if progress else True,
                   leave=True, dynamic_ncols=True)
        for step, idx in enumerate(bar):
            runner.set_lr(learning_rate(config, step))
            parts = runner.train_step(train_x[idx], train_y[idx], step, config.total_steps)
            history.append(parts)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded, independent = _predict(runner, test_x, hierarchy, mode, config.batch_size * 4)
        scored = _score(decoded, independent, test_y, hierarchy)
        scored["train_seconds"] = train_seconds
        scored["eval_seconds"] = time.perf_counter() - t0
        scored["parameters"] = runner.num_parameters()
        per_epoch = [history[e * config.steps_per_epoch:(e + 1) * config.steps_per_epoch]
                     for e in range(config.epochs)]
        scored["loss_per_epoch"] = [{k: float(np.mean([h[k] for h in epoch])) for k in history[0]}
                                    for epoch in per_epoch]
        results["models"][mode] = scored
        figure_predictions["flat CE" if mode == "flat" else "HSSN"] = decoded[: config.figure_images]
        log(f"{mode}: trained in {train_seconds:.1f} s, final epoch loss "
            f"{scored['loss_per_epoch'][-1]['loss']:.4f}")

    table = format_comparison(results, hierarchy)
    results["table"] = table
    results["hierarchy"] = {"preset": config.preset, "num_nodes": hierarchy.num_nodes,
                            "num_leaves": hierarchy.num_leaves, "max_depth": hierarchy.max_depth,
                            "fingerprint": hierarchy.fingerprint}
    results["environment"] = {"python": platform.python_version(), "machine": platform.machine(),
                              "cpu_count": os.cpu_count(), **_backend_versions(config.backend)}
    png = os.path.join(out_dir, "demo.png")
    save_figure(png, hierarchy, test_x[: config.figure_images], test_y[: config.figure_images],
                figure_predictions, ignore_index=IGNORE_INDEX)
    results["total_seconds"] = time.perf_counter() - started
    path = os.path.join(out_dir, "results.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, allow_nan=False)
    log("")
    log(f"held-out scores ({config.num_test} scenes; the decoded labels are scored):")
    log(table)
    log(f"wrote {path} and {png} ({results['total_seconds']:.0f} s in all)")
    return results


def _backend_versions(backend: str) -> dict[str, Any]:
    if backend == "torch":
        import torch

        return {"torch": torch.__version__, "threads": torch.get_num_threads()}
    import paddle

    return {"paddle": paddle.__version__}
