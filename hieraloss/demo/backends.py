"""Training and prediction of the demo model, one small runner class per framework.

A runner owns one model and its optimiser. ``train_step`` takes numpy arrays and returns the loss
parts as floats; ``predict`` returns numpy: leaf logits ``[B, K, H, W]`` for the flat model, or
``(decoded, independent)`` per-depth node ids ``[B, L, H, W]`` for the HSSN model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..hierarchy import Hierarchy
from .model import paddle_model, torch_model

__all__ = ["TorchRunner", "PaddleRunner"]

IGNORE_INDEX = 255


class TorchRunner:
    def __init__(self, config: Any, hierarchy: Hierarchy, mode: str):
        import torch

        from .. import torch as hl

        self.torch, self.hl = torch, hl
        self.hierarchy, self.mode = hierarchy, mode
        torch.manual_seed(config.seed)  # same trunk initialisation for both models
        flat = mode == "flat"
        self.model = torch_model(hierarchy.num_leaves if flat else hierarchy.num_nodes,
                                 0 if flat else config.embed_dim, config.width)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        # The triplet sampler's generator: reproducible from the seed.
        self.generator = torch.Generator().manual_seed(config.seed)

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, images: np.ndarray, labels: np.ndarray, step: int,
                   total_steps: int) -> dict[str, float]:
        torch = self.torch
        self.model.train()
        x = torch.from_numpy(images)
        y = torch.from_numpy(labels)
        logits, embeddings = self.model(x)
        if self.mode == "flat":
            loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
            parts = {"loss": loss}
        else:
            parts = hssn_objective_torch(self.hl, logits, embeddings, y, self.hierarchy, step, total_steps,
                                         self.generator)
            loss = parts["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in parts.items()}

    def predict(self, images: np.ndarray):
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            logits, _ = self.model(torch.from_numpy(images))
            if self.mode == "flat":
                return logits.numpy()
            _, decoded = self.hl.decode(logits, self.hierarchy, method="path")
            _, independent = self.hl.decode(logits, self.hierarchy, method="independent")
        return decoded.numpy(), independent.numpy()


def hssn_objective_torch(hl, logits, embeddings, labels, hierarchy, step, total_steps, generator):
    """The published HSSN objective: ``5 * tree-min + sum_d CE_d + w(step) * triplet`` (``hssn_loss``)."""
    total, parts = hl.hssn_loss(logits, labels, hierarchy, embeddings=embeddings, step=step,
                                total_steps=total_steps, generator=generator, ignore_index=IGNORE_INDEX,
                                return_parts=True)
    return {"loss": total, **parts}


class PaddleRunner:
    def __init__(self, config: Any, hierarchy: Hierarchy, mode: str):
        import paddle

        from .. import paddle as hl

        self.paddle, self.hl = paddle, hl
        self.hierarchy, self.mode = hierarchy, mode
        paddle.set_device("cpu")
        paddle.seed(config.seed)
        flat = mode == "flat"
        self.model = paddle_model(hierarchy.num_leaves if flat else hierarchy.num_nodes,
                                  0 if flat else config.embed_dim, config.width)
        self.optimizer = paddle.optimizer.AdamW(learning_rate=config.lr, parameters=self.model.parameters(),
                                                weight_decay=config.weight_decay)
        self.generator = np.random.default_rng([config.seed, 3])

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.model.parameters()))

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

    def train_step(self, images: np.ndarray, labels: np.ndarray, step: int,
                   total_steps: int) -> dict[str, float]:
        paddle = self.paddle
        self.model.train()
        x = paddle.to_tensor(images)
        y = paddle.to_tensor(labels)
        logits, embeddings = self.model(x)
        if self.mode == "flat":
            loss = paddle.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, axis=1)
            parts = {"loss": loss}
        else:
            loss, parts = self.hl.hssn_loss(logits, y, self.hierarchy, embeddings=embeddings, step=step,
                                            total_steps=total_steps, generator=self.generator,
                                            ignore_index=IGNORE_INDEX, return_parts=True)
            parts = {"loss": loss, **parts}
        self.optimizer.clear_grad()
        loss.backward()
        self.optimizer.step()
        return {k: float(v) for k, v in parts.items()}

    def predict(self, images: np.ndarray):
        paddle = self.paddle
        self.model.eval()
        with paddle.no_grad():
            logits, _ = self.model(paddle.to_tensor(images))
            if self.mode == "flat":
                return logits.numpy()
            _, decoded = self.hl.decode(logits, self.hierarchy, method="path")
            _, independent = self.hl.decode(logits, self.hierarchy, method="independent")
        return decoded.numpy(), independent.numpy()
