"""hieraloss.integrations.paddleseg: the PaddleSeg loss components and their registration.

The registration runs against the real ``paddleseg.cvlibs.manager.LOSSES`` when PaddleSeg imports;
otherwise against a minimal stand-in with the same interface (``add_component``,
``components_dict``, ``__getitem__``). PaddleSeg 2.8 pins ``opencv-python<=4.6``, which does not
import with numpy 2, so the main test venv runs the stand-in and ``make test-paddleseg`` (a venv with
``numpy<2``) runs the real package.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import hieraloss.numpy as hnp  # noqa: E402
import hieraloss.paddle as hp  # noqa: E402
from hieraloss import Hierarchy, presets  # noqa: E402
from hieraloss.integrations import paddleseg as hps  # noqa: E402

paddle.set_device("cpu")


def _real_paddleseg():
    try:
        return importlib.import_module("paddleseg.cvlibs.manager")
    except Exception:  # noqa: BLE001 - missing or broken (cv2 against numpy 2): use the stand-in
        return None


class StandInManager:
    """The part of ``paddleseg.cvlibs.manager.ComponentManager`` that registration and building use."""

    def __init__(self):
        self._components_dict = {}

    @property
    def components_dict(self):
        return self._components_dict

    def add_component(self, components):
        for c in components if isinstance(components, (list, tuple)) else [components]:
            self._components_dict[c.__name__] = c
        return components

    def __getitem__(self, name):
        if name not in self._components_dict:
            raise KeyError(f"{name} does not exist")
        return self._components_dict[name]


REAL = _real_paddleseg()


@pytest.fixture
def manager():
    return REAL.LOSSES if REAL is not None else StandInManager()


def _build(manager, cfg):
    """What PaddleSeg's builder does with one ``loss.types`` entry."""
    cfg = dict(cfg)
    return manager[cfg.pop("type")](**cfg)


def _sample(h: Hierarchy, seed=0, shape=(2, 8, 8)):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, size=(shape[0], h.num_nodes, *shape[1:])).astype(np.float32)
    labels = rng.integers(0, h.num_leaves, size=shape)
    labels[0, :2] = 255
    return x, labels


def test_register_is_idempotent(manager):
    out = hps.register(manager)
    assert out is manager
    for cls in hps.LOSS_CLASSES:
        assert manager[cls.__name__] is cls
    before = dict(manager.components_dict)
    hps.register(manager)
    assert dict(manager.components_dict) == before


def test_register_without_paddleseg_says_so(monkeypatch):
    if REAL is not None:
        pytest.skip("paddleseg is importable here")
    with pytest.raises(ImportError, match="needs paddleseg"):
        hps.register()


def test_built_from_config_match_functional(manager, tmp_path):
    hps.register(manager)
    h = presets.cityscapes()
    json_path = tmp_path / "tree.json"
    h.to_json(json_path)
    x, labels = _sample(h)
    xt, lt = paddle.to_tensor(x), paddle.to_tensor(labels)
    lt4 = lt.unsqueeze(1)  # some PaddleSeg pipelines hand labels as [B, 1, H, W]
    tm = _build(manager, {"type": "HieraTreeMinLoss", "hierarchy": "cityscapes", "ignore_index": 255})
    np.testing.assert_allclose(tm(xt, lt4).numpy(), hnp.tree_min_loss(x, labels, h), rtol=1e-5)
    focal = _build(
        manager,
        {"type": "HieraFocalTreeMinLoss", "hierarchy": str(json_path), "gamma": 1.0, "reduction": "hssn"},
    )
    np.testing.assert_allclose(
        focal(xt, lt).numpy(), hnp.focal_tree_min_loss(x, labels, h, gamma=1.0, reduction="hssn"), rtol=1e-5
    )
    hssn = _build(manager, {"type": "HieraHSSNLoss", "hierarchy": h.to_dict(), "ce_weights": [1.0, 0.5]})
    np.testing.assert_allclose(
        hssn(xt, lt4).numpy(), hp.hssn_loss(xt, lt, h, ce_weights=[1.0, 0.5]).numpy(), rtol=1e-6
    )
    logic = _build(manager, {"type": "HieraLogicSegLoss", "hierarchy": "cityscapes", "ramp": [0, 2],
                             "exclusion": "level", "easy_filter": True})
    for step in range(3):  # its own step count drives the ramp, one per training call
        want = hnp.logicseg_loss(x, labels, h, step=step, ramp=(0, 2), exclusion="level", easy_filter=True)
        np.testing.assert_allclose(logic(xt, lt4).numpy(), want, rtol=1e-5)
    logic.set_step(0)
    logic.eval()
    np.testing.assert_allclose(logic(xt, lt).numpy(), hnp.logicseg_loss(x, labels, h, step=0, ramp=(0, 2),
                                                                       exclusion="level", easy_filter=True), rtol=1e-5)
    assert int(logic.loss.step) == 0
    with pytest.raises(ValueError, match="neither a preset"):
        _build(manager, {"type": "HieraTreeMinLoss", "hierarchy": "nope"})
    with pytest.raises(ValueError, match="ignore_index"):
        _build(manager, {"type": "HieraTreeMinLoss", "hierarchy": "cityscapes", "ignore_index": 3})


def test_path_scores_argmax_is_path_decoding():
    h = presets.mapillary_vistas_v2()
    x, _ = _sample(h, shape=(2, 3, 4))
    scores = hps.path_scores(paddle.to_tensor(x), h)
    assert scores.shape == [2, h.num_leaves, 3, 4]
    leaf, _ = hnp.decode(x, h, "path")
    np.testing.assert_array_equal(paddle.argmax(scores, axis=1).numpy(), leaf)
    # Entry k is the sum of the logits along leaf k's path (a loop over the path written here).
    k = 5
    path = h.ancestor_table[h.leaf_channels[k], : h.depth[h.leaf_channels[k]]]
    np.testing.assert_allclose(scores.numpy()[:, k], x[:, path].sum(axis=1), rtol=1e-5, atol=1e-5)


class TinyHierModel(paddle.nn.Layer):
    """A PaddleSeg-style model: ``[logits, embeddings]`` while training, ``[leaf scores]`` in eval."""

    def __init__(self, h: Hierarchy):
        super().__init__()
        self.h = h
        self.head = paddle.nn.Conv2D(3, h.num_nodes, 1)
        self.embed = paddle.nn.Conv2D(3, 4, 1)
        self.pool = paddle.nn.AvgPool2D(2)

    def forward(self, images):
        logits = self.head(images)
        if self.training:
            return [logits, self.embed(self.pool(images))]
        return [hps.path_scores(logits, self.h)]


def _loss_computation(logits_list, labels, losses):
    """PaddleSeg 2.8's ``paddleseg.core.train.loss_computation`` for plain losses (the real one if
    importable)."""
    if REAL is not None:
        from paddleseg.core.train import loss_computation

        return loss_computation(logits_list, labels, None, losses)
    return [
        coef * loss(logits, labels)
        for logits, loss, coef in zip(logits_list, losses["types"], losses["coef"], strict=True)
    ]


def test_triplet_term_plugs_into_paddleseg_training(manager):
    """Model returns [logits, embeddings]; loss.types = [HieraHSSNLoss, HieraTripletLoss]; the triplet
    loss counts training iterations for its schedule and gradients reach the embedding head."""
    hps.register(manager)
    h = presets.cityscapes()
    paddle.seed(0)
    model = TinyHierModel(h)
    total_steps = 4
    losses = {
        "types": [
            _build(manager, {"type": "HieraHSSNLoss", "hierarchy": "cityscapes"}),
            _build(
                manager,
                {
                    "type": "HieraTripletLoss",
                    "hierarchy": "cityscapes",
                    "total_steps": total_steps,
                    "max_per_class": 8,
                    "seed": 0,
                },
            ),
        ],
        "coef": [1.0, 1.0],
    }
    triplet = losses["types"][1]
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    rng = np.random.default_rng(1)
    images = paddle.to_tensor(rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    labels = paddle.to_tensor(rng.integers(0, h.num_leaves, size=(2, 8, 8)))
    for it in range(3):
        model.train()
        logits_list = model(images)
        loss_list = _loss_computation(logits_list, labels, losses)
        # The second term is w(it) * L_TT on the embeddings, the schedule read from the loss's step.
        raw = hp.hierarchy_triplet_loss(
            logits_list[1], labels, h, max_per_class=8, generator=np.random.default_rng(0), sampling="first"
        )
        assert raw.numpy() > 0
        if it == 0:
            assert float(loss_list[1]) == 0.0  # w(0) = 0: the ramp starts at zero
        loss = sum(loss_list)
        loss.backward()
        if it > 0:
            assert float(paddle.abs(model.embed.weight.grad).sum()) > 0
        opt.step()
        opt.clear_grad()
    assert int(triplet.step) == 3
    assert triplet.weight() == pytest.approx(hp.triplet_weight(3, total_steps))
    state = triplet.state_dict()
    resumed = hps.HieraTripletLoss("cityscapes", total_steps=total_steps)
    resumed.set_state_dict(state)
    assert int(resumed.step) == 3
    resumed.set_step(10)
    assert resumed.weight() == 0.5
    model.eval()
    (scores,) = model(images)
    assert scores.shape == [2, h.num_leaves, 8, 8]


def test_triplet_loss_passes_gather_across_ranks_through(monkeypatch):
    """The config key reaches hierarchy_triplet_loss (single process: equal to the local loss)."""
    seen = {}
    real = hps.F.hierarchy_triplet_loss

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hps.F, "hierarchy_triplet_loss", spy)
    rng = np.random.default_rng(0)
    emb = paddle.to_tensor(rng.normal(size=(1, 4, 4, 4)))
    labels = paddle.to_tensor(rng.integers(0, 19, size=(1, 8, 8)))
    gathered = hps.HieraTripletLoss("cityscapes", seed=3, gather_across_ranks=True)(emb, labels)
    assert seen["gather_across_ranks"] is True
    local = hps.HieraTripletLoss("cityscapes", seed=3)(emb, labels)
    assert float(gathered) == float(local)
