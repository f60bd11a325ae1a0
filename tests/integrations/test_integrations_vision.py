"""make_hierarchical on segmentation_models_pytorch and torchvision models (the real packages: they
need torchvision, so this file runs in the `make test-vision` venv and is skipped elsewhere)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")
torchvision = pytest.importorskip("torchvision")

import hieraloss  # noqa: E402
from hieraloss.torch import HSSNLoss, make_hierarchical  # noqa: E402

H = hieraloss.presets.cityscapes()
SEG = torchvision.models.segmentation

MODELS = {
    "smp.Unet": lambda: smp.Unet("resnet18", encoder_weights=None, classes=19),
    "smp.FPN": lambda: smp.FPN("resnet18", encoder_weights=None, classes=19),
    "smp.DeepLabV3Plus": lambda: smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=19),
    "smp.Segformer": lambda: smp.Segformer("resnet18", encoder_weights=None, classes=19),
    "smp.UPerNet": lambda: smp.UPerNet("resnet18", encoder_weights=None, classes=19),
    "smp.DPT": lambda: smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, classes=19, dynamic_img_size=True),
    "torchvision.fcn": lambda: SEG.fcn_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=True),
    "torchvision.deeplabv3": lambda: SEG.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=19, aux_loss=True),
    "torchvision.lraspp": lambda: SEG.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19),
}
EXPECTED_PATH = {"smp.DPT": "segmentation_head.head.4", "torchvision.lraspp": "classifier.high_classifier"}


@pytest.mark.parametrize("name", list(MODELS))
def test_stock_models_become_hierarchical_and_train(name):
    torch.manual_seed(0)
    stock = MODELS[name]()
    model = make_hierarchical(stock, H, embedding_dim=8)
    family = "smp" if name.startswith("smp") else "torchvision"
    default = "segmentation_head.0" if family == "smp" else "classifier.4"
    assert model.classifier_path == EXPECTED_PATH.get(name, default)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, H.num_leaves, (2, 64, 64))
    logits, embeddings = model(images)
    assert logits.shape == (2, H.num_nodes, 64, 64)  # both families return the input's size
    assert embeddings.shape[:2] == (2, 8)
    loss = HSSNLoss(H, total_steps=10)(logits, labels, embeddings, step=5)
    loss.backward()
    assert model.head.classifier.weight.grad.abs().sum() > 0
    assert model.head.projection[-1].weight.grad.abs().sum() > 0
    # Every other class-channel classifier (aux heads, LRASPP's low branch) emits node channels too.
    for path in ("aux_classifier.4", "classifier.low_classifier"):
        try:
            other = stock.get_submodule(path)
        except AttributeError:
            continue
        assert other.out_channels == H.num_nodes
    if name == "torchvision.fcn":
        assert stock(images)["aux"].shape[1] == H.num_nodes


def test_a_model_without_a_known_classifier_is_named():
    encoder_only = smp.encoders.get_encoder("resnet18", weights=None)
    with pytest.raises(ValueError, match="could not find the classifier.*segmentation_head.0"):
        make_hierarchical(encoder_only, H)
