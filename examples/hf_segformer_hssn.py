"""Train a Hugging Face SegFormer with HSSN on the demo's procedural Cityscapes-like scenes.

A tiny SegFormer config (random init, no download) is made hierarchical with
``make_hierarchical``, trained by ``HierarchicalTrainer`` with ``HSSNLoss`` on the CPU, and
evaluated with the per-depth metrics. Writes ``metrics.json``, ``loss.png`` and ``predictions.png``
to ``--out``; fails (exit 1) unless the loss fell and depth-1 mIoU is well above chance.

    python examples/hf_segformer_hssn.py --steps 300 --out example_out   # make example
    python examples/hf_segformer_hssn.py --quick                          # what CI runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation, TrainingArguments

import hieraloss
from hieraloss.demo.data import make_splits
from hieraloss.integrations.transformers import (
    HierarchicalTrainer,
    compute_metrics,
    leaf_predictions,
    post_process_semantic_segmentation,
)
from hieraloss.torch import HSSNLoss, make_hierarchical


class Scenes(torch.utils.data.Dataset):
    """The demo's scenes as Hugging Face-style examples."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train", type=int, default=512, help="training scenes")
    parser.add_argument("--test", type=int, default=64, help="held-out scenes")
    parser.add_argument("--out", default="example_out")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (60 steps, 128 scenes)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train, args.test = 60, 128, 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    h = hieraloss.presets.cityscapes()
    splits = make_splits(h, args.train, args.test, size=64, seed=0)
    config = SegformerConfig(num_labels=h.num_leaves, num_channels=3, hidden_sizes=[16, 32, 64, 96],
                             depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=64)
    # The stock model, then the hieraloss-specific lines: head, loss, trainer, metrics.
    model = make_hierarchical(SegformerForSemanticSegmentation(config), h, embedding_dim=32)
    loss = HSSNLoss(h, total_steps=args.steps, upsample_logits=True)  # SegFormer's logits are at 1/4
    training = TrainingArguments(output_dir=str(out / "checkpoints"), max_steps=args.steps,
                                 per_device_train_batch_size=16, per_device_eval_batch_size=16,
                                 learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=args.steps // 20,
                                 logging_steps=max(1, args.steps // 30), save_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True, seed=0)
    trainer = HierarchicalTrainer(model=model, args=training, loss=loss,
                                  train_dataset=Scenes(*splits["train"]), eval_dataset=Scenes(*splits["test"]),
                                  preprocess_logits_for_metrics=leaf_predictions(h), compute_metrics=compute_metrics(h))
    before = trainer.evaluate()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()

    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    first, last = float(np.mean([v for _, v in losses[:3]])), float(np.mean([v for _, v in losses[-3:]]))
    chance = 1.0 / len(h.depth_channels[0])  # mIoU of a uniform guess among the depth-1 classes is below this
    result = {"steps": args.steps, "train_seconds": round(seconds, 1), "loss_first": first, "loss_last": last,
              "before": {k: before[k] for k in before if k.startswith("eval_miou")},
              "after": {k: after[k] for k in after if k.startswith("eval_") and not k.endswith(("runtime", "second"))},
              "chance_miou_depth1_below": chance}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    _figures(out, h, trainer, losses, splits["test"])
    ok = last < first and after["eval_miou_depth1"] > 2 * chance
    print("learning:", "yes" if ok else "NO", f"(loss {first:.3f} -> {last:.3f}, depth-1 mIoU "
          f"{after['eval_miou_depth1']:.3f} vs chance < {chance:.3f})")
    return 0 if ok else 1


def _figures(out: Path, h, trainer, losses, test) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures")
        return
    from hieraloss.demo.figure import colourize, node_colours

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(*zip(*losses, strict=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("HSSN loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    images, labels = test
    model = trainer.model.eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(images[:4]).to(trainer.args.device))
    leaves = post_process_semantic_segmentation(outputs, h, target_sizes=[labels.shape[1:]] * 4)
    colours = node_colours(h)
    fig, axes = plt.subplots(3, 4, figsize=(8, 6))
    for i in range(4):
        img = images[i].transpose(1, 2, 0)
        axes[0, i].imshow((img - img.min()) / (img.max() - img.min() + 1e-9))
        axes[1, i].imshow(colourize(labels[i], colours))
        axes[2, i].imshow(colourize(leaves[i].cpu().numpy(), colours))
    for row, name in enumerate(("image", "truth", "prediction")):
        axes[row, 0].set_ylabel(name)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "predictions.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
