"""Presets: the facts of SPEC section 10 and the published channel layouts."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from hieraloss import Hierarchy, presets

CITYSCAPES_LEAVES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
CITYSCAPES_CATEGORIES = {
    "flat": [0, 1],
    "construction": [2, 3, 4],
    "object": [5, 6, 7],
    "nature": [8, 9],
    "sky": [10],
    "human": [11, 12],
    "vehicle": [13, 14, 15, 16, 17, 18],
}


def leaves_under(h, channel):
    return sorted(int(h.node_ids[c]) for c in np.flatnonzero(h.is_ancestor[channel]) if h.is_leaf[c])


def test_channel_counts():
    assert presets.cityscapes().num_nodes == 26
    assert presets.pascal_person_part().num_nodes == 12
    assert presets.lip().num_nodes == 25
    for name in presets.names():
        h = presets.get(name)
        np.testing.assert_array_equal(h.node_ids, np.arange(h.num_nodes))  # published layout: channel == id


def test_cityscapes():
    h = presets.cityscapes()
    assert (h.num_leaves, h.max_depth) == (19, 2)
    assert list(h.leaf_names) == CITYSCAPES_LEAVES
    assert h.node_names[19] == "flat" and leaves_under(h, 19) == [0, 1]
    for offset, (category, members) in enumerate(CITYSCAPES_CATEGORIES.items()):
        ch = 19 + offset
        assert h.node_names[ch].startswith(category) and h.depth[ch] == 1
        assert leaves_under(h, ch) == members
    assert h.node_names[23] == "sky (category)"  # unique names: the category "sky" holds the leaf "sky"
    # The published per-level parent list builds the same tree.
    published = Hierarchy.from_levels([[0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]])
    assert published.to_dict()["parents"] == h.to_dict()["parents"]
    assert h.leaf_distance[0, 1] == 2 and h.leaf_distance[0, 2] == 4


def test_cityscapes_matches_shipped_table():
    text = (
        resources.files("hieraloss.presets").joinpath("data", "cityscapes_trainid_categories.tsv").read_text()
    )
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    h = presets.cityscapes()
    for train_id, name, category in rows:
        ch = int(h.channel_of[int(train_id)])
        assert h.node_names[ch] == name
        assert h.node_names[h.parent[ch]].split(" (")[0] == category


def test_mapillary_vistas():
    h = presets.mapillary_vistas_v2()
    assert h.num_leaves == 124 and h.max_depth == 4
    leaf_depths = {int(h.depth[h.leaf_channels[k]]) for k in range(h.num_leaves)}
    assert leaf_depths == {2, 3, 4}
    text = (
        resources.files("hieraloss.presets").joinpath("data", "mapillary_vistas_v2.0_labels.txt").read_text()
    )
    names = [line for line in text.splitlines() if line.strip()]
    assert list(h.leaf_names) == names
    for k, name in enumerate(names):
        parts = name.split("--")
        ch = int(h.leaf_channels[k])
        assert h.depth[ch] == len(parts)
        path = [h.node_names[c] for c in h.leaf_paths[k, : len(parts) - 1]]
        assert path == ["--".join(parts[:i]) for i in range(1, len(parts))]
    road = names.index("construction--flat--road")
    assert h.depth[h.leaf_channels[road]] == 3
    assert h.depth[h.leaf_channels[names.index("nature--sky")]] == 2
    assert h.depth[h.leaf_channels[names.index("marking--discrete--arrow--left")]] == 4


def test_pascal_person_part():
    h = presets.pascal_person_part()
    assert (h.num_leaves, h.max_depth) == (7, 3)
    assert [len(h.depth_channels[d]) for d in range(3)] == [2, 3, 7]
    assert list(h.leaf_names) == [
        "background",
        "head",
        "torso",
        "upper arm",
        "lower arm",
        "upper leg",
        "lower leg",
    ]
    assert leaves_under(h, h.channel("upper body")) == [1, 2, 3, 4]
    assert leaves_under(h, h.channel("lower body")) == [5, 6]
    assert leaves_under(h, h.channel("person")) == [1, 2, 3, 4, 5, 6]
    assert leaves_under(h, h.channel("background (person)")) == [0]
    assert h.parent[h.channel("upper body")] == h.channel("person")
    assert h.node_names[7:] == (
        "background (part)",
        "upper body",
        "lower body",
        "background (person)",
        "person",
    )


def test_lip():
    h = presets.lip()
    assert (h.num_leaves, h.max_depth) == (20, 3)
    assert leaves_under(h, h.channel("upper body")) == [1, 2, 3, 4, 5, 6, 7, 10, 11, 13, 14, 15]
    assert leaves_under(h, h.channel("lower body")) == [8, 9, 12, 16, 17, 18, 19]
    assert leaves_under(h, h.channel("person")) == list(range(1, 20))
    assert h.leaf_names[5] == "upper-clothes" and h.leaf_names[19] == "right shoe"
    assert h.node_names[20:] == (
        "background (part)",
        "upper body",
        "lower body",
        "background (person)",
        "person",
    )


def test_get_and_names():
    assert presets.names() == ["cityscapes", "mapillary_vistas_v2", "pascal_person_part", "lip"]
    assert presets.get("Pascal-Person-Part") == presets.pascal_person_part()
    assert presets.get("cityscapes") is not presets.get("cityscapes")  # fresh objects, equal
    with pytest.raises(KeyError, match="ade20k"):
        presets.get("ade20k")
