"""hieraloss.integrations.mmseg: the mmseg-convention loss wrappers and their registration.

The wrappers are plain torch modules, tested without mmseg against hieraloss.numpy (forward) and
loops written here. The registration is tested against the real ``mmseg.registry.MODELS`` when
mmsegmentation is importable. With mmcv-lite (no compiled ops) ``import mmseg.models`` fails, and
mmengine's registry imports that location on its first lookup; the tests then mark the location
as imported, which changes nothing about how our classes are registered and built.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import hieraloss  # noqa: E402
import hieraloss.numpy as hnp  # noqa: E402
from hieraloss import Hierarchy, presets  # noqa: E402
from hieraloss.integrations import mmseg as hmm  # noqa: E402
from hieraloss.testing import hierarchies, label_maps, logits  # noqa: E402
from hieraloss.torch import decode, focal_tree_min_loss, hssn_loss, logicseg_loss, tree_min_loss  # noqa: E402


def _sample(h: Hierarchy, shape=(2, 5, 6), seed=0, ignore=0.2, partial=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, size=(shape[0], h.num_nodes, *shape[1:]))
    y = rng.integers(0, h.num_leaves, size=shape)
    if partial:
        y = np.where(rng.random(shape) < partial, rng.integers(h.num_leaves, h.num_nodes, size=shape), y)
    y = np.where(rng.random(shape) < ignore, 255, y)
    return x, y


def _numpy_weighted(h, x, y, w, reduction, gamma=None):
    """Reference for pixel weights from the numpy backend's loss map and Hierarchy.expand_targets."""
    if gamma is None:
        per_node = hnp.tree_min_loss(x, y, h, reduction="none")
    else:
        per_node = hnp.focal_tree_min_loss(x, y, h, gamma=gamma, reduction="none")
    _, mask = h.expand_targets(y)
    weighted = per_node * w[:, None]
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        return weighted.sum() / max(mask.sum(), 1)
    total = 0.0
    for d in range(1, h.max_depth + 1):
        s = c = 0.0
        for v in range(h.num_nodes):
            if h.depth[v] == d:
                s += weighted[:, v].sum()
                c += mask[:, v].sum()
        total += s / max(c, 1)
    return 5.0 * total


# ------------------------------------------------------------------ hierarchy from config values
def test_load_hierarchy_accepts_presets_paths_and_dicts(tmp_path):
    city = presets.cityscapes()
    assert hmm.load_hierarchy("cityscapes") == city
    assert hmm.load_hierarchy("Pascal-Person-Part") == presets.pascal_person_part()
    assert hmm.load_hierarchy(city) is city
    path = tmp_path / "tree.json"
    city.to_json(path)
    assert hmm.load_hierarchy(str(path)) == city
    assert hmm.load_hierarchy(path) == city
    assert hmm.load_hierarchy(city.to_dict()) == city
    tree = {"animal": {"cat": 0, "dog": 1}, "car": {"car (leaf)": 2}}
    assert hmm.load_hierarchy(tree) == Hierarchy.from_dict(tree)


def test_load_hierarchy_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="neither a preset .*cityscapes.* nor an existing"):
        hmm.load_hierarchy("citiscapes")
    with pytest.raises(ValueError, match="nor an existing hierarchy JSON file"):
        hmm.load_hierarchy(str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="got int"):
        hmm.load_hierarchy(3)


# ------------------------------------------------------------------ loss wrappers (no mmseg needed)
@pytest.mark.parametrize("reduction", ["mean", "sum", "hssn"])
def test_tree_min_wrapper_equals_numpy_and_functional(reduction):
    h = presets.cityscapes()
    x, y = _sample(h, partial=0.1)
    loss = hmm.HieraTreeMinLoss("cityscapes", reduction=reduction, loss_weight=0.7)
    xt, yt = torch.tensor(x), torch.tensor(y)
    got = loss(xt, yt, ignore_index=255)
    ref = 0.7 * hnp.tree_min_loss(x, y, h, reduction=reduction)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), ref, rtol=1e-12)
    assert torch.equal(got, 0.7 * tree_min_loss(xt, yt, h, reduction=reduction))


@pytest.mark.parametrize("reduction", ["mean", "sum", "hssn"])
def test_focal_wrapper_equals_numpy(reduction):
    h = presets.pascal_person_part()
    x, y = _sample(h, seed=3, partial=0.2)
    loss = hmm.HieraFocalTreeMinLoss(h, gamma=1.5, reduction=reduction, loss_weight=2.0)
    got = loss(torch.tensor(x), torch.tensor(y))
    ref = 2.0 * hnp.focal_tree_min_loss(x, y, h, gamma=1.5, reduction=reduction)
    np.testing.assert_allclose(got.item(), ref, rtol=1e-12)


@given(data=st.data())
def test_pixel_weights_over_random_hierarchies(data):
    h = data.draw(hierarchies(max_depth=3, order=None))
    shape = (2, data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5)))
    y = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = data.draw(logits(h, shape))
    w = np.random.default_rng(data.draw(st.integers(0, 99))).random(shape)
    reduction = data.draw(st.sampled_from(["mean", "sum", "hssn"]))
    focal = data.draw(st.booleans())
    loss = hmm.HieraFocalTreeMinLoss(h, gamma=2.0, reduction=reduction) if focal else \
        hmm.HieraTreeMinLoss(h, reduction=reduction)
    got = loss(torch.tensor(x), torch.tensor(y), weight=torch.tensor(w))
    ref = _numpy_weighted(h, x, y, w, reduction, gamma=2.0 if focal else None)
    np.testing.assert_allclose(got.item(), ref, rtol=1e-9, atol=1e-12)
    ones = loss(torch.tensor(x), torch.tensor(y), weight=torch.ones(shape, dtype=torch.float64))
    np.testing.assert_allclose(ones.item(), loss(torch.tensor(x), torch.tensor(y)).item(), rtol=1e-12)


def test_weighted_loss_has_the_right_gradient():
    h = presets.cityscapes()
    x, y = _sample(h, shape=(1, 3, 4), seed=5)
    w = torch.rand(1, 3, 4, dtype=torch.float64)
    xt = torch.tensor(x, requires_grad=True)
    loss = hmm.HieraTreeMinLoss(h, reduction="hssn")
    assert torch.autograd.gradcheck(lambda t: loss(t, torch.tensor(y), weight=w), (xt,))


def test_reduction_override_and_none():
    h = presets.cityscapes()
    x, y = _sample(h, seed=1)
    loss = hmm.HieraTreeMinLoss(h, loss_weight=3.0)
    xt, yt = torch.tensor(x), torch.tensor(y)
    per_node = loss(xt, yt, reduction_override="none")
    ref = 3.0 * hnp.tree_min_loss(x, y, h, reduction="none")
    np.testing.assert_allclose(per_node.numpy(), ref, rtol=1e-12)
    assert loss(xt, yt, reduction_override="sum").item() == pytest.approx(per_node.sum().item(), rel=1e-12)
    with pytest.raises(ValueError, match="reduction_override"):
        loss(xt, yt, reduction_override="max")


def test_mmseg_call_conventions():
    h = presets.cityscapes()
    x, y = _sample(h)
    xt, yt = torch.tensor(x), torch.tensor(y)
    yt_before = yt.clone()
    for cls, name in [(hmm.HieraTreeMinLoss, "loss_tree_min"),
                      (hmm.HieraFocalTreeMinLoss, "loss_focal_tree_min"),
                      (hmm.HieraHSSNLoss, "loss_hssn")]:
        loss = cls("cityscapes")
        assert loss.loss_name == name
        assert cls("cityscapes", loss_name="loss_mine").loss_name == "loss_mine"
        with pytest.raises(ValueError, match="must start with 'loss_'"):
            cls("cityscapes", loss_name="hier")
        loss(xt, yt, weight=None, ignore_index=255, avg_factor=None)  # what mmseg decode heads pass
        with pytest.raises(TypeError, match="unexpected arguments: \\['foo'\\]"):
            loss(xt, yt, foo=1)
        with pytest.raises(ValueError, match="avg_factor"):
            loss(xt, yt, avg_factor=10.0)
    assert torch.equal(yt, yt_before)  # labels are never modified
    with pytest.raises(ValueError, match="gamma"):
        hmm.HieraFocalTreeMinLoss(h, gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        hmm.HieraTreeMinLoss(h, reduction="none")
    with pytest.raises(ValueError, match="weight must be"):
        hmm.HieraTreeMinLoss(h)(xt, yt, weight=torch.ones(2, 5))
    with pytest.raises(ValueError, match="pixel weights"):
        hmm.HieraHSSNLoss(h)(xt, yt, weight=torch.ones(2, 5, 6))


def test_ignore_index_is_passed_through():
    h = presets.cityscapes()
    x, y = _sample(h, ignore=0.0)
    y[:, 0] = 100
    loss = hmm.HieraTreeMinLoss(h)
    got = loss(torch.tensor(x), torch.tensor(y), ignore_index=100)
    np.testing.assert_allclose(got.item(), hnp.tree_min_loss(x, y, h, ignore_index=100), rtol=1e-12)
    with pytest.raises(hieraloss.LabelError, match="100"):
        loss(torch.tensor(x), torch.tensor(y))  # 100 is then neither a node id nor 255


def test_node_weight_is_a_buffer_that_moves_with_the_module():
    h = presets.cityscapes()
    nw = np.linspace(0.5, 2.0, h.num_nodes)
    loss = hmm.HieraTreeMinLoss(h, node_weight=nw.tolist())
    assert "node_weight" in dict(loss.named_buffers())
    x, y = _sample(h)
    got = loss.double()(torch.tensor(x), torch.tensor(y))
    np.testing.assert_allclose(got.item(), hnp.tree_min_loss(x, y, h, node_weight=nw), rtol=1e-6)
    # an array (read-only too) or a tensor works the same, and the buffer is a float32 copy of it
    frozen = nw.copy()
    frozen.setflags(write=False)
    given = torch.tensor(nw, dtype=torch.float32)
    from_list = hmm.HieraTreeMinLoss(h, node_weight=nw.tolist()).node_weight
    for weight in (frozen, given):
        buffer = hmm.HieraTreeMinLoss(h, node_weight=weight).node_weight
        assert buffer.dtype == torch.float32 and torch.equal(buffer, from_list)
    assert hmm.HieraTreeMinLoss(h, node_weight=given).node_weight.data_ptr() != given.data_ptr()


def test_hssn_wrapper_equals_functional_and_counts_steps():
    h = presets.cityscapes()
    x, y = _sample(h, seed=2)
    xt, yt = torch.tensor(x), torch.tensor(y)
    emb = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    loss = hmm.HieraHSSNLoss("cityscapes", total_steps=10, loss_weight=0.5, sampling="first")
    assert int(loss.step) == 0
    for step in range(3):
        got = loss(xt, yt, embeddings=emb)
        ref = hssn_loss(xt, yt, h, embeddings=emb, step=step, total_steps=10, sampling="first")
        torch.testing.assert_close(got, 0.5 * ref, rtol=1e-12, atol=0)
    assert int(loss.step) == 3
    # No embeddings: tree-min (x5, per-depth normalised) + CE at every depth, no schedule needed.
    plain = hmm.HieraHSSNLoss(h)
    torch.testing.assert_close(plain(xt, yt), hssn_loss(xt, yt, h), rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        plain(xt, yt).item() - sum(
            hssn_loss(xt, yt, h, return_parts=True)[1][f"ce_depth{d}"].item() for d in (1, 2)),
        hnp.tree_min_loss(x, y, h, reduction="hssn"), rtol=1e-10)
    # Eval mode, an explicit step and calls without embeddings leave the counter alone.
    loss.eval()
    loss(xt, yt, embeddings=emb)
    loss.train()
    loss(xt, yt, embeddings=emb, step=7)
    loss(xt, yt)
    assert int(loss.step) == 3
    again = hmm.HieraHSSNLoss("cityscapes", total_steps=10)
    again.load_state_dict(loss.state_dict())
    assert int(again.step) == 3
    with pytest.raises(ValueError, match="total_steps"):
        hmm.HieraHSSNLoss(h)(xt, yt, embeddings=emb)
    fixed = hmm.HieraHSSNLoss(h, triplet_weight=0.3, sampling="first", focal_gamma=2.0, ce_weights=[0.0, 1.0])
    ref = hssn_loss(xt, yt, h, embeddings=emb, triplet_weight=0.3, sampling="first", focal_gamma=2.0,
                    ce_weights=[0.0, 1.0])
    torch.testing.assert_close(fixed(xt, yt, embeddings=emb), ref, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ path_scores for mmseg heads
def _loop_path_scores(h: Hierarchy, x: np.ndarray) -> np.ndarray:
    """Sum of logits over each leaf's ancestors, walking parent pointers."""
    out = np.zeros((x.shape[0], h.num_leaves) + x.shape[2:])
    for leaf in range(h.num_leaves):
        c = int(h.channel_of[leaf])
        while c >= 0:
            out[:, leaf] += x[:, c]
            c = int(h.parent[c])
    return out


@given(data=st.data())
def test_path_scores_match_loops_and_path_decoding(data):
    h = data.draw(hierarchies(max_depth=4, order=None))
    shape = (2, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)))
    x = data.draw(logits(h, shape))
    got = hmm.path_scores(torch.tensor(x), h)
    np.testing.assert_allclose(got.numpy(), _loop_path_scores(h, x), rtol=1e-12, atol=1e-12)
    leaf, _ = decode(torch.tensor(x), h, method="path")
    assert torch.equal(got.argmax(dim=1), leaf)  # continuous logits: no ties


def test_path_scores_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\[B, 26, \*spatial\]"):
        hmm.path_scores(torch.zeros(1, 19, 2, 2), presets.cityscapes())


# ------------------------------------------------------------------ mmseg registry
def test_register_without_mmseg_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmseg", None)
    monkeypatch.setitem(sys.modules, "mmseg.registry", None)
    with pytest.raises(ImportError, match="needs mmsegmentation"):
        hmm.register()


@pytest.fixture
def models(monkeypatch):
    pytest.importorskip("mmseg")
    registry = pytest.importorskip("mmseg.registry")
    try:
        importlib.import_module("mmseg.models")
    except Exception:  # mmcv-lite: no compiled ops, so mmseg's own models cannot load
        monkeypatch.setattr(registry.MODELS, "_imported", True)
    return registry.MODELS


def test_importing_the_module_registered_the_losses(models):
    for name in hmm.LOSS_NAMES:
        assert models.get(name) is getattr(hmm, name)


def test_register_is_idempotent_and_guards_names(models, monkeypatch):
    assert hmm.register() is models
    assert hmm.register() is models
    assert models.get("HieraTreeMinLoss") is hmm.HieraTreeMinLoss

    class Other(torch.nn.Module):
        pass

    monkeypatch.setitem(models._module_dict, "HieraTreeMinLoss", Other)
    with pytest.raises(KeyError, match="already has a different 'HieraTreeMinLoss'"):
        hmm.register()
    hmm.register(force=True)
    assert models.get("HieraTreeMinLoss") is hmm.HieraTreeMinLoss


@pytest.mark.parametrize("cfg, fn", [
    (dict(type="HieraTreeMinLoss", hierarchy="cityscapes", loss_weight=2.0),
     lambda x, y, h: 2.0 * tree_min_loss(x, y, h)),
    (dict(type="HieraTreeMinLoss", hierarchy="cityscapes", reduction="hssn"),
     lambda x, y, h: tree_min_loss(x, y, h, reduction="hssn")),
    (dict(type="HieraFocalTreeMinLoss", hierarchy="cityscapes", gamma=1.0, loss_name="loss_ftm"),
     lambda x, y, h: focal_tree_min_loss(x, y, h, gamma=1.0)),
    (dict(type="HieraHSSNLoss", hierarchy="cityscapes", ce_weights=[1.0, 0.5]),
     lambda x, y, h: hssn_loss(x, y, h, ce_weights=[1.0, 0.5])),
    (dict(type="HieraLogicSegLoss", hierarchy="cityscapes", ramp=None, exclusion="level", loss_weight=0.5),
     lambda x, y, h: 0.5 * logicseg_loss(x, y, h, exclusion="level", ramp=None)),
])
def test_build_from_config_and_call(models, cfg, fn):
    h = presets.cityscapes()
    loss = models.build(dict(cfg))
    assert type(loss).__name__ == cfg["type"]
    assert loss.loss_name.startswith("loss_")
    torch.manual_seed(0)
    x = torch.randn(2, 26, 8, 12, requires_grad=True)
    y = torch.randint(0, 19, (2, 8, 12))
    y[:, :2] = 255
    got = loss(x, y, weight=None, ignore_index=255)
    torch.testing.assert_close(got, fn(x, y, h), rtol=1e-6, atol=0)
    got.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_build_with_a_json_hierarchy(models, tmp_path):
    h = presets.lip()
    path = tmp_path / "lip.json"
    h.to_json(path)
    loss = models.build(dict(type="HieraFocalTreeMinLoss", hierarchy=str(path)))
    assert loss.hierarchy == h
    x, y = _sample(h, seed=4)
    np.testing.assert_allclose(loss(torch.tensor(x), torch.tensor(y)).item(),
                               hnp.focal_tree_min_loss(x, y, h), rtol=1e-12)


def test_hssn_loss_passes_gather_across_ranks_through(monkeypatch):
    """The config key reaches hssn_loss (single process: the gathered call is the local loss)."""
    seen = {}
    real = hmm.F.hssn_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hmm.F, "hssn_loss", spy)
    loss = hmm.HieraHSSNLoss("cityscapes", gather_across_ranks=True, triplet_weight=0.5)
    logits = torch.randn(1, 26, 8, 8)
    labels = torch.randint(0, 19, (1, 8, 8))
    emb = torch.randn(1, 4, 4, 4, requires_grad=True)
    value = loss(logits, labels, embeddings=emb, generator=torch.Generator().manual_seed(0))
    assert seen["gather_across_ranks"] is True
    local = hmm.HieraHSSNLoss("cityscapes", triplet_weight=0.5)(
        logits, labels, embeddings=emb, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(value, local)


def test_hiera_seg_metric_in_mmseg_evaluator_equals_the_metric():
    """HieraSegMetric through mmseg's METRICS registry and mmengine's evaluate(): per-batch state
    vectors, summed, give HierarchicalSegMetrics' numbers on the same pixels."""
    from mmseg.registry import METRICS

    from hieraloss.metrics import HierarchicalSegMetrics

    h = presets.cityscapes()
    metric = METRICS.build(dict(type="HieraSegMetric", hierarchy="cityscapes"))
    metric.dataset_meta = {"classes": h.leaf_names}
    reference = HierarchicalSegMetrics(h)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        samples = []
        for _ in range(2):
            pred = torch.randint(0, h.num_leaves, (1, 6, 7), generator=g)
            gt = torch.randint(0, h.num_nodes, (1, 6, 7), generator=g)
            gt[0, 0] = 255
            samples.append({"pred_sem_seg": {"data": pred}, "gt_sem_seg": {"data": gt}})
            reference.update(pred, gt)
        metric.process({}, samples)
    got = metric.evaluate(size=6)
    want = reference.scalars()
    assert set(got) == {f"hiera/{k}" for k in want}
    for key, value in want.items():
        assert got[f"hiera/{key}"] == pytest.approx(value, nan_ok=True, abs=0, rel=0)


def test_logicseg_loss_counts_steps_and_takes_rule_logits():
    h = presets.cityscapes()
    x, y = (torch.tensor(a) for a in _sample(h, seed=7))
    loss = hmm.HieraLogicSegLoss("cityscapes", ramp=(0, 2))
    first = loss(x, y)
    assert torch.allclose(first, logicseg_loss(x, y, h, step=0, ramp=(0, 2)))
    second = loss(x, y)
    assert torch.allclose(second, logicseg_loss(x, y, h, step=1, ramp=(0, 2)))
    low = x[..., ::2, ::2]
    assert torch.allclose(loss(x, y, rule_logits=low, step=5), logicseg_loss(x, y, h, rule_logits=low, step=5,
                                                                             ramp=(0, 2)))
    assert int(loss.loss.step) == 2 and "loss.step" in loss.state_dict()
    with pytest.raises(ValueError, match="does not take pixel weights"):
        loss(x, y, weight=torch.ones(x.shape[0], *x.shape[2:]))
