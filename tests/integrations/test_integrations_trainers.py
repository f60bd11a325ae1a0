"""Hugging Face Trainer and Lightning: the triplet schedule follows the optimizer step (gradient
accumulation, checkpoint and resume), evaluation is hierarchical, post-processing decodes paths."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as tnf  # noqa: E402

import hieraloss  # noqa: E402
from hieraloss.metrics import HierarchicalSegMetrics  # noqa: E402
from hieraloss.torch import HSSNLoss, decode, make_hierarchical  # noqa: E402

H = hieraloss.presets.cityscapes()


class _Scenes(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, size: int = 32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, H.num_leaves, (n, size, size), generator=g)
        self.labels[:, :2] = 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class _RecordingHSSNLoss(HSSNLoss):
    """HSSNLoss that records the step each call was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[int | None] = []

    def forward(self, logits, labels, embeddings=None, *, step=None, **kwargs):
        self.steps.append(step)
        return super().forward(logits, labels, embeddings, step=step, **kwargs)


# ------------------------------------------------------------------ Hugging Face
def _segformer():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_labels=19, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                          num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16)
    return transformers.SegformerForSemanticSegmentation(config)


def _hf_trainer(tmp_path, loss, max_steps, **kwargs):
    transformers = pytest.importorskip("transformers")
    from hieraloss.integrations.transformers import HierarchicalTrainer, compute_metrics, leaf_predictions

    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        learning_rate=1e-3, **kwargs)
    return HierarchicalTrainer(model=make_hierarchical(_segformer(), H, embedding_dim=4), args=args,
                               train_dataset=_Scenes(), eval_dataset=_Scenes(4), loss=loss,
                               preprocess_logits_for_metrics=leaf_predictions(H), compute_metrics=compute_metrics(H))


def test_hf_trainer_drives_the_schedule_by_optimizer_step_and_resumes(tmp_path):
    loss = _RecordingHSSNLoss(H, total_steps=4, upsample_logits=True)
    trainer = _hf_trainer(tmp_path, loss, max_steps=4)
    trainer.train()
    assert loss.steps == [0, 0, 1, 1, 2, 2, 3, 3]  # two micro-batches per optimizer step
    assert int(loss.step) == 0  # the explicit step leaves the module's counter alone
    resumed_loss = _RecordingHSSNLoss(H, total_steps=4, upsample_logits=True)
    resumed = _hf_trainer(tmp_path, resumed_loss, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed_loss.steps == [2, 2, 3, 3]


def test_hf_evaluation_is_hierarchical_and_equals_the_metric(tmp_path):
    loss = _RecordingHSSNLoss(H, total_steps=4, upsample_logits=True)
    trainer = _hf_trainer(tmp_path, loss, max_steps=1)
    result = trainer.evaluate()
    model, data = trainer.model, _Scenes(4)
    reference = HierarchicalSegMetrics(H)
    model.eval()
    with torch.no_grad():
        for i in range(0, 4, 2):
            logits = model(data.images[i:i + 2]).logits
            up = tnf.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
            reference.update(decode(up, H)[0], data.labels[i:i + 2])
    for key, value in reference.scalars().items():
        assert result[f"eval_{key}"] == pytest.approx(value, abs=1e-12, nan_ok=True)
    assert "eval_loss" in result


def test_hf_post_processing_decodes_paths_at_the_target_size():
    from hieraloss.integrations.transformers import label_maps, post_process_semantic_segmentation

    model = make_hierarchical(_segformer(), H)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        maps = post_process_semantic_segmentation(out, H, target_sizes=[(32, 32), (20, 24)])
        raw = model.model(pixel_values=images)  # the HF output object works too
        same = post_process_semantic_segmentation(raw, H, target_sizes=[(32, 32), (20, 24)])
    for i, size in enumerate([(32, 32), (20, 24)]):
        up = tnf.interpolate(out.logits[i:i + 1], size=size, mode="bilinear", align_corners=False)
        assert torch.equal(maps[i], decode(up, H)[0][0]) and torch.equal(same[i], maps[i])
        assert int(maps[i].max()) < H.num_leaves  # leaf ids only, never an internal node
    id2label, label2id = label_maps(H)
    assert len(id2label) == H.num_nodes and all(label2id[name] == c for c, name in id2label.items())
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_semantic_segmentation(out, H, target_sizes=[(32, 32)])


# ------------------------------------------------------------------ Lightning
def _lightning_module(loss):
    lightning = pytest.importorskip("lightning")
    from hieraloss.integrations.torchmetrics import HierarchicalSegMetric

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = make_hierarchical(_segformer(), H, embedding_dim=4)
            self.loss = loss
            self.val_metric = HierarchicalSegMetric(H, upsample_logits=True)

        def training_step(self, batch, batch_idx):
            out = self.model(batch["pixel_values"])
            total, parts = self.loss(out.logits, batch["labels"], out.embeddings, step=self.global_step,
                                     return_parts=True)
            self.log_dict({f"train/{k}": v for k, v in parts.items()})
            return total

        def validation_step(self, batch, batch_idx):
            self.val_metric.update(self.model(batch["pixel_values"]).logits, batch["labels"])

        def on_validation_epoch_end(self):
            self.log_dict({f"val/{k}": v for k, v in self.val_metric.compute().items()})
            self.val_metric.reset()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Module()


def _loader(n):
    return torch.utils.data.DataLoader(_Scenes(n), batch_size=2)


def test_lightning_drives_the_schedule_by_global_step_and_resumes(tmp_path):
    lightning = pytest.importorskip("lightning")
    # At label size: Lightning's module sees the logits at SegFormer's 1/4, so the loss upsamples.
    loss = _RecordingHSSNLoss(H, total_steps=4, upsample_logits=True)
    module = _lightning_module(loss)
    kwargs = dict(accelerator="cpu", accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    trainer = lightning.Trainer(max_steps=2, default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(module, _loader(8), _loader(4))
    assert loss.steps == [0, 0, 1, 1]
    assert {"val/miou_depth1", "val/hierarchical_f1", "train/tree_min", "train/triplet"} <= set(
        trainer.callback_metrics)
    ckpt = str(tmp_path / "step2.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed_loss = _RecordingHSSNLoss(H, total_steps=4, upsample_logits=True)
    resumed = lightning.Trainer(max_steps=4, default_root_dir=str(tmp_path), **kwargs)
    resumed.fit(_lightning_module(resumed_loss), _loader(8), _loader(4), ckpt_path=ckpt)
    assert resumed_loss.steps == [2, 2, 3, 3]
    assert np.isfinite(float(resumed.callback_metrics["val/miou_depth2"]))
