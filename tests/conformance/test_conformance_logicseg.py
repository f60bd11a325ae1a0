"""LogicSeg: parity with a port of the released code, the loop oracle on any tree, every backend.

Reference: Li, Wang, Yang, "LogicSeg: Parsing Visual Semantics with Neural Logic Learning and
Reasoning", ICCV 2023, released as lingorX/LogicSeg: ``mmseg/models/losses/cityscapes.py``
(``loss_e``, ``loss_c``, ``loss_d``, ``HieraLossCityscapes.forward``) and
``mmseg/models/losses/asymmetric_loss.py`` (``AsymmetricLossOptimized``). The port below follows them
line by line on the CPU, with the release's three bugs fixed: ``num_class`` becomes
``num_classes``; the coarse level's easy-pixel filter compares against its size minus one (6, not
20); and the diagonal pairs are dropped before the ``1/p`` root, so the gradient is finite.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import logicseg_parts

import hieraloss.numpy.logic as nlogic
from hieraloss import Hierarchy, presets
from hieraloss.testing import hierarchies, label_maps
from hieraloss.testing import logits as logit_maps

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

import hieraloss.torch as ht  # noqa: E402

# ---------------------------------------------------------------------------- the release, ported
HIERA_HIGH = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 13), (13, 19)]  # flat .. vehicle


def release_asl(x, y, valid, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8):
    xs_pos = torch.sigmoid(x)
    xs_neg = (1.0 - xs_pos + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    w = torch.pow(1 - xs_pos * y - xs_neg * (1 - y), gamma_pos * y + gamma_neg * (1 - y))
    loss = loss * w * valid
    return -(loss.sum() / valid.sum())


def release_loss_e(pred, num_classes, p=5.0):
    pred = torch.sigmoid(pred)
    a = pred[:, :-7].permute(0, 2, 3, 1).flatten(0, 2)
    b = pred[:, -7:].permute(0, 2, 3, 1).flatten(0, 2)
    hard_a = 1 - torch.logical_and((a > 0.7).sum(-1) == 1, (a < 0.3).sum(-1) == num_classes - 1).float()
    hard_b = 1 - torch.logical_and((b > 0.7).sum(-1) == 1, (b < 0.3).sum(-1) == 7 - 1).float()  # fixed: was 20
    new_a, new_b = a[hard_a > 0].unsqueeze(-1), b[hard_b > 0].unsqueeze(-1)
    off_a, off_b = ~torch.eye(num_classes, dtype=torch.bool), ~torch.eye(7, dtype=torch.bool)
    pred_a = new_a @ new_a.transpose(1, 2)
    pred_b = new_b @ new_b.transpose(1, 2)
    # fixed: the pairs a != b are taken before the root (the release masks the diagonal to 0 first)
    all_a = torch.pow(torch.pow(pred_a, p).mean(dim=0)[off_a], 1.0 / p).sum()
    all_b = torch.pow(torch.pow(pred_b, p).mean(dim=0)[off_b], 1.0 / p).sum()
    return (all_a + all_b) / (num_classes * num_classes + 7 * 7)  # fixed: num_class was undefined


def release_loss_c(pred, num_classes, p=5):
    pred = torch.sigmoid(pred)
    a = pred[:, :-7].permute(0, 2, 3, 1).flatten(0, 2)
    b = pred[:, -7:].permute(0, 2, 3, 1).flatten(0, 2)
    predicate = a.clone()
    for ii, (lo, hi) in enumerate(HIERA_HIGH):
        predicate[:, lo:hi] = a[:, lo:hi] - a[:, lo:hi] * b[:, ii:ii + 1]
    return torch.pow(torch.pow(predicate, p).mean(dim=0), 1.0 / p).sum() / num_classes


def release_loss_d(pred, num_classes, p=5):
    pred = torch.sigmoid(pred)
    a = pred[:, :-7].permute(0, 2, 3, 1).flatten(0, 2)
    b = pred[:, -7:].permute(0, 2, 3, 1).flatten(0, 2)
    predicate = b.clone()
    for ii, (lo, hi) in enumerate(HIERA_HIGH):
        predicate[:, ii:ii + 1] = b[:, ii:ii + 1] - b[:, ii:ii + 1] * a[:, lo:hi].max(dim=1, keepdim=True)[0]
    return torch.pow(torch.pow(predicate, p).mean(dim=0), 1.0 / p).sum() / 7


def release_objective(cls_score, label, cls_score_ori, step, num_classes=19, loss_weight=1.0):
    targets = label.clone()
    targets_top = torch.zeros_like(targets)
    for index, (lo, hi) in enumerate(HIERA_HIGH):
        for ii in range(lo, hi):
            targets_top[targets == ii] = index
    void = targets == 255
    targets[void] = 0
    onehot = torch.cat([TF.one_hot(targets, num_classes).permute(0, 3, 1, 2),
                        TF.one_hot(targets_top, 7).permute(0, 3, 1, 2)], dim=1)
    loss = release_asl(cls_score, onehot, (~void).unsqueeze(1))
    e = release_loss_e(cls_score_ori, num_classes)
    c = release_loss_c(cls_score_ori, num_classes)
    d = release_loss_d(cls_score_ori, num_classes)
    factor = 0 if step < 20000 else (float(step - 20000) / 30000.0 if step < 50000 else 1.0)
    return loss * loss_weight + 0.2 * factor * (e + c + d), (loss, c, d, e)


def release_order(h: Hierarchy) -> list[int]:
    """Our channels in the release's layout: leaves 0..18, then the 7 groups in its order."""
    leaves = [int(h.channel_of[k]) for k in range(19)]
    groups = []
    for lo, hi in HIERA_HIGH:
        parents = {int(h.parent[h.channel_of[k]]) for k in range(lo, hi)}
        assert len(parents) == 1
        groups.append(parents.pop())
    return leaves + groups


def _cityscapes_inputs(seed=0, b=2, size=(6, 8), low=(3, 4)):
    h = presets.cityscapes()
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, size=(b, h.num_nodes, *size))
    r = rng.normal(0, 2, size=(b, h.num_nodes, *low))
    # easy pixels at both levels, so that the filter drops some: one leaf (and its group) high, rest low
    r[0, :, 0, :] = -6.0
    r[0, int(h.channel_of[3]), 0, :] = 6.0
    r[0, int(h.parent[h.channel_of[3]]), 0, :] = 6.0
    # near the thresholds: scores 0.32 (not below 0.3) and 0.68 (not above 0.7) keep pixels hard
    r[0, :, 1, :] = math.log(0.32 / 0.68) + 1e-3 * np.arange(h.num_nodes)[:, None]  # distinct: no max ties
    r[0, int(h.channel_of[3]), 1, :] = 6.0
    r[0, :, 2, :] = -6.0 + 1e-3 * np.arange(h.num_nodes)[:, None]
    r[0, int(h.channel_of[5]), 2, :] = math.log(0.68 / 0.32)
    y = rng.integers(0, 19, size=(b, *size))
    y[0, :2, :3] = 255
    return h, x, r, y


@pytest.mark.parametrize("step", [0, 35000, 60000])
def test_matches_release_on_cityscapes_values_and_gradients(step):
    h, x, r, y = _cityscapes_inputs()
    order = release_order(h)
    xt = torch.tensor(x, requires_grad=True)
    rt = torch.tensor(r, requires_grad=True)
    ours, parts = ht.logicseg_loss(xt, torch.tensor(y), h, step=step, rule_logits=rt, exclusion="level",
                                   easy_filter=True, return_parts=True)
    xr = torch.tensor(x[:, order], requires_grad=True)
    rr = torch.tensor(r[:, order], requires_grad=True)
    ref, (asl, c, d, e) = release_objective(xr, torch.tensor(y), rr, step)
    assert parts["exclusion"].item() > 0 and parts["rule_factor"].item() == pytest.approx(
        0 if step < 20000 else min((step - 20000) / 30000, 1))
    for name, value in [("asl", asl), ("child_implies_parent", c), ("parent_implies_child", d), ("exclusion", e)]:
        assert parts[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-9), name
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    # the release's pieces, summed with weight 1, so that every rule's gradient is compared
    ours_all = ht.logicseg_loss(xt, torch.tensor(y), h, rule_logits=rt, exclusion="level", easy_filter=True,
                                ramp=None, rule_weight=1.0)
    gx, gr = torch.autograd.grad(ours_all, [xt, rt])
    ref_all = asl + c + d + e
    gxr, grr = torch.autograd.grad(ref_all, [xr, rr])
    inverse = np.argsort(order)
    np.testing.assert_allclose(gx.numpy(), gxr.numpy()[:, inverse], rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(gr.numpy(), grr.numpy()[:, inverse], rtol=1e-5, atol=1e-10)
    assert np.abs(gr.numpy()).max() > 0


def test_release_exclusion_as_published_has_nan_gradient():
    """The bug the port fixes: masking the diagonal to 0 before the root gives NaN gradients."""
    h, _, r, _ = _cityscapes_inputs()
    rt = torch.tensor(r[:, release_order(h)], requires_grad=True)
    s = torch.sigmoid(rt)[:, :-7].permute(0, 2, 3, 1).flatten(0, 2).unsqueeze(-1)
    masked = (s @ s.transpose(1, 2)) * (1 - torch.eye(19, dtype=s.dtype))
    torch.pow(torch.pow(masked, 5.0).mean(dim=0), 1 / 5.0).sum().backward()
    assert torch.isnan(rt.grad).any()


@pytest.mark.parametrize("backend", ["numpy", "paddle"])
def test_other_backends_match_the_release_port(backend):
    h, x, r, y = _cityscapes_inputs(seed=1)
    order = release_order(h)
    ref, _ = release_objective(torch.tensor(x[:, order]), torch.tensor(y), torch.tensor(r[:, order]), 60000)
    if backend == "numpy":
        ours = float(nlogic.logicseg_loss(x, y, h, step=60000, rule_logits=r, exclusion="level", easy_filter=True))
    else:
        paddle = pytest.importorskip("paddle")
        import hieraloss.paddle as hp

        ours = hp.logicseg_loss(paddle.to_tensor(x), paddle.to_tensor(y), h, step=60000,
                                rule_logits=paddle.to_tensor(r), exclusion="level", easy_filter=True).item()
    assert ours == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------- the loop oracle, any tree
def _backends():
    out = {"numpy": None, "torch": ht}
    try:
        import hieraloss.paddle as hp

        out["paddle"] = hp
    except ImportError:
        pass
    return out


def _run(name, mod, x, y, h, **kw):
    if name == "numpy":
        total, parts = nlogic.logicseg_loss(x, y, h, return_parts=True, **kw)
        return float(total), {k: float(v) for k, v in parts.items()}
    if name == "torch":
        conv = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        total, parts = mod.logicseg_loss(torch.tensor(x), torch.tensor(y), h, return_parts=True, **conv)
    else:
        import paddle

        conv = {k: (paddle.to_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        total, parts = mod.logicseg_loss(paddle.to_tensor(x), paddle.to_tensor(y), h, return_parts=True, **conv)
    return float(total.item()), {k: float(v.item()) for k, v in parts.items()}


@settings(max_examples=25, deadline=None)
@given(data=st.data(), exclusion=st.sampled_from(["siblings", "level"]), easy_filter=st.booleans(),
       p=st.sampled_from([1.0, 2.0, 5.0]))
def test_oracle_on_random_trees_every_backend(data, exclusion, easy_filter, p):
    h = data.draw(hierarchies(max_depth=4, max_children=3, order=None))
    shape = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)))
    y = data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = data.draw(logit_maps(h, shape, scale=3.0))
    rule_shape = data.draw(st.sampled_from([None, (shape[0], 2, 2)]))
    kw = dict(exclusion=exclusion, easy_filter=easy_filter, p=p, step=data.draw(st.sampled_from([None, 30000])))
    r = None
    if rule_shape is not None:
        r = data.draw(logit_maps(h, rule_shape, scale=3.0))
        kw["rule_logits"] = r
    want = logicseg_parts(x, y, h, p=p, exclusion=exclusion, easy_filter=easy_filter, rule_logits=r)
    factor = 1.0 if kw["step"] is None else (30000 - 20000) / 30000
    want_total = want["asl"] + 0.2 * factor * (want["child_implies_parent"] + want["parent_implies_child"]
                                               + want["exclusion"])
    for name, mod in _backends().items():
        for backend in (["auto"] if name == "numpy" else ["auto", name]):  # auto: the compiled CPU kernel
            extra = {} if name == "numpy" else {"backend": backend}
            total, parts = _run(name, mod, x, y, h, **kw, **extra)
            for k, v in want.items():
                assert parts[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, backend, k)
            assert total == pytest.approx(want_total, rel=1e-9, abs=1e-12), (name, backend)


@settings(max_examples=10, deadline=None)
@given(data=st.data(), exclusion=st.sampled_from(["siblings", "level"]), easy_filter=st.booleans())
def test_float64_gradcheck(data, exclusion, easy_filter):
    h = data.draw(hierarchies(max_depth=3, max_children=3, balanced=False))
    y = torch.tensor(data.draw(label_maps(h, (1, 2, 2), ignore_fraction=0.25, partial_fraction=0.25)))
    x = torch.tensor(data.draw(logit_maps(h, (1, 2, 2), scale=2.0)), requires_grad=True)
    r = torch.tensor(data.draw(logit_maps(h, (1, 2, 3), scale=2.0)), requires_grad=True)

    def f(a, b):
        return ht.logicseg_loss(a, y, h, rule_logits=b, exclusion=exclusion, easy_filter=easy_filter, step=None)

    assert torch.autograd.gradcheck(f, (x, r), eps=1e-6, atol=1e-7)


def test_paddle_gradients_equal_torch():
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hp

    h = presets.mapillary_vistas_v2() if hasattr(presets, "mapillary_vistas_v2") else presets.cityscapes()
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, size=(2, h.num_nodes, 3, 4))
    y = rng.integers(0, h.num_leaves, size=(2, 3, 4))
    xt = torch.tensor(x, requires_grad=True)
    ht.logicseg_loss(xt, torch.tensor(y), h, step=None).backward()
    xp = paddle.to_tensor(x, stop_gradient=False)
    hp.logicseg_loss(xp, paddle.to_tensor(y), h, step=None).backward()
    np.testing.assert_allclose(xp.grad.numpy(), xt.grad.numpy(), rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------- saturated scores
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("fn", ["child_implies_parent_loss", "parent_implies_child_loss", "exclusion_loss"])
def test_all_zero_violations_give_zero_gradient_not_nan(fn, dtype):
    h = presets.cityscapes()
    x = torch.full((1, h.num_nodes, 2, 2), -1000.0 if dtype == torch.float64 else -60.0, dtype=dtype,
                   requires_grad=True)
    value = getattr(ht, fn)(x, h)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_saturated_paddle_gradient_is_zero():
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hp

    h = presets.cityscapes()
    x = paddle.full([1, h.num_nodes, 2, 2], -60.0, dtype="float32")
    x.stop_gradient = False
    loss = hp.child_implies_parent_loss(x, h) + hp.parent_implies_child_loss(x, h) + hp.exclusion_loss(x, h)
    loss.backward()
    assert loss.item() == 0.0 and np.all(x.grad.numpy() == 0)


# ---------------------------------------------------------------------------- the objective's options
def test_ramp_and_weight():
    h, x, _, y = _cityscapes_inputs()
    xt, yt = torch.tensor(x), torch.tensor(y)
    base, parts = ht.logicseg_loss(xt, yt, h, step=20000, return_parts=True)
    assert base.item() == pytest.approx(parts["asl"].item()) and parts["rule_factor"].item() == 0
    rules = parts["child_implies_parent"] + parts["parent_implies_child"] + parts["exclusion"]
    for step, factor in [(35000, 0.5), (50000, 1.0), (10**6, 1.0)]:
        total = ht.logicseg_loss(xt, yt, h, step=step)
        assert total.item() == pytest.approx(parts["asl"].item() + 0.2 * factor * rules.item())
    half = ht.logicseg_loss(xt, yt, h, step=5, ramp=(0, 10), rule_weight=1.0)
    assert half.item() == pytest.approx(parts["asl"].item() + 0.5 * rules.item())
    assert ht.logicseg_loss(xt, yt, h).item() == pytest.approx(parts["asl"].item() + 0.2 * rules.item())


def test_rules_see_rule_logits_and_upsample_keeps_them_low():
    h, x, r, y = _cityscapes_inputs()
    low = torch.tensor(r)
    a = ht.logicseg_loss(low, torch.tensor(y), h, upsample_logits=True, return_parts=True)[1]
    b = ht.logicseg_loss(TF.interpolate(low, size=y.shape[1:], mode="bilinear", align_corners=False),
                         torch.tensor(y), h, rule_logits=low, return_parts=True)[1]
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item()), k


def test_module_counts_steps():
    h, x, _, y = _cityscapes_inputs()
    m = ht.LogicSegLoss(h, ramp=(0, 4))
    xt = torch.tensor(x, requires_grad=True)
    for expect in range(3):
        _, parts = m(xt, torch.tensor(y), return_parts=True)
        assert parts["rule_factor"].item() == pytest.approx(expect / 4)
    m.eval()
    m(xt, torch.tensor(y))
    assert int(m.step) == 3 and "step" in m.state_dict()
    m.train()
    _, parts = m(xt, torch.tensor(y), step=2, return_parts=True)
    assert parts["rule_factor"].item() == 0.5 and int(m.step) == 3


def test_paddle_layer_counts_steps():
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hp

    h, x, _, y = _cityscapes_inputs()
    m = hp.LogicSegLoss(h, ramp=(0, 4))
    for expect in range(3):
        _, parts = m(paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(y), return_parts=True)
        assert parts["rule_factor"].item() == pytest.approx(expect / 4)
    m.eval()
    m(paddle.to_tensor(x), paddle.to_tensor(y))
    assert int(m.step) == 3


def test_does_not_modify_inputs():
    h, x, r, y = _cityscapes_inputs()
    xt, rt, yt = torch.tensor(x), torch.tensor(r), torch.tensor(y)
    ht.logicseg_loss(xt, yt, h, rule_logits=rt, easy_filter=True)
    assert np.array_equal(xt.numpy(), x) and np.array_equal(rt.numpy(), r) and np.array_equal(yt.numpy(), y)


# ---------------------------------------------------------------------------- bad input, one answer
BAD = [
    (dict(p=0.5), ValueError, "p must be a finite number >= 1"),
    (dict(p=math.inf), ValueError, "p must be a finite number >= 1"),
    (dict(exclusion="pairs"), ValueError, "exclusion"),
    (dict(ramp=(5, 1)), ValueError, "ramp must be (start, end)"),
    (dict(ramp=3), ValueError, "ramp must be None or (start, end)"),
    (dict(step=-1), ValueError, "step must be None or a number >= 0"),
    (dict(rule_weight=math.nan), ValueError, "rule_weight must be a finite number"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD)
def test_bad_options_same_answer_everywhere(kw, exc, msg):
    h, x, _, y = _cityscapes_inputs()
    for name, mod in _backends().items():
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
            _run(name, mod, x, y, h, **kw)


def test_bad_labels_and_channels_same_answer_everywhere():
    h, x, _, y = _cityscapes_inputs()
    bad = y.copy()
    bad[0, 0, 0] = 40
    messages = {}
    for name, mod in _backends().items():
        with pytest.raises(ValueError) as err:
            _run(name, mod, x, bad, h)
        messages.setdefault("labels", set()).add(str(err.value).split("\n")[0])
        with pytest.raises(ValueError) as err:
            _run(name, mod, x[:, :5], y, h)
        messages.setdefault("channels", set()).add(str(err.value))
        with pytest.raises(ValueError) as err:
            _run(name, mod, x, y, h, rule_logits=np.zeros((2, 4, 3, 3)))
        messages.setdefault("rule_logits", set()).add(str(err.value))
    for key, found in messages.items():
        assert len(found) == 1, (key, found)
    assert "rule_logits" in messages["rule_logits"].pop()


def test_asl_options_checked():
    h, x, _, y = _cityscapes_inputs()
    with pytest.raises(ValueError, match="clip must be in"):
        ht.asymmetric_bce_loss(torch.tensor(x), torch.tensor(y), h, clip=1.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        nlogic.asymmetric_bce_loss(x, y, h, eps=0.0)
    with pytest.raises(ValueError, match="gamma_neg must be a finite number >= 0"):
        ht.asymmetric_bce_loss(torch.tensor(x), torch.tensor(y), h, gamma_neg=-1)


@given(data=st.data())
@settings(max_examples=15, deadline=None)
def test_asl_options_against_oracle(data):
    h = data.draw(hierarchies(max_depth=3, max_children=3))
    y = data.draw(label_maps(h, (1, 2, 3), ignore_fraction=None, partial_fraction=None))
    x = data.draw(logit_maps(h, (1, 2, 3), scale=5.0))
    opts = dict(gamma_neg=data.draw(st.sampled_from([0.0, 2.0, 4.0])), gamma_pos=data.draw(st.sampled_from([0.0, 1.0])),
                clip=data.draw(st.sampled_from([0.0, 0.05, 0.2])), eps=1e-8)
    want = logicseg_parts(x, y, h, **opts)["asl"]
    assert float(nlogic.asymmetric_bce_loss(x, y, h, **opts)) == pytest.approx(want, rel=1e-9, abs=1e-12)
    got = ht.asymmetric_bce_loss(torch.tensor(x), torch.tensor(y), h, **opts).item()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------- logic-guided decoding
@settings(max_examples=20, deadline=None)
@given(data=st.data(), exclusion=st.sampled_from(["siblings", "level"]), p=st.sampled_from([1.0, 2.0, 5.0]))
def test_rule_gradient_by_hand_equals_autograd(data, exclusion, p):
    from hieraloss.core import logic as core_logic
    from hieraloss.torch.ops.logicseg import OPS
    from hieraloss.torch.ops.logicseg import tables as _tables

    h = data.draw(hierarchies(max_depth=4, max_children=3, order=None))
    x = torch.tensor(data.draw(logit_maps(h, (1, 3, 2), scale=2.0)))
    s = torch.sigmoid(x.movedim(1, -1).reshape(-1, h.num_nodes)).requires_grad_(True)
    t = _tables(h, s.device, exclusion)
    (want,) = torch.autograd.grad(core_logic.all_rules(OPS, s, t, p), s)
    got = core_logic.all_rules_gradient(OPS, s.detach(), t, p)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-15)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_logic_decode_every_backend(data):
    h = data.draw(hierarchies(max_depth=3, max_children=3, order=None))
    x = data.draw(logit_maps(h, (2, 2, 3), scale=2.0))
    refined = nlogic.logic_refine(x, h)
    import hieraloss.numpy as hnp

    want = hnp.decode(refined, h, "path")
    got = hnp.decode(x, h, "logic")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ht.logic_refine(torch.tensor(x), h).numpy(), refined, rtol=1e-9, atol=1e-12)
    for a, b in zip(ht.decode(torch.tensor(x), h, "logic"), want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    for name, mod in _backends().items():
        if name == "paddle":
            import paddle

            np.testing.assert_allclose(mod.logic_refine(paddle.to_tensor(x), h).numpy(), refined, rtol=1e-9,
                                       atol=1e-12)
            for a, b in zip(mod.decode(paddle.to_tensor(x), h, "logic"), want, strict=True):
                np.testing.assert_array_equal(a.numpy(), b)


def test_logic_refine_lowers_the_rules_and_keeps_input():
    h, x, _, _ = _cityscapes_inputs()
    xt = torch.tensor(x)
    before = (ht.child_implies_parent_loss(xt, h) + ht.parent_implies_child_loss(xt, h) + ht.exclusion_loss(xt, h))
    z = ht.logic_refine(xt, h, steps=20, step_size=0.25)
    after = ht.child_implies_parent_loss(z, h) + ht.parent_implies_child_loss(z, h) + ht.exclusion_loss(z, h)
    assert after.item() < 0.9 * before.item()
    assert np.array_equal(xt.numpy(), x)
    assert torch.equal(ht.logic_refine(xt, h, steps=0), xt)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        ht.logic_refine(xt, h, steps=-1)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        nlogic.logic_refine(x, h, steps=1.5)


def test_logic_refine_images_are_independent():
    h, x, _, _ = _cityscapes_inputs()
    both = ht.logic_refine(torch.tensor(x), h)
    one = ht.logic_refine(torch.tensor(x[1:]), h)
    np.testing.assert_allclose(both[1:].numpy(), one.numpy(), rtol=1e-12)
    assert ht.logic_refine(torch.tensor(x, dtype=torch.float32), h).dtype == torch.float32


# ---------------------------------------------------------------------------- the compiled CPU kernel
def _native_or_skip():
    from hieraloss import _native

    if not _native.available():
        pytest.skip(f"compiled CPU kernel unavailable: {_native.load_error()}")
    return _native


@settings(max_examples=25, deadline=None)
@given(data=st.data(), exclusion=st.sampled_from(["siblings", "level"]), easy_filter=st.booleans(),
       p=st.sampled_from([1.0, 2.0, 3.5, 5.0]), dtype=st.sampled_from(["float64", "float32"]),
       separate=st.booleans(), grad_x=st.booleans())
def test_native_equals_torch_ops_values_and_gradients(data, exclusion, easy_filter, p, dtype, separate, grad_x):
    _native_or_skip()
    h = data.draw(hierarchies(max_depth=4, max_children=4, order=None))
    shape = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 40)))
    y = torch.tensor(data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None)))
    dt = getattr(torch, dtype)
    x = torch.tensor(data.draw(logit_maps(h, shape, scale=3.0)), dtype=dt)
    r = torch.tensor(data.draw(logit_maps(h, (shape[0], 3, 5), scale=3.0)), dtype=dt) if separate else None
    weight = data.draw(st.sampled_from([0.0, 0.2, 1.0]))
    results = []
    for backend in ("torch", "native"):
        xx = x.clone().requires_grad_(grad_x)
        rr = None if r is None else r.clone().requires_grad_(True)
        total, parts = ht.logicseg_loss(xx, y, h, rule_logits=rr, step=None, rule_weight=weight, p=p,
                                        exclusion=exclusion, easy_filter=easy_filter, backend=backend,
                                        return_parts=True)
        inputs = [t for t in (xx, rr) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad else [None] * len(inputs)
        results.append((total.item(), {k: v.item() for k, v in parts.items()},
                        [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]))
    (ta, pa, ga), (tb, pb, gb) = results
    rel = 1e-10 if dtype == "float64" else 2e-5
    assert tb == pytest.approx(ta, rel=rel, abs=rel)
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=rel, abs=rel), k
    for a, b in zip(ga, gb, strict=True):
        scale = float(a.abs().max()) or 1.0
        assert float((a - b).abs().max()) <= (1e-10 if dtype == "float64" else 1e-5) * scale


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_native_asymmetric_bce_options(data):
    _native_or_skip()
    h = data.draw(hierarchies(max_depth=3, max_children=3))
    y = torch.tensor(data.draw(label_maps(h, (2, 3, 7), ignore_fraction=None, partial_fraction=None)))
    x = torch.tensor(data.draw(logit_maps(h, (2, 3, 7), scale=8.0)))
    opts = dict(gamma_neg=data.draw(st.sampled_from([0.0, 1.0, 2.5, 4.0])),
                gamma_pos=data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
                clip=data.draw(st.sampled_from([0.0, 0.05, 0.3])), eps=data.draw(st.sampled_from([1e-8, 1e-3])))
    out = []
    for backend in ("torch", "native"):
        xx = x.clone().requires_grad_(True)
        v = ht.asymmetric_bce_loss(xx, y, h, backend=backend, **opts)
        (g,) = torch.autograd.grad(v, xx)
        out.append((v.item(), g))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-10, abs=1e-12)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-9, atol=1e-12)


def test_native_every_instruction_set_and_no_grad():
    native = _native_or_skip()
    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(0, 2, size=(2, h.num_nodes, 7, 33)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, h.num_leaves, size=(2, 7, 33)))
    want = ht.logicseg_loss(x, y, h, step=None, backend="torch", exclusion="level", easy_filter=True)
    before = native.isa()
    try:
        for isa in native.ISAS:
            native.set_isa(isa)
            xx = x.clone().requires_grad_(True)
            got = ht.logicseg_loss(xx, y, h, step=None, backend="native", exclusion="level", easy_filter=True)
            assert got.item() == pytest.approx(want.item(), rel=2e-5), isa
            got.backward()
            assert torch.isfinite(xx.grad).all()
    finally:
        native.set_isa(before)
    with torch.no_grad():
        assert ht.logicseg_loss(x, y, h, step=None, exclusion="level", easy_filter=True).item() == pytest.approx(
            want.item(), rel=2e-5)


def test_native_backend_refuses_what_it_cannot_run_and_computes_halves_in_float32():
    _native_or_skip()
    h, x, r, y = _cityscapes_inputs()
    with pytest.raises(RuntimeError, match="logits and rule logits of one dtype"):
        ht.logicseg_loss(torch.tensor(x), torch.tensor(y), h, rule_logits=torch.tensor(r, dtype=torch.float32),
                         backend="native")
    with pytest.raises(ValueError, match="backend"):
        ht.logicseg_loss(torch.tensor(x), torch.tensor(y), h, backend="cuda")
    for dtype in (torch.float16, torch.bfloat16):  # computed in float32 on the kernel, as on the torch ops
        xs = [torch.tensor(x, dtype=dtype, requires_grad=True) for _ in range(2)]
        vals = [ht.logicseg_loss(xi, torch.tensor(y), h, step=None, backend=b)
                for xi, b in zip(xs, ("torch", "native"), strict=True)]
        for v in vals:
            v.backward()
        assert vals[1].dtype == vals[0].dtype == torch.float32
        assert vals[1].item() == pytest.approx(vals[0].item(), rel=1e-5)
        assert xs[1].grad.dtype == dtype
        torch.testing.assert_close(xs[1].grad.float(), xs[0].grad.float(), rtol=2e-2, atol=1e-4)


def test_native_paddle_equals_paddle_ops():
    _native_or_skip()
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hp

    h, x, r, y = _cityscapes_inputs(seed=4)
    out = []
    for backend in ("paddle", "native"):
        xx = paddle.to_tensor(x, stop_gradient=False)
        rr = paddle.to_tensor(r, stop_gradient=False)
        total = hp.logicseg_loss(xx, paddle.to_tensor(y), h, rule_logits=rr, step=None, exclusion="level",
                                 easy_filter=True, backend=backend)
        total.backward()
        out.append((total.item(), xx.grad.numpy(), rr.grad.numpy()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-12)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-9, atol=1e-15)
