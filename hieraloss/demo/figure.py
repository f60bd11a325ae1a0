"""The demo figures (matplotlib, Agg): input, ground truth and each model's prediction at every depth
(``save_figure``), and the held-out mIoU per depth of each objective (``save_miou_figure``)."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence

import numpy as np

from ..hierarchy import Hierarchy

__all__ = ["node_colours", "colourize", "save_figure", "save_miou_figure"]


def node_colours(hierarchy: Hierarchy) -> np.ndarray:
    """RGB colours ``[N, 3]`` indexed by node id: one hue per depth-1 subtree; below depth 1,
    siblings share their parent's hue at different brightness, so the figure shows the tree."""
    tops = np.flatnonzero(hierarchy.parent < 0)
    colours = np.zeros((hierarchy.num_nodes, 3))
    for ch in range(hierarchy.num_nodes):
        top = int(hierarchy.ancestor_table[ch, 0])
        hue = float(np.flatnonzero(tops == top)[0]) / len(tops)
        if hierarchy.depth[ch] == 1:
            sat, val = 0.8, 0.85
        else:
            siblings = hierarchy.children[int(hierarchy.parent[ch])]
            i = int(np.flatnonzero(siblings == ch)[0])
            sat = 0.45 + 0.1 * min(int(hierarchy.depth[ch]), 4)
            val = 0.35 + 0.6 * (i + 1) / (len(siblings) + 1)
        colours[hierarchy.node_ids[ch]] = colorsys.hsv_to_rgb(hue, sat, val)
    return colours


def colourize(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Node-id map ``[H, W]`` to an RGB image ``[H, W, 3]``; ignored (and unknown) pixels are black."""
    labels = np.asarray(labels)
    known = (labels >= 0) & (labels < len(colours)) & (labels != ignore_index)
    rgb = colours[np.where(known, labels, 0)]
    rgb[~known] = 0.0
    return rgb


def save_figure(path: str | os.PathLike, hierarchy: Hierarchy, images: np.ndarray, labels: np.ndarray,
                predictions: Mapping[str, np.ndarray], ignore_index: int = 255, dpi: int = 110) -> None:
    """Write a PNG grid: one row per image; columns input, ground truth at depths 1..L, then each
    model's per-depth prediction (``predictions[name]`` is ``[n, L, H, W]`` node ids)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    colours = node_colours(hierarchy)
    n = len(images)
    depths = hierarchy.max_depth
    truth = np.stack([hierarchy.labels_at_depth(labels, d, ignore_index) for d in range(1, depths + 1)], 1)
    columns = [("input", None)] + [(f"truth d{d}", truth[:, d - 1]) for d in range(1, depths + 1)]
    for name, pred in predictions.items():
        columns += [(f"{name} d{d}", np.asarray(pred)[:, d - 1]) for d in range(1, depths + 1)]

    fig, axes = plt.subplots(n, len(columns), figsize=(1.5 * len(columns), 1.5 * n + 2), squeeze=False)
    for row in range(n):
        for col, (title, maps) in enumerate(columns):
            ax = axes[row, col]
            if maps is None:
                ax.imshow(np.clip(np.transpose(images[row], (1, 2, 0)), 0, 1), interpolation="nearest")
            else:
                ax.imshow(colourize(maps[row], colours, ignore_index), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)

    # Legend: one column per depth-1 node holding its subtree (depth-1 nodes only for big trees).
    tops = np.flatnonzero(hierarchy.parent < 0)
    small = hierarchy.num_nodes <= 40
    groups = []
    for top in tops:
        members = np.flatnonzero(hierarchy.ancestor_table[:, 0] == top) if small else [top]
        members = sorted(members, key=lambda ch: tuple(hierarchy.ancestor_table[ch, : hierarchy.depth[ch]]))
        groups.append([Patch(color=colours[hierarchy.node_ids[ch]],
                             label=("  " * (int(hierarchy.depth[ch]) - 1)) + hierarchy.node_names[ch])
                       for ch in members])
    groups.append([Patch(color=(0, 0, 0), label="ignored")])
    rows = max(len(g) for g in groups) if small else int(np.ceil(len(groups) / 8))
    if small:  # pad every column to the same height so each subtree stays in its own column
        handles = [h for g in groups for h in g + [Patch(color="none", label="")] * (rows - len(g))]
        ncol = len(groups)
    else:
        handles = [h for g in groups for h in g]
        ncol = min(8, len(handles))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=6, frameon=False)
    legend_height = 0.15 * rows + 0.3
    fig.set_figheight(1.5 * n + 0.4 + legend_height)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_miou_figure(path: str | os.PathLike, hierarchy: Hierarchy, names: Sequence[str], miou: np.ndarray,
                     title: str = "held-out mIoU per depth", dpi: int = 110) -> None:
    """Write a PNG bar chart: one group per depth, one bar per model (``miou [M, L]`` in [0, 1],
    NaN bars are left out), each bar labelled with its value in percent."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    miou = np.asarray(miou, dtype=np.float64)
    L = hierarchy.max_depth
    if miou.shape != (len(names), L):
        raise ValueError(f"miou must have shape [models, depths] = {(len(names), L)}, got {miou.shape}")
    groups = [f"depth {d + 1}\n({len(hierarchy.depth_channels[d])} "
              f"{'leaves' if d == L - 1 else 'classes'})" for d in range(L)]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(names) * L, 3.6))
    cmap = plt.get_cmap("tab10")
    x = np.arange(L)
    for i, name in enumerate(names):
        pos = x - 0.4 + width * (i + 0.5)
        vals = 100 * miou[i]
        shown = np.isfinite(vals)
        bars = ax.bar(pos[shown], vals[shown], width * 0.95, label=name, color=cmap(i % 10))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    finite = miou[np.isfinite(miou)]
    low = 100 * float(finite.min()) if finite.size else 0.0
    ax.set_ylim(max(0.0, np.floor(low / 10) * 10 - 10), 100)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("mIoU %")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(names), 5), loc="upper center", bbox_to_anchor=(0.5, -0.2),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
