"""A procedural scene data set whose classes follow a :class:`~hieraloss.Hierarchy`.

Every leaf gets an appearance read off its path in the tree, coarse to fine:

* the **depth-1 ancestor** fixes the colour (one hue per depth-1 node) and the shape family
  (for Cityscapes: flat -> bands, construction -> boxes, object -> poles with a head,
  nature -> blobs, sky -> the region above a wavy horizon, human -> upright ellipses with a
  head, vehicle -> wide boxes with a cabin);
* an intermediate ancestor (trees deeper than 2) shifts the brightness;
* the **leaf** itself differs from its siblings only by a texture (plain, stripes in four
  directions, checks, dots) at a few periods.

So telling siblings apart needs context (a texture is invisible in one noisy pixel and in a
thin or tiny object), while the parent is visible from colour and shape. Per-instance colour
jitter, a global gain and Gaussian noise keep single pixels ambiguous; small unlabelled clutter
rectangles are marked ``ignore_index``. Everything is drawn from a seeded ``numpy`` Generator:
the same seed gives identical arrays.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from ..hierarchy import Hierarchy

__all__ = ["Appearance", "appearance", "make_scenes", "make_splits", "SHAPE_FAMILIES", "TEXTURES"]

SHAPE_FAMILIES = ("band", "box", "pole", "blob", "top", "upright", "wide")
TEXTURES = ("plain", "hstripes", "vstripes", "checks", "diagonal", "dots", "antidiagonal")
_PERIODS = (6, 4, 8)

# Scene parameters (fixed: the data set is not tuned to favour either model).
_NOISE = 0.12
_TEXTURE_AMPLITUDE = 0.14
_COLOUR_JITTER = 0.08
_GAIN = (0.85, 1.15)
_OBJECTS = (3, 9)
_VOID_PROBABILITY = 0.4


@dataclass(frozen=True)
class Appearance:
    """How each leaf id is drawn: ``colour [K, 3]`` RGB in [0, 1], ``texture [K]`` (index into
    :data:`TEXTURES`), ``period [K]`` pixels, ``family [K]`` (index into :data:`SHAPE_FAMILIES`)."""

    colour: np.ndarray
    texture: np.ndarray
    period: np.ndarray
    family: np.ndarray


def _sibling_index(hierarchy: Hierarchy, channel: int) -> int:
    parent = int(hierarchy.parent[channel])
    if parent < 0:
        siblings = np.flatnonzero(hierarchy.parent < 0)
    else:
        siblings = hierarchy.children[parent]
    return int(np.flatnonzero(siblings == channel)[0])


def appearance(hierarchy: Hierarchy) -> Appearance:
    """The appearance table of ``hierarchy``'s leaves (depends on the tree only, not on a seed)."""
    k = hierarchy.num_leaves
    tops = np.flatnonzero(hierarchy.parent < 0)
    colour = np.zeros((k, 3))
    texture = np.zeros(k, dtype=np.int64)
    period = np.zeros(k, dtype=np.int64)
    family = np.zeros(k, dtype=np.int64)
    for leaf in range(k):
        ch = int(hierarchy.leaf_channels[leaf])
        depth = int(hierarchy.depth[ch])
        path = hierarchy.leaf_paths[leaf]
        g = int(np.flatnonzero(tops == path[0])[0])
        value = 0.62
        if depth >= 3:  # an intermediate ancestor shifts the brightness
            value += 0.12 * ((_sibling_index(hierarchy, int(path[1])) % 3) - 1)
        colour[leaf] = colorsys.hsv_to_rgb((g / len(tops)) % 1.0, 0.65, value)
        family[leaf] = g % len(SHAPE_FAMILIES)
        if depth == 1:  # a leaf directly under the root: nothing to tell it from
            texture[leaf], period[leaf] = 0, _PERIODS[0]
        else:
            i = _sibling_index(hierarchy, ch)
            texture[leaf] = i % len(TEXTURES)
            period[leaf] = _PERIODS[(i // len(TEXTURES)) % len(_PERIODS)]
    for a in (colour, texture, period, family):
        a.setflags(write=False)
    return Appearance(colour, texture, period, family)


def _texture(kind: int, period: int, yy: np.ndarray, xx: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """A zero-mean-ish pattern in [-1, 1] on the pixel grid."""
    y = yy + phase[0]
    x = xx + phase[1]
    half = period / 2
    name = TEXTURES[kind]
    if name == "plain":
        return np.zeros(np.broadcast_shapes(yy.shape, xx.shape))
    if name == "hstripes":
        t = (y % period) < half
    elif name == "vstripes":
        t = (x % period) < half
    elif name == "checks":
        t = ((y // half) + (x // half)) % 2 == 0
    elif name == "diagonal":
        t = ((x + y) % period) < half
    elif name == "antidiagonal":
        t = ((x - y) % period) < half
    else:  # dots: bright spots on a slightly dark ground
        t = ((y % period) < 2) & ((x % period) < 2)
        return np.where(t, 1.0, -0.35)
    return np.where(t, 1.0, -1.0)


def _shape_mask(family: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                size: int, horizon: int) -> np.ndarray:
    """A boolean mask of one object of the given shape family at a random place and scale."""
    s = size
    # Log-uniform scale: many small objects, some large ones.
    scale = float(np.exp(rng.uniform(np.log(0.06), np.log(0.45)))) * s
    cx = rng.uniform(0, s)
    if family == "band":
        y0 = rng.uniform(horizon, s - 2)
        h = max(2.0, scale * 0.4)
        w = rng.uniform(0.4, 1.0) * s
        slope = rng.uniform(-0.15, 0.15)
        top = y0 + slope * (xx - cx)
        return (yy >= top) & (yy < top + h) & (np.abs(xx - cx) < w / 2)
    if family == "top":
        y0 = rng.uniform(0, horizon)
        h = max(2.0, scale * 0.35)
        w = rng.uniform(0.3, 0.9) * s
        return (yy >= y0) & (yy < y0 + h) & (np.abs(xx - cx) < w / 2)
    if family == "box":
        h = scale * rng.uniform(1.0, 1.8)
        w = scale * rng.uniform(0.5, 1.0)
        bottom = rng.uniform(horizon, min(s, horizon + 0.3 * s))
        return (yy <= bottom) & (yy > bottom - h) & (np.abs(xx - cx) < w / 2)
    if family == "pole":
        h = scale * rng.uniform(1.2, 2.0)
        width = rng.uniform(1.0, 3.0)
        bottom = rng.uniform(horizon, s)
        stick = (yy <= bottom) & (yy > bottom - h) & (np.abs(xx - cx) < width / 2)
        head = max(2.0, scale * rng.uniform(0.25, 0.5))
        hy = bottom - h
        return stick | ((np.abs(yy - hy) < head / 2) & (np.abs(xx - cx) < head / 2))
    if family == "blob":
        cy = rng.uniform(horizon - 0.2 * s, s)
        mask = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            r = scale * rng.uniform(0.3, 0.6)
            oy, ox = rng.normal(0, scale * 0.3, size=2)
            mask |= (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 < r * r
        return mask
    if family == "upright":
        h = scale * rng.uniform(0.8, 1.2)
        w = h * rng.uniform(0.3, 0.45)
        bottom = rng.uniform(horizon, s)
        cy = bottom - h / 2
        body = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 < 1
        r = max(1.0, w * 0.45)
        return body | ((yy - (bottom - h - r * 0.6)) ** 2 + (xx - cx) ** 2 < r * r)
    # wide: a body with a narrower cabin on top
    w = scale * rng.uniform(1.2, 2.0)
    h = w * rng.uniform(0.3, 0.5)
    bottom = rng.uniform(horizon, s)
    body = (yy <= bottom) & (yy > bottom - h) & (np.abs(xx - cx) < w / 2)
    cabin = (yy <= bottom - h) & (yy > bottom - 1.6 * h) & (np.abs(xx - cx) < w / 3)
    return body | cabin


def _paint(img: np.ndarray, lab: np.ndarray, mask: np.ndarray, leaf: int, look: Appearance,
           rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> None:
    colour = np.clip(look.colour[leaf] + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER), 0, 1)
    pattern = _texture(int(look.texture[leaf]), int(look.period[leaf]), yy, xx,
                       rng.integers(0, 16, size=2))
    pattern = np.broadcast_to(pattern, mask.shape)
    img[:, mask] = colour[:, None] + _TEXTURE_AMPLITUDE * pattern[mask][None, :]
    lab[mask] = leaf


def make_scenes(hierarchy: Hierarchy, num_images: int, *, size: int = 64,
                seed: int | np.random.Generator | list[int] = 0,
                ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_images`` scenes: ``(images float32 [n, 3, size, size], labels int64 [n, size, size])``.

    Labels hold leaf ids and ``ignore_index`` (unlabelled clutter). Identical for equal seeds.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    hierarchy.check_ignore_index(ignore_index)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    look = appearance(hierarchy)
    k = hierarchy.num_leaves
    by_family = {f: np.flatnonzero(look.family == i) for i, f in enumerate(SHAPE_FAMILIES)}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy_col, xx_row = yy[:, :1], xx[:1, :]
    images = np.zeros((num_images, 3, size, size), dtype=np.float32)
    labels = np.zeros((num_images, size, size), dtype=np.int64)
    for n in range(num_images):
        img = np.zeros((3, size, size))
        lab = np.zeros((size, size), dtype=np.int64)
        horizon = int(rng.integers(int(0.3 * size), int(0.6 * size)))
        # Background: above a wavy horizon and below it, from the "top"/"band" families if any.
        wave = horizon + 2.0 * np.sin(xx_row / size * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6))
        above = np.broadcast_to(yy_col < wave, (size, size))
        for region, fam in ((above, "top"), (~above, "band")):
            pool = by_family[fam] if by_family[fam].size else np.arange(k)
            _paint(img, lab, region, int(rng.choice(pool)), look, rng, yy_col, xx_row)
        for _ in range(int(rng.integers(*_OBJECTS))):
            leaf = int(rng.integers(k))
            mask = _shape_mask(SHAPE_FAMILIES[look.family[leaf]], rng, yy_col, xx_row, size, horizon)
            _paint(img, lab, mask, leaf, look, rng, yy_col, xx_row)
        if rng.random() < _VOID_PROBABILITY:  # unlabelled clutter
            h, w = rng.integers(3, max(4, size // 6), size=2)
            y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
            img[:, y0:y0 + h, x0:x0 + w] = rng.uniform(0.2, 0.8)
            lab[y0:y0 + h, x0:x0 + w] = ignore_index
        img = img * rng.uniform(*_GAIN) + rng.normal(0.0, _NOISE, size=img.shape)
        images[n] = img
        labels[n] = lab
    return images, labels


def make_splits(hierarchy: Hierarchy, num_train: int, num_test: int, *, size: int = 64, seed: int = 0,
                ignore_index: int = 255) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and held-out test scenes from independent streams of one seed."""
    return {
        "train": make_scenes(hierarchy, num_train, size=size, seed=[seed, 0], ignore_index=ignore_index),
        "test": make_scenes(hierarchy, num_test, size=size, seed=[seed, 1], ignore_index=ignore_index),
    }
