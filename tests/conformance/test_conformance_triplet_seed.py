"""The same seed gives the same triplets in every backend (issue 13).

``hierarchy_triplet_loss(..., generator=seed)`` with an int seed (or a numpy Generator) draws the
key order by :mod:`hieraloss.core.triplets` in numpy, torch and paddle, so the chosen triplets are
identical and the loss values equal. The chosen triplets are recorded where each backend selects
them (numpy: ``sample_triplets``; torch: ``triplet_select``, on the public path; paddle: the
core's ``select_triplets`` as its op calls it). ``sampling="first"`` is checked the same way.
A ``torch.Generator`` keeps torch's own draw (random sort keys, drawn on the device).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hieraloss.numpy as hnp
from hieraloss import presets
from hieraloss.core import triplets as core_triplets
from hieraloss.testing import hierarchies, label_maps

torch = pytest.importorskip("torch")
import hieraloss.torch as ht  # noqa: E402
from hieraloss.torch.ops import triplet as triplet_ops  # noqa: E402
from hieraloss.torch.ops.triplet import key_order, triplet_select  # noqa: E402

try:
    import paddle

    import hieraloss.paddle as hp
    from hieraloss.paddle.ops import triplet as paddle_ops
except ImportError:  # paddle not installed: torch and numpy are still compared
    paddle = None

FIELDS = ("anchor", "positive", "negative", "anchor_class", "positive_class", "negative_class")


@st.composite
def cases(draw):
    """(hierarchy, embeddings [B, C, h, w] float64, labels [B, H, W] with ignored and partial labels,
    max_per_class); labels at the embeddings' size or larger (resampled by the nearest rule)."""
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    B, hh, ww = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1, 2]))
    labels = draw(label_maps(h, (B, hh * scale, ww * scale), ignore_fraction=None, partial_fraction=None))
    emb = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=(B, 3, hh, ww))
    return h, emb, labels, draw(st.sampled_from([1, 2, 3, 200]))


def _fresh(kw):
    """``kw`` with ``generator`` made anew when it is a factory (a numpy Generator advances with each
    draw, so every run gets its own, made from the same seed)."""
    gen = kw.get("generator")
    return dict(kw, generator=gen()) if callable(gen) else kw


def _numpy_run(emb, labels, h, **kw):
    small = hnp.resize_labels_nearest(labels, emb.shape[2:])
    sample_kw = {k: v for k, v in _fresh(kw).items() if k in ("max_per_class", "sampling", "generator")}
    chosen = hnp.sample_triplets(small, h, **sample_kw)
    value = float(hnp.hierarchy_triplet_loss(emb, labels, h, **_fresh(kw)))
    return chosen, value


def _torch_run(emb, labels, h, monkeypatch, **kw):
    seen = []
    select = triplet_select

    def recording(flat, pixels, hierarchy, *, max_per_class):
        chosen = select(flat, pixels, hierarchy, max_per_class=max_per_class)
        total = int(chosen.T.sum())
        used = chosen.take(total)
        seen.append(tuple(getattr(used, f).numpy().astype(np.int64) for f in
                          ("anchor", "positive", "negative", "slot_cls", "positive_cls", "negative_cls")))
        return chosen

    with monkeypatch.context() as m:
        m.setattr(triplet_ops, "triplet_select", recording)
        value = float(ht.hierarchy_triplet_loss(torch.from_numpy(emb), torch.from_numpy(labels), h, **_fresh(kw)))
    return (seen[0] if seen else None), value


def _paddle_run(emb, labels, h, monkeypatch, **kw):
    seen = []

    def recording(leaf, keys, hierarchy, max_per_class):
        out = core_triplets.select_triplets(leaf, keys, hierarchy, max_per_class)
        seen.append(out)
        return out

    spy = types.SimpleNamespace(key_order=core_triplets.key_order, select_triplets=recording,
                                margins=core_triplets.margins)
    with monkeypatch.context() as m:
        m.setattr(paddle_ops, "_triplets", spy)
        value = float(hp.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), h, **_fresh(kw)))
    return seen[0], value


def _same_everywhere(emb, labels, h, monkeypatch, **kw):
    want, value = _numpy_run(emb, labels, h, **kw)
    runs = {"torch": _torch_run(emb, labels, h, monkeypatch, **kw)}
    if paddle is not None:
        runs["paddle"] = _paddle_run(emb, labels, h, monkeypatch, **kw)
    for name, (chosen, got) in runs.items():
        if chosen is None:  # torch answers an empty map before selecting: numpy chose nothing too
            assert want[0].size == 0 and got == 0.0, name
            continue
        for field, a, b in zip(FIELDS, want, chosen, strict=True):
            np.testing.assert_array_equal(b, a, err_msg=f"{name}: {field}")
        np.testing.assert_allclose(got, value, rtol=1e-12, atol=1e-15, err_msg=name)
    return want


@settings(max_examples=40)
@given(case=cases(), seed=st.integers(0, 2**63 - 1))
def test_int_seed_gives_the_same_triplets_in_every_backend(case, seed, monkeypatch_module):
    h, emb, labels, k = case
    _same_everywhere(emb, labels, h, monkeypatch_module, max_per_class=k, sampling="random", generator=seed)


@settings(max_examples=25)
@given(case=cases())
def test_first_gives_the_same_triplets_in_every_backend(case, monkeypatch_module):
    h, emb, labels, k = case
    _same_everywhere(emb, labels, h, monkeypatch_module, max_per_class=k, sampling="first")


def test_numpy_generator_is_the_seed_and_advances(monkeypatch):
    """A numpy Generator gives the draws of the seed it was made from, and its state advances (two
    calls with one generator draw two permutations, the same in every backend)."""
    h = presets.cityscapes()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, h.num_leaves, size=(2, 8, 8))
    emb = rng.normal(size=(2, 4, 8, 8))
    a = _same_everywhere(emb, labels, h, monkeypatch, max_per_class=3, generator=11)
    b = _same_everywhere(emb, labels, h, monkeypatch, max_per_class=3, generator=lambda: np.random.default_rng(11))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    values = {}
    for name, lib, wrap in [("numpy", hnp, np.asarray), ("torch", ht, torch.from_numpy)] + (
            [("paddle", hp, paddle.to_tensor)] if paddle is not None else []):
        gen = np.random.default_rng(11)
        values[name] = [float(lib.hierarchy_triplet_loss(wrap(emb), wrap(labels), h, max_per_class=3, generator=gen))
                        for _ in range(2)]
    first, second = values["numpy"]
    assert first != second  # the generator advanced
    for name, got in values.items():
        np.testing.assert_allclose(got, values["numpy"], rtol=1e-12, err_msg=name)


def test_torch_generator_keeps_torch_draws():
    """A torch.Generator draws torch's own random keys (framework generators give framework draws); a
    numpy Generator gives the core's permutation of the taking-part pixels."""
    flat = torch.tensor([3, -1, 0, 1, -1, 2, 2, 0])
    got = key_order(flat, "random", torch.Generator().manual_seed(4))
    keys = torch.randint(0, 2**62, (flat.numel(),), generator=torch.Generator().manual_seed(4))
    taking = torch.nonzero(flat >= 0).squeeze(1)
    assert got[:taking.numel()].tolist() == taking[torch.argsort(keys[taking])].tolist()
    seeded = key_order(flat, "random", np.random.default_rng(4))
    assert seeded[:taking.numel()].tolist() == taking[torch.from_numpy(core_triplets.random_order(6, 4))].tolist()
    assert seeded[taking.numel():].tolist() == [1, 4]


def test_core_random_order_is_a_seeded_permutation():
    for n in (0, 1, 7, 100):
        order = core_triplets.random_order(n, 3)
        assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))
        np.testing.assert_array_equal(order, np.random.default_rng(3).permutation(n))
    with pytest.raises(TypeError, match="generator must be an int seed, a numpy Generator or None, got bool"):
        core_triplets.numpy_generator(True)
    with pytest.raises(TypeError, match="generator must be an int seed, a numpy Generator or None, got str"):
        hnp.hierarchy_triplet_loss(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64),
                                   presets.cityscapes(), generator="seed")


@pytest.mark.parametrize("generator", ["seed", 1.5, True])
def test_bad_generator_raises_everywhere(generator):
    h = presets.cityscapes()
    emb, labels = np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64)
    kinds = "an int seed, a numpy Generator"
    name = type(generator).__name__
    for sampling in ("random", "first"):
        with pytest.raises(TypeError, match=f"^generator must be {kinds} or None, got {name}$"):
            hnp.hierarchy_triplet_loss(emb, labels, h, generator=generator, sampling=sampling)
        with pytest.raises(TypeError, match=f"^generator must be {kinds}, a torch.Generator or None, got {name}$"):
            ht.hierarchy_triplet_loss(torch.from_numpy(emb), torch.from_numpy(labels), h, generator=generator,
                                      sampling=sampling)
        if paddle is not None:
            with pytest.raises(TypeError, match=f"^generator must be {kinds} or None, got {name}$"):
                hp.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), h, generator=generator,
                                          sampling=sampling)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A monkeypatch usable inside hypothesis tests (function-scoped fixtures are not reset between
    examples; every patch here is undone by its own ``context()``)."""
    with pytest.MonkeyPatch.context() as m:
        yield m
