"""hieraloss.torch triplet loss: the sync-free selection (hieraloss.torch.ops.triplet).

* no host sync inside the op for ``sampling="first"``, nor for ``"random"`` with a torch.Generator
  (one, the permutation's count, with a numpy Generator, i.e. an int seed), counted the way
  /work/shared/tools/step_profile.py counts them;
* the fixed-size slots hold exactly the loop oracle's triplets (``sampling="first"``), and for
  ``"random"`` the key order is the taking-part pixels sorted by the generator's random keys, with
  the first-K rule applied to it;
* normalising only the rows used gives bitwise the values and gradients of normalising the whole map.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import torch
from _sync_counter import CountSyncs
from hypothesis import given
from hypothesis import strategies as st

import hieraloss
from hieraloss.testing import hierarchies
from hieraloss.torch.ops.device import compute_dtype
from hieraloss.torch.ops.triplet import key_order, taking_part_first, triplet_op, triplet_select, unit_rows


def _cityscapes_inputs(dtype=torch.float32, channels_last=False):
    h = hieraloss.presets.cityscapes()
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 8, 6, 10, generator=gen, dtype=dtype)
    if channels_last:
        emb = emb.to(memory_format=torch.channels_last)
    leaf = torch.randint(0, h.num_leaves, (2, 6, 10), generator=gen)
    leaf[0, :2] = -1  # pixels not taking part
    return h, emb.requires_grad_(), leaf


def _op(emb, leaf, h, sampling, seed=0, max_per_class=200):
    return triplet_op(emb, leaf, h, max_per_class=max_per_class, base_margin=0.1, sampling=sampling,
                           generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float64, True),
                                                 (torch.float16, False)])
def test_first_has_no_host_sync(dtype, channels_last):
    h, emb, leaf = _cityscapes_inputs(dtype, channels_last)
    _op(emb, leaf, h, "first").backward()  # warm caches (tables are built on the host, no sync either)
    emb.grad = None
    with CountSyncs() as counter:
        loss = _op(emb, leaf, h, "first")
        loss.backward()
    assert counter.events == []
    assert loss.item() > 0 and emb.grad is not None


def test_random_with_a_torch_generator_reads_nothing_back():
    h, emb, leaf = _cityscapes_inputs()
    with CountSyncs() as counter:
        _op(emb, leaf, h, "random").backward()
    assert counter.events == []


def test_int_seed_path_keeps_the_syncs():
    """A numpy Generator (what the door makes of an int seed): "random" still reads back only n (the
    permutation is drawn on the host and copied in), "first" reads nothing back."""
    h, emb, leaf = _cityscapes_inputs()
    kw = dict(max_per_class=200, base_margin=0.1)
    triplet_op(emb, leaf, h, sampling="first", generator=np.random.default_rng(0), **kw).backward()
    with CountSyncs() as counter:
        triplet_op(emb, leaf, h, sampling="first", generator=np.random.default_rng(0), **kw).backward()
    assert counter.events == []
    with CountSyncs() as counter:
        triplet_op(emb, leaf, h, sampling="random", generator=np.random.default_rng(0), **kw).backward()
    assert counter.events == ["__int__", "_local_scalar_dense"]  # int(n) for the permutation


def test_no_taking_part_pixel_is_a_connected_zero_without_sync():
    h, emb, leaf = _cityscapes_inputs()
    with CountSyncs() as counter:
        loss = _op(emb, torch.full_like(leaf, -1), h, "first")
        loss.backward()
    assert counter.events == []
    assert loss.item() == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))


def test_counter_sees_the_syncs_it_should():
    with CountSyncs() as counter:
        x = torch.arange(5)
        torch.nonzero(x > 2)
        int(x.sum())
    assert counter.events == ["nonzero", "__int__", "_local_scalar_dense"]


# ---------------------------------------------------------------------------- selection
@st.composite
def leaf_maps(draw):
    """(hierarchy, leaf map [B, h, w] with -1 = not taking part, max_per_class); from no pixel to
    every pixel taking part, so that the non-taking-part pixels may outnumber the others."""
    h = draw(hierarchies(max_depth=3, max_children=3, order=None))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    leaf = rng.integers(0, h.num_leaves, size=shape)
    out = draw(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]))
    leaf = np.where(rng.random(shape) < out, -1, leaf)
    return h, leaf, draw(st.sampled_from([1, 2, 3, 200]))


def _slots_by_class(chosen, K):
    """[(class, [(a, p, n)])] from the valid slots, checking the slot layout on the way."""
    T = chosen.T.tolist()
    total = sum(T)
    assert len(T) == K + 1 and T[K] == 0
    assert chosen.valid.tolist() == [s < total for s in range(chosen.valid.numel())]
    assert (chosen.slot_cls[total:] == K).all()
    cls = chosen.slot_cls[:total].tolist()
    trips = zip(chosen.anchor[:total].tolist(), chosen.positive[:total].tolist(),
                chosen.negative[:total].tolist(), strict=True)
    out: dict[int, list] = {}
    for c, t in zip(cls, trips, strict=True):
        out.setdefault(c, []).append(t)
    assert [len(out.get(c, [])) for c in range(K)] == T[:K]
    return sorted(out.items())


def _check_classes(chosen, flat):
    total = int(chosen.T.sum())
    assert torch.equal(chosen.positive_cls[:total], flat[chosen.positive[:total]])
    assert torch.equal(chosen.negative_cls[:total], flat[chosen.negative[:total]])


@given(case=leaf_maps())
def test_first_selection_is_the_oracles(case):
    h, leaf, max_per_class = case
    flat = torch.from_numpy(leaf).reshape(-1)
    pixels, n = taking_part_first(flat)
    assert int(n) == int((flat >= 0).sum())
    assert torch.equal(pixels[: int(n)], torch.nonzero(flat >= 0).squeeze(1))
    chosen = triplet_select(flat, pixels, h, max_per_class=max_per_class)
    assert chosen.anchor.numel() == min(h.num_leaves * max_per_class, flat.numel())
    labels = np.where(leaf < 0, 255, leaf)
    want = [(c, list(t)) for c, t in oracle.first_triplets(labels, h, max_per_class=max_per_class)]
    assert _slots_by_class(chosen, h.num_leaves) == want
    _check_classes(chosen, flat)


def _first_rule_on(order, flat, h, max_per_class):
    """The first-K rule on the key order ``order`` (list of flat positions), with plain loops."""
    group = {k: int(h.parent[h.leaf_channels[k]]) for k in range(h.num_leaves)}
    out = []
    for c in sorted({int(flat[p]) for p in order}):
        anchors = [p for p in order if flat[p] == c]
        positives = [p for p in order if flat[p] != c and group[int(flat[p])] == group[c]]
        negatives = [p for p in order if group[int(flat[p])] != group[c]]
        k = min(max_per_class, len(anchors), len(positives), len(negatives))
        if k:
            out.append((c, list(zip(anchors[:k], positives[:k], negatives[:k], strict=False))))
    return out


@given(case=leaf_maps(), seed=st.integers(0, 2**16))
def test_random_selection_sorts_by_the_generators_keys(case, seed):
    h, leaf, max_per_class = case
    flat = torch.from_numpy(leaf).reshape(-1)
    pixels = key_order(flat, "random", torch.Generator().manual_seed(seed))
    # The rule with plain Python: one key per pixel from the generator, taking-part pixels by key.
    keys = torch.randint(0, 2**62, (flat.numel(),), generator=torch.Generator().manual_seed(seed)).tolist()
    taking = [p for p in range(flat.numel()) if flat[p] >= 0]
    want_order = sorted(taking, key=lambda p: (keys[p], p))
    assert pixels[: len(taking)].tolist() == want_order
    assert pixels[len(taking):].tolist() == [p for p in range(flat.numel()) if flat[p] < 0]
    chosen = triplet_select(flat, pixels, h, max_per_class=max_per_class)
    want = _first_rule_on(want_order, flat.tolist(), h, max_per_class)
    assert _slots_by_class(chosen, h.num_leaves) == want
    _check_classes(chosen, flat)


def test_random_order_is_uniform_enough():
    """Every pixel lands first about equally often over many draws (a sort of random keys is a
    uniform permutation; this catches a biased or constant order)."""
    flat = torch.arange(6)
    gen = torch.Generator().manual_seed(0)
    firsts = torch.stack([key_order(flat, "random", gen)[0] for _ in range(3000)])
    counts = torch.bincount(firsts, minlength=6)
    assert counts.min() > 400 and counts.max() < 600, counts


# ---------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape,layout", [((2, 16, 5, 7), "contiguous"), ((2, 16, 5, 7), "channels_last"),
                                          ((2, 16, 5, 7), "sliced"), ((3, 33, 1, 1), "contiguous"),
                                          ((1, 1, 4, 4), "contiguous")])
def test_unit_rows_are_bitwise_the_whole_map_normalised(dtype, shape, layout):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":  # the embeddings are a non-dense view: every other channel of twice as many
        x = torch.cat([x, x + 1], dim=1)
    P = shape[0] * shape[2] * shape[3]
    at = tuple(torch.randint(0, P, (n,), generator=gen) for n in (9, 9, 4))  # repeats across and within
    up = [torch.randn(a.numel(), shape[1], generator=gen, dtype=compute_dtype(dtype)) for a in at]
    ct = compute_dtype(dtype)

    def whole(e):
        rows = torch.nn.functional.normalize(e.to(ct), dim=1, eps=1e-12).permute(0, 2, 3, 1).reshape(-1, shape[1])
        return [rows.index_select(0, a) for a in at]

    results = []
    for fn in (whole, lambda e: unit_rows(e, at, ct)):
        leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
        e = leaf[:, ::2] if layout == "sliced" else leaf
        rows = fn(e)
        sum((r * u).sum() for r, u in zip(rows, up, strict=True)).backward()
        results.append((rows, leaf.grad))
    (want_rows, want_grad), (got_rows, got_grad) = results
    for w, g in zip(want_rows, got_rows, strict=True):
        assert torch.equal(w, g)
    assert torch.equal(want_grad, got_grad)


def test_public_loss_check_labels():
    """hierarchy_triplet_loss(check_labels=True) raises LabelError for a bad label value; False reads
    nothing back (sampling="first": no sync at all) and the bad pixel does not take part, exactly as if
    it held ignore_index; inside hssn_loss the labels are checked once, by the objective."""
    from hieraloss import LabelError
    from hieraloss.torch import HierarchyTripletLoss, hierarchy_triplet_loss

    h, emb, _ = _cityscapes_inputs()
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, h.num_nodes, (2, 12, 20), generator=gen)
    labels[1, 0, :4] = 255
    bad = labels.clone()
    bad[0, 2, 2] = 77
    as_ignored = bad.clone()
    as_ignored[0, 2, 2] = 255
    with pytest.raises(LabelError, match="77"):
        hierarchy_triplet_loss(emb, bad, h, sampling="first")
    with pytest.raises(LabelError, match="77"):
        HierarchyTripletLoss(h, sampling="first")(emb, bad)
    ref = hierarchy_triplet_loss(emb, as_ignored, h, sampling="first")
    hierarchy_triplet_loss(emb, bad, h, sampling="first", check_labels=False).backward()  # warm caches
    emb.grad = None
    with CountSyncs() as counter:
        loss = hierarchy_triplet_loss(emb, bad, h, sampling="first", check_labels=False)
        loss.backward()
    assert counter.events == []
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(HierarchyTripletLoss(h, sampling="first", check_labels=False)(emb, bad), ref,
                               rtol=0, atol=0)
