"""The hierarchical head, make_hierarchical on Hugging Face models, upsample_logits, the messages
that carry their fix, and the HSSN step that only training steps advance."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as tnf  # noqa: E402

import hieraloss  # noqa: E402
import hieraloss.numpy as hieraloss_numpy  # noqa: E402
from hieraloss import LabelError  # noqa: E402
from hieraloss.testing import hierarchies, label_maps  # noqa: E402
from hieraloss.torch import (  # noqa: E402
    HierarchicalHead,
    HSSNLoss,
    depth_cross_entropy,
    hierarchical_cross_entropy,
    hssn_loss,
    make_hierarchical,
    soft_label_cross_entropy,
    tree_min_loss,
)

H = hieraloss.presets.cityscapes()


# ------------------------------------------------------------------ head
def test_head_outputs_and_upsampling():
    head = HierarchicalHead(12, H, embedding_dim=5, kernel_size=3)
    feats = torch.randn(2, 12, 8, 10)
    out = head(feats)
    assert out.logits.shape == (2, H.num_nodes, 8, 10) and out.embeddings.shape == (2, 5, 8, 10)
    big = head(feats, size=(32, 40))
    reference = tnf.interpolate(head.classifier(feats), size=(32, 40), mode="bilinear", align_corners=False)
    assert torch.equal(big.logits, reference)
    logits, embeddings = HierarchicalHead(12, H, embedding_dim=0)(feats)
    assert embeddings is None and logits.shape[1] == H.num_nodes


@pytest.mark.parametrize("kwargs, match", [({"embedding_dim": -1}, "embedding_dim"),
                                           ({"kernel_size": 2}, "odd"), ({"embedding_dim": 1.5}, "int")])
def test_head_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalHead(8, H, **kwargs)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.final = nn.Conv2d(6, 19, 1)

    def forward(self, x):
        return self.final(torch.relu(self.body(x)))


def test_any_model_by_classifier_path_and_a_clear_error_without_one():
    model = make_hierarchical(_Custom(), H, embedding_dim=4, classifier="final")
    logits, emb = model(torch.randn(1, 3, 8, 8))
    assert logits.shape == (1, H.num_nodes, 8, 8) and emb.shape == (1, 4, 8, 8)
    assert model.head is model.model.final.head
    # The head is held once: its weights appear once in the state dict.
    assert sum(k.endswith("classifier.weight") for k in model.state_dict()) == 1
    with pytest.raises(ValueError, match="could not find the classifier of _Custom.*classifier="):
        make_hierarchical(_Custom(), H)
    with pytest.raises(ValueError, match="does not name an nn.Conv2d"):
        make_hierarchical(_Custom(), H, classifier="body.weight")


def _hf_models():
    transformers = pytest.importorskip("transformers")
    segformer = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_labels=19, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16))
    backbone = transformers.ConvNextConfig(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    upernet = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone, num_labels=19, hidden_size=16, auxiliary_channels=8))
    dpt = transformers.DPTForSemanticSegmentation(transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16, image_size=32,
        patch_size=8, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, backbone_out_indices=[0, 1, 2, 3],
        num_labels=19))
    return {"segformer": (segformer, 8), "upernet": (upernet, 32), "dpt": (dpt, 64)}  # DPT: 2x the input


@pytest.mark.parametrize("name", ["segformer", "upernet", "dpt"])
def test_hugging_face_models_become_hierarchical(name):
    stock, logit_size = _hf_models()[name]
    model = make_hierarchical(stock, H, embedding_dim=6)
    assert stock.config.num_labels == H.num_nodes
    assert stock.config.id2label[H.num_nodes - 1] == H.node_names[-1]
    assert stock.config.label2id[H.node_names[0]] == 0
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, H.num_leaves, (2, 32, 32))
    logits, embeddings = model(images)
    assert logits.shape == (2, H.num_nodes, logit_size, logit_size)
    assert embeddings.shape[:2] == (2, 6)
    loss = HSSNLoss(H, total_steps=10, upsample_logits=True)(logits, labels, embeddings, step=5)
    loss.backward()
    assert model.head.classifier.weight.grad.abs().sum() > 0
    assert model.head.projection[0].weight.grad.abs().sum() > 0
    # Auxiliary heads emit node channels too, so the stock forward with its aux logits still runs.
    aux = [p for p in ("auxiliary_head.classifier", "auxiliary_head.head.4") if _has(model.model, p)]
    assert len(aux) == (name != "segformer")
    assert all(model.model.get_submodule(p).out_channels == H.num_nodes for p in aux)
    up = make_hierarchical(_hf_models()[name][0], H, output_size="input")
    assert up(images).logits.shape[2:] == (32, 32)


def _has(model, path):
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


# ------------------------------------------------------------------ upsample_logits
def _small_logits(h, generator, size=(3, 4), dtype=torch.float64, channels=None):
    return torch.randn(2, channels or h.num_nodes, *size, generator=generator, dtype=dtype, requires_grad=True)


@given(h=hierarchies(max_depth=3), data=st.data())
def test_upsample_logits_equals_interpolating_first(h, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    labels = torch.from_numpy(data.draw(label_maps(h, (2, 6, 8), ignore_fraction=0.2, partial_fraction=0.2)))
    x = _small_logits(h, g)
    up = tnf.interpolate(x, size=(6, 8), mode="bilinear", align_corners=False)
    for fn in (lambda z, **k: tree_min_loss(z, labels, h, backend="torch", **k),
               lambda z, **k: depth_cross_entropy(z, labels, h, h.max_depth, **k),
               lambda z, **k: hssn_loss(z, labels, h, backend="torch", **k)):
        got = fn(x, upsample_logits=True)
        want = fn(up)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        (g1,) = torch.autograd.grad(got, x)
        (g2,) = torch.autograd.grad(want, x)
        assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-12)
    leaf = _small_logits(h, g, channels=h.num_leaves)
    up_leaf = tnf.interpolate(leaf, size=(6, 8), mode="bilinear", align_corners=False)
    for fn in (hierarchical_cross_entropy, soft_label_cross_entropy):
        assert torch.allclose(fn(leaf, labels, h, upsample_logits=True), fn(up_leaf, labels, h), atol=1e-12)


def test_upsample_logits_gradcheck_and_same_size_is_a_no_op():
    g = torch.Generator().manual_seed(0)
    x = _small_logits(H, g, size=(2, 3))
    labels = torch.randint(0, H.num_leaves, (2, 4, 6), generator=g)
    assert torch.autograd.gradcheck(lambda z: tree_min_loss(z, labels, H, backend="torch", upsample_logits=True),
                                    (x,))
    same = torch.randint(0, H.num_leaves, (2, 2, 3), generator=g)
    assert torch.equal(tree_min_loss(x, same, H, upsample_logits=True), tree_min_loss(x, same, H))
    volume = torch.randn(1, H.num_nodes, 2, 2, 2, dtype=torch.float64)  # trilinear for 3 spatial axes
    vol_labels = torch.randint(0, H.num_leaves, (1, 4, 4, 4))
    want = tree_min_loss(tnf.interpolate(volume, size=(4, 4, 4), mode="trilinear", align_corners=False),
                         vol_labels, H)
    assert torch.allclose(tree_min_loss(volume, vol_labels, H, upsample_logits=True), want)


# ------------------------------------------------------------------ messages that carry the fix
def test_messages_name_the_fix():
    labels = torch.randint(0, 19, (2, 64, 64))
    with pytest.raises(ValueError, match=r"19 channels.*leaf count.*per node.*hierarchy.num_nodes \(26\)"):
        tree_min_loss(torch.randn(2, 19, 64, 64), labels, H)
    with pytest.raises(ValueError, match=r"logits \(16x16\) are at a lower resolution.*64x64.*upsample_logits=True"):
        tree_min_loss(torch.randn(2, 26, 16, 16), labels, H)
    raw = labels.clone()
    raw[0, 0, 0] = 33
    with pytest.raises(LabelError, match="33.*raw ids.*train ids.*ignore_index"):
        tree_min_loss(torch.randn(2, 26, 64, 64), raw, H)
    with pytest.raises(LabelError, match="train ids"):
        hieraloss_numpy.tree_min_loss(np.zeros((2, 26, 64, 64)), raw.numpy(), H)


def test_paddle_names_the_same_fix_and_upsamples_the_same():
    paddle = pytest.importorskip("paddle")
    import hieraloss.paddle as hpaddle

    x = np.random.default_rng(0).normal(size=(2, 26, 3, 4))
    labels = np.random.default_rng(1).integers(0, 19, size=(2, 6, 8))
    want = tree_min_loss(torch.from_numpy(x), torch.from_numpy(labels), H, upsample_logits=True, backend="torch")
    for fn in (hpaddle.tree_min_loss, hpaddle.hssn_loss):
        got = fn(paddle.to_tensor(x), paddle.to_tensor(labels), H, upsample_logits=True)
        ref = (tree_min_loss if fn is hpaddle.tree_min_loss else hssn_loss)(
            torch.from_numpy(x), torch.from_numpy(labels), H, upsample_logits=True)
        assert abs(float(got) - float(ref)) < 1e-9
    assert abs(float(hpaddle.tree_min_loss(paddle.to_tensor(x), paddle.to_tensor(labels), H, upsample_logits=True))
               - float(want)) < 1e-9
    layer = hpaddle.TreeMinLoss(H, upsample_logits=True)(paddle.to_tensor(x), paddle.to_tensor(labels))
    assert abs(float(layer) - float(want)) < 1e-9
    leaf = x[:, : H.num_leaves]
    for name in ("hierarchical_cross_entropy", "soft_label_cross_entropy"):
        got = getattr(hpaddle, name)(paddle.to_tensor(leaf), paddle.to_tensor(labels), H, upsample_logits=True)
        ref = globals()[name](torch.from_numpy(leaf), torch.from_numpy(labels), H, upsample_logits=True)
        assert abs(float(got) - float(ref)) < 1e-9
    up = hpaddle.HierarchicalCrossEntropyLoss(H, upsample_logits=True)(paddle.to_tensor(leaf), paddle.to_tensor(labels))
    assert abs(float(up) - float(hierarchical_cross_entropy(torch.from_numpy(leaf), torch.from_numpy(labels), H,
                                                            upsample_logits=True))) < 1e-9
    with pytest.raises(ValueError, match=r"hierarchy.num_nodes \(26\)"):
        hpaddle.tree_min_loss(paddle.randn([1, 19, 4, 4]), paddle.zeros([1, 4, 4], dtype="int64"), H)
    with pytest.raises(ValueError, match="upsample_logits=True"):
        hpaddle.tree_min_loss(paddle.randn([1, 26, 2, 2]), paddle.zeros([1, 4, 4], dtype="int64"), H)


# ------------------------------------------------------------------ the triplet schedule's step
def test_hssn_step_advances_only_on_training_steps():
    loss = HSSNLoss(H, total_steps=100)
    x = torch.randn(1, H.num_nodes, 4, 4, requires_grad=True)
    emb = torch.randn(1, 4, 4, 4, requires_grad=True)
    y = torch.randint(0, H.num_leaves, (1, 4, 4))
    loss(x, y, emb)
    assert int(loss.step) == 1
    with torch.no_grad():
        loss(x, y, emb)
    with torch.inference_mode():
        loss(x, y, emb)
    loss(x, y, emb, step=50)  # the trainer's step: the buffer stays
    assert int(loss.step) == 1
    loss.eval()
    loss(x, y, emb)
    assert int(loss.step) == 1
    loss.train()
    loss(x, y)  # no embeddings: no triplet term, nothing to schedule
    assert int(loss.step) == 1


def test_hierarchical_model_compiles_fullgraph():
    """The classifier tap keeps the embeddings in a module attribute: dynamo traces that as a side
    effect, so a compiled model gives eager's outputs with no graph break."""
    model = make_hierarchical(_Custom(), H, embedding_dim=4, classifier="final")
    images = torch.randn(2, 3, 8, 8)
    eager = model(images)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(images)
    assert torch.equal(eager.logits, compiled.logits)
    assert torch.allclose(eager.embeddings, compiled.embeddings)
    assert model.model.final.embeddings is None  # handed over, not kept
