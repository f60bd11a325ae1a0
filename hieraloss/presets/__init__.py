"""Real class hierarchies with the channel layouts of the published HSSN code.

Each preset returns a fresh :class:`~hieraloss.Hierarchy`; the data files ship inside the package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

from ..hierarchy import Hierarchy

__all__ = ["cityscapes", "mapillary_vistas_v2", "pascal_person_part", "lip", "get", "names", "load"]


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")


def cityscapes() -> Hierarchy:
    """Cityscapes: 19 train-id leaves under the 7 official categories (26 channels)."""
    groups: dict[str, dict[str, int]] = {}
    for line in _read("cityscapes_trainid_categories.tsv").splitlines()[1:]:
        if line.strip():
            train_id, name, category = line.split("\t")
            groups.setdefault(category, {})[name] = int(train_id)
    leaf_names = {name for members in groups.values() for name in members}
    # Node names are unique: the category "sky" holds the leaf "sky".
    return Hierarchy.from_dict(
        {(f"{cat} (category)" if cat in leaf_names else cat): members for cat, members in groups.items()}
    )


def mapillary_vistas_v2() -> Hierarchy:
    """Mapillary Vistas 2.0: 124 leaves read off the ``--`` separated label names (depth 2 to 4)."""
    names = [line for line in _read("mapillary_vistas_v2.0_labels.txt").splitlines() if line.strip()]
    return Hierarchy.from_names(names, sep="--")


_UPPER, _LOWER = "upper body", "lower body"


def pascal_person_part() -> Hierarchy:
    """PASCAL-Person-Part: 7 leaves / 3 / 2, depth 3 (12 channels)."""
    return Hierarchy.from_levels(
        [[0, 1, 1, 1, 1, 2, 2], [0, 1, 1]],
        names=[
            ["background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg"],
            ["background (part)", _UPPER, _LOWER],
            ["background (person)", "person"],
        ],
    )


_LIP_LEAVES = [
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks",
    "pants", "jumpsuits", "scarf", "skirt", "face", "left arm", "right arm", "left leg", "right leg",
    "left shoe", "right shoe",
]
_LIP_UPPER = {1, 2, 3, 4, 5, 6, 7, 10, 11, 13, 14, 15}


def lip() -> Hierarchy:
    """LIP: 20 leaves / 3 / 2, depth 3 (25 channels)."""
    leaf_parent = [0 if k == 0 else (1 if k in _LIP_UPPER else 2) for k in range(20)]
    return Hierarchy.from_levels(
        [leaf_parent, [0, 1, 1]],
        names=[_LIP_LEAVES, ["background (part)", _UPPER, _LOWER], ["background (person)", "person"]],
    )


_PRESETS = {
    "cityscapes": cityscapes,
    "mapillary_vistas_v2": mapillary_vistas_v2,
    "pascal_person_part": pascal_person_part,
    "lip": lip,
}


def names() -> list[str]:
    """Names accepted by :func:`get`."""
    return list(_PRESETS)


def get(name: str) -> Hierarchy:
    """A preset by name (``"cityscapes"``, ``"mapillary_vistas_v2"``, ``"pascal_person_part"``, ``"lip"``)."""
    key = name.lower().replace("-", "_")
    if key not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {names()}")
    return _PRESETS[key]()


def load(spec: Any) -> Hierarchy:
    """A :class:`~hieraloss.Hierarchy` from a config value, as trainer configs and the CLI give it.

    ``spec`` is a ``Hierarchy`` (returned as is), a preset name (:func:`names`), a path to a JSON
    file written by ``Hierarchy.to_json``, or a mapping: the ``to_dict()`` form or a nested tree for
    ``Hierarchy.from_dict``. Raises ``ValueError`` for a string that is neither a preset nor a file.
    """
    if isinstance(spec, Hierarchy):
        return spec
    if isinstance(spec, Mapping):
        if spec.get("format") == "hieraloss.hierarchy":
            return Hierarchy(spec["parents"], spec["names"], spec.get("order", "default"))
        return Hierarchy.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.lower().replace("-", "_") in _PRESETS:
            return get(text)
        if os.path.isfile(text):
            return Hierarchy.from_json(text)
        raise ValueError(
            f"hierarchy={text!r} is neither a preset ({', '.join(names())}) nor an existing hierarchy JSON "
            "file (written by Hierarchy.to_json)"
        )
    raise TypeError(f"hierarchy must be a preset name, a JSON path, a dict or a Hierarchy, got {type(spec).__name__}")
