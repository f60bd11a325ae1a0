"""The demo: flat cross-entropy, HSSN, LogicSeg and the leaf-logit hierarchical objectives on the
same procedural scenes and budget.

Every model is the same tiny FCN (:mod:`hieraloss.demo.model`) with the same initial trunk weights
(one seed), batches, steps, optimiser and learning-rate schedule. They differ only in the output
head and the objective (:data:`hieraloss.demo.backends.OBJECTIVES`):

* flat heads (K leaf logits): ``flat`` (cross-entropy), ``hxe`` (hierarchical cross-entropy,
  ``alpha``), ``soft`` (soft-label cross-entropy, ``beta``). Decoded with
  ``decode_leaf_logits(..., "top_down")``: at each depth the child of the node already chosen with
  the largest summed leaf probability, so the coarse labels are the classes the model gives the
  most probability to, not the path of the single best leaf. Their "independent" prediction is the
  per-depth argmax of the summed leaf probabilities.
* HSSN heads (N node logits plus a 1/4-resolution embedding head): ``hssn`` (``hssn_loss`` with the
  published weights: 5 x tree-min + CE per depth + the triplet loss on its ramp) and ``hssn_tm1``
  (``tree_min_weight=1``), and ``logicseg`` (``logicseg_loss``: asymmetric BCE plus the three logic
  rules, ramped in; its embedding head is unused). Decoded with ``decode(..., "path")``; their
  "independent" prediction is ``decode(..., "independent")``, and ``decode(..., "logic")`` (LogicSeg's
  logic-guided reasoning) is scored beside ``path``.

Each model is also decoded with a second decoder (flat heads: ``"argmax"``; HSSN heads:
``"top_down"``), kept in ``results.json`` to show whether the decoder matters.

Confidence (per-depth calibration, ECE), for the decoded class at each depth: flat heads, the
summed leaf softmax under that class; HSSN heads, the softmax over that depth's class channels
(what the per-depth cross-entropy term trains; a distribution over the same classes as the flat
heads'). ``results.json`` also holds, for HSSN heads, the ECE of the sigmoid of the class's
path-min logit (the tree-min loss's own probability).

Everything is scored on a held-out split with :class:`hieraloss.metrics.HierarchicalSegMetrics`.
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
from .backends import FLAT_ALTERNATIVE, FLAT_DECODE, HSSN_ALTERNATIVE, HSSN_DECODE, MODELS, OBJECTIVES
from .data import make_splits

__all__ = ["DemoConfig", "run_demo", "MODELS", "OBJECTIVES", "parse_models", "flat_confidence",
           "node_confidence", "format_comparison"]

IGNORE_INDEX = 255
ECE_BINS = 15


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
    # CPU threads of the framework (None keeps its default). 1 by default: the numbers do not
    # depend on the machine's core count (torch's reductions differ with the thread count), a
    # model this small gains little from a second thread, and a second thread on a core that
    # another process keeps busy made every step ~20x slower here.
    threads: int | None = 1
    models: tuple[str, ...] = MODELS
    hxe_alpha: float = 0.1  # hierarchical_cross_entropy's default
    soft_beta: float = 1.0  # soft_label_cross_entropy's default

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", parse_models(self.models))

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


def parse_models(models: Any) -> tuple[str, ...]:
    """Model names from a sequence and/or comma-separated strings, in the order given, duplicates
    dropped; ``"all"`` is every model. Raises ``ValueError`` on an unknown name or an empty list."""
    if isinstance(models, str):
        models = [models]
    names: list[str] = []
    for item in models:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                names.extend(MODELS)
            elif name not in OBJECTIVES:
                raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)} (or 'all')")
            else:
                names.append(name)
    if not names:
        raise ValueError(f"no model given; choose from {', '.join(MODELS)} (or 'all')")
    return tuple(dict.fromkeys(names))


def batch_order(config: DemoConfig) -> list[np.ndarray]:
    """The training batches (indices into the train split), shared by every model."""
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


def _members(hierarchy: Hierarchy, d: int) -> np.ndarray:
    """``[K, C_d]``: 1 where leaf k lies under class c of depth d+1 (``depth_channels[d]`` order)."""
    classes = hierarchy.depth_channels[d]
    return (hierarchy.leaf_paths[:, d][:, None] == classes[None, :]).astype(np.float64)


def flat_marginal_labels(leaf_probs: np.ndarray, hierarchy: Hierarchy) -> np.ndarray:
    """Per-depth argmax of the leaf probabilities summed under each class ``[B, L, ...]``."""
    out = []
    for d in range(hierarchy.max_depth):
        classes = hierarchy.depth_channels[d]
        marginal = np.einsum("bk...,kc->bc...", leaf_probs, _members(hierarchy, d).astype(leaf_probs.dtype))
        out.append(hierarchy.node_ids[classes[np.argmax(marginal, axis=1)]])
    return np.stack(out, axis=1)


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _class_index(hierarchy: Hierarchy, d: int, node_ids: np.ndarray) -> np.ndarray:
    """Index into ``depth_channels[d]`` of each node id in ``node_ids`` (which must be classes there)."""
    classes = hierarchy.depth_channels[d]
    lookup = np.full(hierarchy.num_nodes, -1, dtype=np.int64)
    lookup[hierarchy.node_ids[classes]] = np.arange(classes.size)
    idx = lookup[node_ids]
    if (idx < 0).any():
        raise ValueError(f"predicted node ids that are not classes at depth {d + 1}")
    return idx


def flat_confidence(leaf_logits: np.ndarray, depth_labels: np.ndarray, hierarchy: Hierarchy) -> np.ndarray:
    """``[B, L, ...]`` confidence of a flat head in its predicted class at each depth: the leaf
    softmax summed under the class ``depth_labels[:, d]`` (node ids)."""
    probs = _softmax(np.asarray(leaf_logits, dtype=np.float64))
    out = []
    for d in range(hierarchy.max_depth):
        marginal = np.einsum("bk...,kc->bc...", probs, _members(hierarchy, d))
        idx = _class_index(hierarchy, d, depth_labels[:, d])
        out.append(np.take_along_axis(marginal, idx[:, None], axis=1)[:, 0])
    return np.clip(np.stack(out, axis=1), 0.0, 1.0)


def node_confidence(node_logits: np.ndarray, depth_labels: np.ndarray, hierarchy: Hierarchy,
                    kind: str = "softmax") -> np.ndarray:
    """``[B, L, ...]`` confidence of an HSSN head (node logits ``[B, N, ...]`` in channel order) in
    its predicted class at each depth. ``"softmax"``: the softmax over the depth's class channels
    (``depth_channels[d]``) at the predicted class; ``"path_min"``: the sigmoid of the predicted
    class's path-min logit (the minimum over it and its ancestors)."""
    x = np.asarray(node_logits, dtype=np.float64)
    if kind == "path_min":
        zmin = x[:, hierarchy.ancestor_table].min(axis=2)  # [B, N, L, ...] -> [B, N, ...]
    elif kind != "softmax":
        raise ValueError(f"kind must be 'softmax' or 'path_min', got {kind!r}")
    out = []
    for d in range(hierarchy.max_depth):
        classes = hierarchy.depth_channels[d]
        idx = _class_index(hierarchy, d, depth_labels[:, d])
        if kind == "softmax":
            conf = np.take_along_axis(_softmax(x[:, classes]), idx[:, None], axis=1)[:, 0]
        else:
            z = np.take_along_axis(zmin, classes[idx][:, None], axis=1)[:, 0]
            conf = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        out.append(conf)
    return np.clip(np.stack(out, axis=1), 0.0, 1.0)


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


def _backend_module(backend: str):
    if backend == "torch":
        from .. import torch as hl
    elif backend == "paddle":
        from .. import paddle as hl
    else:
        raise ValueError(f"backend must be 'torch' or 'paddle', got {backend!r}")
    return hl


def _runner(config: DemoConfig, hierarchy: Hierarchy, mode: str):
    if config.backend == "torch":
        from .backends import TorchRunner

        return TorchRunner(config, hierarchy, mode)
    if config.backend == "paddle":
        from .backends import PaddleRunner

        return PaddleRunner(config, hierarchy, mode)
    raise ValueError(f"backend must be 'torch' or 'paddle', got {config.backend!r}")


def _metrics(hierarchy: Hierarchy) -> HierarchicalSegMetrics:
    return HierarchicalSegMetrics(hierarchy, ignore_index=IGNORE_INDEX, ece_bins=ECE_BINS)


def _evaluate(runner, images: np.ndarray, labels: np.ndarray, hierarchy: Hierarchy, mode: str,
              batch_size: int, keep: int) -> tuple[dict[str, Any], np.ndarray]:
    """Score ``runner`` on the held-out split; returns the scores and the decoded labels of the
    first ``keep`` images (for the figure)."""
    leaf_head = OBJECTIVES[mode].head == "leaf"
    main, indep, alt = _metrics(hierarchy), _metrics(hierarchy), _metrics(hierarchy)
    path_min = None if leaf_head else _metrics(hierarchy)
    logic, changed, counted = (None if leaf_head else _metrics(hierarchy)), 0, 0
    kept = []
    for s in range(0, len(images), batch_size):
        out = runner.predict(images[s:s + batch_size])
        target = labels[s:s + batch_size]
        decoded = out["decoded"]
        if leaf_head:
            confidence = flat_confidence(out["logits"], decoded, hierarchy)
            independent = flat_marginal_labels(_softmax(out["logits"].astype(np.float64)), hierarchy)
        else:
            confidence = node_confidence(out["logits"], decoded, hierarchy, "softmax")
            path_min.update(decoded, target, node_confidence(out["logits"], decoded, hierarchy, "path_min"))
            independent = out["independent"]
            logic.update(out["logic"], target)
            changed += int(np.count_nonzero((out["logic"] != decoded).any(axis=1)))
            counted += int(np.prod(target.shape))
        main.update(decoded, target, confidence)
        indep.update(independent, target)
        alt.update(out["alternative"], target)
        if sum(len(k) for k in kept) < keep:
            kept.append(decoded)
    result = main.to_dict()
    result["table"] = main.format_table()
    result["decoder"] = FLAT_DECODE if leaf_head else HSSN_DECODE
    result["confidence"] = ("leaf softmax summed under the class" if leaf_head
                            else "softmax over the depth's class channels")
    ind = indep.to_dict()
    result["independent"] = {"consistency_rate": ind["consistency_rate"],
                             "miou_per_depth": [r["miou"] for r in ind["per_depth"]]}
    a = alt.to_dict()
    result["alternative_decoder"] = {
        "method": FLAT_ALTERNATIVE if leaf_head else HSSN_ALTERNATIVE,
        "miou_per_depth": [r["miou"] for r in a["per_depth"]],
        "consistency_rate": a["consistency_rate"],
        "mistake_severity": a["mistake_severity"],
    }
    if logic is not None:
        g = logic.to_dict()
        result["logic_decoder"] = {"miou_per_depth": [r["miou"] for r in g["per_depth"]],
                                   "changed_pixels": changed / max(counted, 1)}
    if path_min is not None:
        result["ece_path_min_per_depth"] = [r["ece"] for r in path_min.to_dict()["per_depth"]]
    return result, np.concatenate(kept)[:keep]


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def format_comparison(results: dict[str, Any], hierarchy: Hierarchy) -> str:
    """The side-by-side table printed at the end of the demo: one column per model (``n/a`` for a
    model that was not trained, with the reason in a note)."""
    names = list(results["models"])
    models = [results["models"][n] for n in names]
    trained = [m for m in models if "skipped" not in m]
    L = hierarchy.max_depth

    def row(label: str, fn) -> tuple[str, ...]:
        return (label, *("n/a" if "skipped" in m else fn(m) for m in models))

    def sev(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [("", *(OBJECTIVES[n].label for n in names))]
    for d in range(L):
        n_cls = len(hierarchy.depth_channels[d])
        kind = "leaves" if d == L - 1 else "classes"
        rows.append(row(f"mIoU % depth {d + 1} ({n_cls} {kind})", lambda m, d=d: _pct(m["per_depth"][d]["miou"])))
    for d in range(L):
        rows.append(row(f"pixel acc % depth {d + 1}", lambda m, d=d: _pct(m["per_depth"][d]["pixel_accuracy"])))
    rows.append(row("consistency % (decoded)", lambda m: _pct(m["consistency_rate"])))
    rows.append(row("consistency % (independent argmax)", lambda m: _pct(m["independent"]["consistency_rate"])))
    rows.append(row("mistake severity (1 = sibling)", lambda m: sev(m["mistake_severity"])))
    rows.append(row("wrong leaf pixels", lambda m: str(m["num_mistakes"])))
    rows.append(row("hierarchical F1 %", lambda m: _pct(m["hierarchical_f1"])))
    for d in range(L):
        rows.append(row(f"ECE % depth {d + 1} (15 bins)", lambda m, d=d: _pct(m["per_depth"][d]["ece"])))
    if any("logic_decoder" in m for m in trained):
        rows.append(row(f"mIoU % depth {L}, decode 'logic'",
                        lambda m: _pct(m["logic_decoder"]["miou_per_depth"][-1]) if "logic_decoder" in m else "-"))
        rows.append(row("pixels 'logic' changes %",
                        lambda m: _pct(m["logic_decoder"]["changed_pixels"]) if "logic_decoder" in m else "-"))
    rows.append(row("train time s", lambda m: f"{m['train_seconds']:.1f}"))
    first = max(len(r[0]) for r in rows)
    widths = [max(9, *(len(r[i]) for r in rows)) for i in range(1, len(rows[0]))]
    lines = ["  ".join([f"{r[0]:<{first}}", *(f"{c:>{w}}" for c, w in zip(r[1:], widths, strict=True))])
             for r in rows]
    leaf_names = [OBJECTIVES[n].label for n, m in zip(names, models, strict=True)
                  if OBJECTIVES[n].head == "leaf" and "skipped" not in m]
    node_names = [OBJECTIVES[n].label for n, m in zip(names, models, strict=True)
                  if OBJECTIVES[n].head == "node" and "skipped" not in m]
    notes = []
    if leaf_names:
        notes.append(f"{', '.join(leaf_names)}: K leaf logits, decode_leaf_logits(method='{FLAT_DECODE}'); "
                     "confidence = leaf softmax summed under the class.")
    if node_names:
        notes.append(f"{', '.join(node_names)}: N node logits, decode(method='{HSSN_DECODE}'); "
                     "confidence = softmax over the depth's class channels.")
    cfg = results["config"]
    settings = {"hssn": "HSSN = hssn_loss, published weights (5 x tree-min + CE per depth + triplet)",
                "hssn_tm1": "HSSN tm=1 = the same with tree_min_weight=1",
                "hxe": f"HXE alpha={cfg['hxe_alpha']:g}", "soft": f"soft labels beta={cfg['soft_beta']:g}",
                "logicseg": "LogicSeg = logicseg_loss (asymmetric BCE + 0.2 x rules, ramped in over 25%..62.5% "
                            "of training)"}
    shown = [settings[n] for n, m in zip(names, models, strict=True) if n in settings and "skipped" not in m]
    if shown:
        notes.append("; ".join(shown) + ".")
    if node_names:
        notes.append("decode 'logic': LogicSeg's logic-guided reasoning (rule descent, then 'path'), scored "
                     "against the same labels; 'changes' counts pixels whose path differs from 'path'.")
    if trained:
        notes.append("independent: argmax at each depth on its own (flat heads: leaf probabilities summed "
                     "per class), scored only for consistency.")
    for n, m in zip(names, models, strict=True):
        if "skipped" in m:
            notes.append(f"n/a {OBJECTIVES[n].label}: {m['skipped']}")
    return "\n".join(lines + notes)


def run_demo(config: DemoConfig, out_dir: str | os.PathLike = "demo_out", progress: bool = True,
             log=print) -> dict[str, Any]:
    """Train every model of ``config.models``, score them, write ``results.json``, ``demo.png``
    (predictions) and ``miou.png`` (per-depth mIoU per objective) to ``out_dir``."""
    from tqdm.auto import tqdm

    from .. import presets
    from .backends import missing_functions
    from .figure import save_figure, save_miou_figure

    started = time.perf_counter()
    load_at_start = _load_average()  # other processes' load: it slows the run and its train times
    hierarchy = presets.load(config.preset)
    os.makedirs(out_dir, exist_ok=True)
    log(f"hieraloss demo: {config.preset} tree ({hierarchy.num_leaves} leaves, {hierarchy.num_nodes} "
        f"channels, depth {hierarchy.max_depth}), backend {config.backend}, seed {config.seed}, "
        f"models {', '.join(config.models)}")
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
    hl = _backend_module(config.backend)

    results: dict[str, Any] = {"config": asdict(config), "models": {}}
    figure_predictions = {}
    for mode in config.models:
        missing = missing_functions(hl, mode)
        if missing:
            reason = f"hieraloss.{config.backend} has no {', '.join(missing)}"
            results["models"][mode] = {"skipped": reason}
            log(f"{mode}: not trained ({reason})")
            continue
        runner = _runner(config, hierarchy, mode)
        history = []
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"train {mode:>8}", unit="step", disable=None if progress else True,
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
        scored, shown = _evaluate(runner, test_x, test_y, hierarchy, mode, config.batch_size * 4,
                                  config.figure_images)
        scored["objective"] = OBJECTIVES[mode].description
        scored["train_seconds"] = train_seconds
        scored["eval_seconds"] = time.perf_counter() - t0
        scored["parameters"] = runner.num_parameters()
        per_epoch = [history[e * config.steps_per_epoch:(e + 1) * config.steps_per_epoch]
                     for e in range(config.epochs)]
        scored["loss_per_epoch"] = [{k: float(np.mean([h[k] for h in epoch])) for k in history[0]}
                                    for epoch in per_epoch]
        results["models"][mode] = scored
        figure_predictions[OBJECTIVES[mode].label] = shown
        log(f"{mode}: trained in {train_seconds:.1f} s, final epoch loss "
            f"{scored['loss_per_epoch'][-1]['loss']:.4f}")

    table = format_comparison(results, hierarchy)
    results["table"] = table
    results["hierarchy"] = {"preset": config.preset, "num_nodes": hierarchy.num_nodes,
                            "num_leaves": hierarchy.num_leaves, "max_depth": hierarchy.max_depth,
                            "fingerprint": hierarchy.fingerprint}
    results["environment"] = {"python": platform.python_version(), "machine": platform.machine(),
                              "cpu_count": os.cpu_count(), "load_average_start": load_at_start,
                              "load_average_end": _load_average(),
                              **_backend_versions(config.backend)}
    written = []
    if figure_predictions:
        png = os.path.join(out_dir, "demo.png")
        save_figure(png, hierarchy, test_x[: config.figure_images], test_y[: config.figure_images],
                    figure_predictions, ignore_index=IGNORE_INDEX)
        bars = os.path.join(out_dir, "miou.png")
        trained = [m for m in config.models if "skipped" not in results["models"][m]]
        save_miou_figure(bars, hierarchy, [OBJECTIVES[m].label for m in trained],
                         np.array([[np.nan if r["miou"] is None else r["miou"]
                                    for r in results["models"][m]["per_depth"]] for m in trained]),
                         title=f"held-out mIoU per depth ({config.epochs} epochs, seed {config.seed})")
        written += [png, bars]
    results["total_seconds"] = time.perf_counter() - started
    path = os.path.join(out_dir, "results.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, allow_nan=False)
    log("")
    log(f"held-out scores ({config.num_test} scenes; the decoded labels are scored):")
    log(table)
    log(f"wrote {', '.join([path, *written])} ({results['total_seconds']:.0f} s in all)")
    return results


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _backend_versions(backend: str) -> dict[str, Any]:
    if backend == "torch":
        import torch

        return {"torch": torch.__version__, "threads": torch.get_num_threads()}
    import paddle

    return {"paddle": paddle.__version__}
