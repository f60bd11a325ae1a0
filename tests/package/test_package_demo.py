"""The demo: procedural data set, helpers, confidences, objectives, figures, and ``demo --quick`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hieraloss import numpy as hnp
from hieraloss import presets
from hieraloss.demo.backends import MODELS, OBJECTIVES, missing_functions
from hieraloss.demo.data import SHAPE_FAMILIES, TEXTURES, appearance, make_scenes, make_splits
from hieraloss.demo.figure import colourize, node_colours, save_figure, save_miou_figure
from hieraloss.demo.train import (
    DemoConfig,
    batch_order,
    flat_confidence,
    flat_depth_labels,
    flat_marginal_labels,
    format_comparison,
    learning_rate,
    node_confidence,
    parse_models,
    run_demo,
)
from hieraloss.testing import hierarchies

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the data set
def test_same_seed_gives_identical_arrays():
    h = presets.cityscapes()
    a_img, a_lab = make_scenes(h, 6, size=32, seed=7)
    b_img, b_lab = make_scenes(h, 6, size=32, seed=7)
    assert a_img.dtype == np.float32 and a_lab.dtype == np.int64
    assert a_img.shape == (6, 3, 32, 32) and a_lab.shape == (6, 32, 32)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)


def test_different_seeds_differ():
    h = presets.cityscapes()
    a_img, a_lab = make_scenes(h, 4, size=32, seed=0)
    b_img, b_lab = make_scenes(h, 4, size=32, seed=1)
    assert not np.array_equal(a_img, b_img)
    assert not np.array_equal(a_lab, b_lab)


def test_splits_are_independent_and_reproducible():
    h = presets.cityscapes()
    s1 = make_splits(h, 4, 3, size=32, seed=5)
    s2 = make_splits(h, 4, 3, size=32, seed=5)
    for key in ("train", "test"):
        for a, b in zip(s1[key], s2[key], strict=True):
            np.testing.assert_array_equal(a, b)
    assert s1["train"][0].shape[0] == 4 and s1["test"][0].shape[0] == 3
    assert not np.array_equal(s1["train"][1][:3], s1["test"][1])


def test_cityscapes_scenes_cover_every_leaf_and_use_ignore():
    h = presets.cityscapes()
    _, labels = make_scenes(h, 48, size=64, seed=0)
    values = set(np.unique(labels).tolist())
    assert values <= set(range(h.num_leaves)) | {255}
    assert 255 in values, "unlabelled clutter should be marked ignore_index"
    assert set(range(h.num_leaves)) <= values, "every leaf should occur in 48 scenes"
    # Ignore is a minority of pixels.
    assert (labels == 255).mean() < 0.05


def test_custom_ignore_index_and_bad_arguments():
    h = presets.cityscapes()
    _, labels = make_scenes(h, 16, size=32, seed=3, ignore_index=-1)
    assert set(np.unique(labels).tolist()) <= set(range(h.num_leaves)) | {-1}
    assert (labels == -1).any()
    with pytest.raises(ValueError, match="num_images"):
        make_scenes(h, -1)
    with pytest.raises(ValueError, match="size"):
        make_scenes(h, 1, size=8)
    with pytest.raises(ValueError, match="collides"):
        make_scenes(h, 1, ignore_index=3)  # a leaf id


def _plain_siblings(h):
    """Pairs of leaf ids with the same parent, found with a plain loop over the parent table."""
    pairs = []
    for a in range(h.num_leaves):
        for b in range(a + 1, h.num_leaves):
            pa = h.parent[h.leaf_channels[a]]
            if pa >= 0 and pa == h.parent[h.leaf_channels[b]]:
                pairs.append((a, b))
    return pairs


def test_siblings_share_colour_and_shape_and_differ_in_texture():
    h = presets.cityscapes()
    look = appearance(h)
    pairs = _plain_siblings(h)
    assert len(pairs) == 1 + 3 + 3 + 1 + 1 + 15  # C(2,2)+C(3,2)*2+C(2,2)*2+C(6,2)
    for a, b in pairs:
        np.testing.assert_array_equal(look.colour[a], look.colour[b])
        assert look.family[a] == look.family[b]
        assert (look.texture[a], look.period[a]) != (look.texture[b], look.period[b])
    # Different depth-1 subtrees differ in colour and (for Cityscapes' 7 categories) in shape family.
    road, car, pole = 0, 13, 5
    assert len({SHAPE_FAMILIES[look.family[i]] for i in (road, car, pole)}) == 3
    assert not np.allclose(look.colour[road], look.colour[car])


@settings(max_examples=10)
@given(data=st.data())
def test_any_hierarchy_gives_valid_scenes(data):
    h = data.draw(hierarchies(max_depth=3, max_children=4, order=None))
    seed = data.draw(st.integers(0, 2**31 - 1))
    images, labels = make_scenes(h, 3, size=16, seed=seed)
    assert images.shape == (3, 3, 16, 16) and np.isfinite(images).all()
    leaves = set(range(h.num_leaves))
    assert set(np.unique(labels).tolist()) <= leaves | {255}
    look = appearance(h)
    assert look.colour.shape == (h.num_leaves, 3)
    assert ((look.texture >= 0) & (look.texture < len(TEXTURES))).all()
    for a, b in _plain_siblings(h):
        np.testing.assert_array_equal(look.colour[a], look.colour[b])


# ---------------------------------------------------------------- helpers of the training loop
@settings(max_examples=15)
@given(data=st.data())
def test_flat_depth_labels_follow_the_leaf_path(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    leaf = rng.integers(0, h.num_leaves, size=(2, 3, 4))
    out = flat_depth_labels(leaf, h)
    assert out.shape == (2, h.max_depth, 3, 4)
    for idx in np.ndindex(leaf.shape):
        b, i, j = idx
        node = int(h.leaf_channels[leaf[idx]])
        chain = [node]  # walk parents: root-first path, the leaf repeats below its depth
        while h.parent[chain[-1]] >= 0:
            chain.append(int(h.parent[chain[-1]]))
        chain = chain[::-1]
        chain += [node] * (h.max_depth - len(chain))
        assert out[b, :, i, j].tolist() == [int(h.node_ids[c]) for c in chain]
    assert h.consistent_mask(out).all()


@settings(max_examples=15)
@given(data=st.data())
def test_flat_marginal_labels_match_a_loop(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    probs = rng.dirichlet(np.ones(h.num_leaves), size=(2, 5)).transpose(0, 2, 1)  # [2, K, 5]
    original = probs.copy()
    out = flat_marginal_labels(probs, h)
    np.testing.assert_array_equal(probs, original)
    assert out.shape == (2, h.max_depth, 5)
    for b in range(2):
        for p in range(5):
            for d in range(h.max_depth):
                best, best_score = None, -1.0
                for c in sorted(h.depth_channels[d].tolist()):  # classes at depth d+1, channel order
                    score = sum(probs[b, k, p] for k in range(h.num_leaves)
                                if h.ancestor_table[h.leaf_channels[k], d] == c)
                    if score > best_score + 1e-12:
                        best, best_score = c, score
                assert out[b, d, p] == h.node_ids[best]
    # At the deepest depth of a balanced tree the marginal argmax is the leaf argmax.
    if (h.depth[h.leaf_channels] == h.max_depth).all():
        np.testing.assert_array_equal(out[:, -1], np.argmax(probs, axis=1))


def test_batch_order_and_learning_rate():
    cfg = DemoConfig(num_train=40, batch_size=8, epochs=3, lr=0.01)
    batches = batch_order(cfg)
    assert len(batches) == cfg.total_steps == 15
    for e in range(3):
        epoch = np.concatenate(batches[e * 5:(e + 1) * 5])
        assert sorted(epoch.tolist()) == list(range(40))
    assert all(np.array_equal(a, b) for a, b in zip(batches, batch_order(cfg), strict=True))
    lrs = [learning_rate(cfg, s) for s in range(cfg.total_steps)]
    assert max(lrs) == pytest.approx(0.01) and lrs[-1] < 0.01 * 0.05 and min(lrs) > 0
    assert DemoConfig.preset_defaults(quick=True).quick
    assert DemoConfig.preset_defaults(epochs=3, seed=None).epochs == 3


def test_models_and_their_parsing():
    assert MODELS == ("flat", "hssn", "hssn_tm1", "hxe", "soft", "logicseg")
    assert DemoConfig().models == MODELS and DemoConfig().threads == 1
    assert {OBJECTIVES[m].head for m in ("flat", "hxe", "soft")} == {"leaf"}
    assert {OBJECTIVES[m].head for m in ("hssn", "hssn_tm1", "logicseg")} == {"node"}
    assert parse_models(["hxe,flat", "hxe", " soft "]) == ("hxe", "flat", "soft")  # order kept, no duplicates
    assert parse_models("all") == MODELS
    assert DemoConfig(models=["soft", "flat"]).models == ("soft", "flat")
    with pytest.raises(ValueError, match="unknown model 'hxe2'"):
        parse_models(["hxe2"])
    with pytest.raises(ValueError, match="no model given"):
        parse_models([","])
    with pytest.raises(ValueError, match="unknown model"):
        DemoConfig(models=("flat", "nope"))


def _loop_node_probability(probs, h, b, p, node_ch):
    """Sum of the leaf probabilities under channel ``node_ch``, one leaf at a time."""
    return sum(probs[b, k, p] for k in range(h.num_leaves) if h.is_ancestor[node_ch, h.leaf_channels[k]])


@settings(max_examples=15)
@given(data=st.data())
def test_flat_confidence_is_the_summed_leaf_probability_of_the_predicted_class(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    logits = rng.normal(0, 3, size=(2, h.num_leaves, 5))
    method = data.draw(st.sampled_from(["argmax", "top_down"]))
    _, decoded = hnp.decode_leaf_logits(logits, h, method=method)
    conf = flat_confidence(logits, decoded, h)
    assert conf.shape == (2, h.max_depth, 5)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    for b in range(2):
        for p in range(5):
            for d in range(h.max_depth):
                ch = int(h.channel_of[decoded[b, d, p]])
                assert conf[b, d, p] == pytest.approx(_loop_node_probability(probs, h, b, p, ch), abs=1e-12)
    # Going down a path the confidence cannot grow.
    assert (np.diff(conf, axis=1) <= 1e-12).all()
    if h.max_depth >= 2:  # a deepest leaf is no class at depth 1
        bad = decoded.copy()
        bad[:, 0] = h.node_ids[h.leaf_channels[np.argmax(h.depth[h.leaf_channels])]]
        with pytest.raises(ValueError, match="not classes at depth 1"):
            flat_confidence(logits, bad, h)


@settings(max_examples=15)
@given(data=st.data())
def test_node_confidence_matches_a_loop(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    logits = rng.normal(0, 3, size=(2, h.num_nodes, 4))
    _, decoded = hnp.decode(logits, h, method="path")
    soft = node_confidence(logits, decoded, h, "softmax")
    path_min = node_confidence(logits, decoded, h, "path_min")
    for b in range(2):
        for p in range(4):
            for d in range(h.max_depth):
                ch = int(h.channel_of[decoded[b, d, p]])
                classes = sorted(h.depth_channels[d].tolist())
                z = np.array([logits[b, c, p] for c in classes])
                expected = np.exp(logits[b, ch, p] - z.max()) / np.exp(z - z.max()).sum()
                assert soft[b, d, p] == pytest.approx(expected, abs=1e-12)
                chain, c = [], ch  # ch and its ancestors, walking the parent table
                while c >= 0:
                    chain.append(logits[b, c, p])
                    c = int(h.parent[c])
                assert path_min[b, d, p] == pytest.approx(1 / (1 + np.exp(-min(chain))), abs=1e-12)
    with pytest.raises(ValueError, match="kind"):
        node_confidence(logits, decoded, h, "max")


def _runner_pair(mode_a, mode_b, **config):
    pytest.importorskip("torch")
    from hieraloss.demo.backends import TorchRunner

    h = presets.cityscapes()
    cfg = DemoConfig(num_train=4, num_test=1, size=16, batch_size=4, epochs=1, width=8, embed_dim=4, **config)
    images, labels = make_scenes(h, 4, size=16, seed=0)
    parts = [TorchRunner(cfg, h, mode).train_step(images, labels, 0, 10) for mode in (mode_a, mode_b)]
    return parts


def test_objectives_share_the_initialisation_and_differ_only_in_the_loss():
    # Same seed and head: the first step's parts agree; the loss differs by 4 x tree-min.
    a, b = _runner_pair("hssn", "hssn_tm1")
    for key in ("tree_min", "ce_depth1", "ce_depth2"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)
    assert a["loss"] - b["loss"] == pytest.approx(4 * a["tree_min"], rel=1e-4)
    # Hierarchical cross-entropy with alpha = 0 is the flat cross-entropy.
    flat, hxe = _runner_pair("flat", "hxe", hxe_alpha=0.0)
    assert set(flat) == set(hxe) == {"loss"}
    assert hxe["loss"] == pytest.approx(flat["loss"], rel=1e-5)
    # Soft labels with a large beta put all the target on the label: the flat cross-entropy again.
    flat, soft = _runner_pair("flat", "soft", soft_beta=50.0)
    assert soft["loss"] == pytest.approx(flat["loss"], rel=1e-5)
    _, soft = _runner_pair("flat", "soft", soft_beta=1.0)
    assert abs(soft["loss"] - flat["loss"]) > 1e-3


def test_missing_backend_function_is_reported_not_raised():
    import types

    partial = types.SimpleNamespace(decode_leaf_logits=None, hssn_loss=None)
    assert missing_functions(partial, "flat") == []
    assert missing_functions(partial, "hxe") == ["hierarchical_cross_entropy"]
    assert missing_functions(partial, "hssn") == ["decode"]


# ---------------------------------------------------------------- figure
def test_colours_and_colourize():
    h = presets.cityscapes()
    colours = node_colours(h)
    assert colours.shape == (26, 3)
    assert len({tuple(np.round(c, 6)) for c in colours}) == 26  # every node has its own colour
    lab = np.array([[0, 255], [25, 3]])
    rgb = colourize(lab, colours)
    np.testing.assert_array_equal(rgb[0, 1], 0.0)
    np.testing.assert_allclose(rgb[1, 0], colours[25])


def test_save_figure_writes_png(tmp_path):
    h = presets.pascal_person_part()
    images, labels = make_scenes(h, 2, size=16, seed=0)
    depth = np.stack([h.labels_at_depth(labels, d) for d in range(1, h.max_depth + 1)], axis=1)
    path = tmp_path / "f.png"
    save_figure(path, h, images, labels, {"a": depth, "b": depth})
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_save_miou_figure_writes_png(tmp_path):
    h = presets.cityscapes()
    path = tmp_path / "m.png"
    save_miou_figure(path, h, ["a", "b", "c"], np.array([[0.9, 0.8], [np.nan, 0.7], [0.95, np.nan]]))
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="shape"):
        save_miou_figure(path, h, ["a"], np.zeros((2, 2)))


# ---------------------------------------------------------------- end to end
def _run_demo(tmp_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # 1 thread: xdist runs 2 workers
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hieraloss", "demo", "--quick", "--threads", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _check_outputs(out, stdout, backend, models=MODELS):
    results = json.loads((out / "results.json").read_text())
    assert {"config", "models", "table", "hierarchy", "environment", "total_seconds"} <= set(results)
    assert results["config"]["backend"] == backend and results["config"]["quick"] is True
    assert results["config"]["threads"] == 1
    assert results["hierarchy"]["num_nodes"] == 26
    assert list(results["models"]) == list(models) == results["config"]["models"]
    for name in models:
        m = results["models"][name]
        assert {"per_depth", "consistency_rate", "mistake_severity", "hierarchical_f1", "independent",
                "train_seconds", "loss_per_epoch", "alternative_decoder", "decoder"} <= set(m)
        assert [r["depth"] for r in m["per_depth"]] == [1, 2]
        assert m["consistency_rate"] == 1.0  # decoded predictions are paths by construction
        assert m["alternative_decoder"]["consistency_rate"] == 1.0
        assert 0 <= m["independent"]["consistency_rate"] <= 1
        for r in m["per_depth"]:  # every pixel got a confidence: ECE is defined
            assert r["ece"] is not None and 0 <= r["ece"] <= 1
        assert len(m["loss_per_epoch"]) == results["config"]["epochs"]
        assert all(np.isfinite(e["loss"]) for e in m["loss_per_epoch"])
        if OBJECTIVES[name].head == "leaf":
            assert m["decoder"] == "top_down" and set(m["loss_per_epoch"][0]) == {"loss"}
        else:
            assert m["decoder"] == "path" and len(m["ece_path_min_per_depth"]) == 2
            logic = m["logic_decoder"]  # decode(..., "logic") scored beside "path"
            assert len(logic["miou_per_depth"]) == 2 and 0 <= logic["changed_pixels"] <= 1
            parts = ({"asl", "child_implies_parent", "parent_implies_child", "exclusion", "rule_factor"}
                     if name == "logicseg" else {"tree_min", "ce_depth1", "ce_depth2", "triplet"})
            assert parts <= set(m["loss_per_epoch"][0])
    assert (out / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "miou.png").read_bytes()[:8] == PNG_MAGIC
    assert "mIoU % depth 1 (7 classes)" in stdout and "consistency" in stdout and "ECE % depth 2" in stdout
    header = next(line for line in stdout.splitlines() if "flat CE" in line or "HXE" in line)
    assert [OBJECTIVES[n].label for n in models] == [c.strip() for c in header.split("  ") if c.strip()]
    return results


def test_demo_quick_end_to_end(tmp_path):
    out, stdout = _run_demo(tmp_path, "--seed", "1")
    results = _check_outputs(out, stdout, "torch")
    assert results["environment"]["threads"] == 1


def test_demo_quick_model_subset(tmp_path):
    out, stdout = _run_demo(tmp_path, "--models", "hxe,flat", "--epochs", "1")
    results = _check_outputs(out, stdout, "torch", models=("hxe", "flat"))
    assert results["config"]["epochs"] == 1
    assert "HSSN" not in stdout


def test_untrainable_model_is_shown_as_not_available(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import types

    import hieraloss.demo.train as train
    import hieraloss.torch as hl

    without_hxe = types.SimpleNamespace(**{k: getattr(hl, k) for k in dir(hl)
                                           if k != "hierarchical_cross_entropy" and not k.startswith("__")})
    monkeypatch.setattr(train, "_backend_module", lambda backend: without_hxe)
    cfg = DemoConfig(num_train=8, num_test=4, size=16, batch_size=4, epochs=1, width=8, figure_images=1,
                     quick=True, threads=None, models=("hxe", "flat"))
    lines = []
    results = run_demo(cfg, out_dir=tmp_path, progress=False, log=lines.append)
    assert results["models"]["hxe"] == {"skipped": "hieraloss.torch has no hierarchical_cross_entropy"}
    assert results["models"]["flat"]["per_depth"][0]["miou"] is not None
    table = results["table"].splitlines()
    assert all(row.split()[-2] == "n/a" for row in table[1:4])  # hxe's column, left of flat's
    assert "n/a HXE: hieraloss.torch has no hierarchical_cross_entropy" in results["table"]
    assert (tmp_path / "miou.png").exists() and "\n".join(lines).count("n/a HXE") == 1


def test_format_comparison_without_any_trained_model():
    h = presets.cityscapes()
    results = {"config": {"hxe_alpha": 0.1, "soft_beta": 1.0}, "models": {"soft": {"skipped": "no soft"}}}
    table = format_comparison(results, h)
    assert "n/a soft labels: no soft" in table and "mIoU % depth 2 (19 leaves)" in table


def test_demo_quick_paddle(tmp_path):
    pytest.importorskip("paddle")
    try:
        import hieraloss.paddle  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"hieraloss.paddle is not available: {exc}")
    out, stdout = _run_demo(tmp_path, "--backend", "paddle")
    _check_outputs(out, stdout, "paddle")
