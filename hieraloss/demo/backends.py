"""Training and prediction of the demo models, one small runner class per framework.

A runner owns one model (one objective of :data:`OBJECTIVES`) and its optimiser. ``train_step``
takes numpy arrays and returns the loss parts as floats; ``predict`` returns a dict of numpy
arrays: ``logits`` (``[B, K, H, W]`` leaf logits for a flat head, ``[B, N, H, W]`` node logits for
an HSSN head), ``decoded`` and ``alternative`` (per-depth node ids ``[B, L, H, W]`` from the
objective's decoder and from a second decoder, to check that the choice does not matter) and, for
HSSN heads, ``independent`` (``decode(..., "independent")``).

Objectives:

* ``flat``: cross-entropy on K leaf logits.
* ``hxe``: hierarchical cross-entropy (Bertinetto et al. 2020) on K leaf logits, ``alpha``.
* ``soft``: soft-label cross-entropy (Bertinetto et al. 2020) on K leaf logits, ``beta``.
* ``hssn``: ``hssn_loss`` with the published weights (5 x tree-min + CE per depth + scheduled
  triplet) on N node logits and an embedding head.
* ``hssn_tm1``: the same with ``tree_min_weight=1``.
* ``logicseg``: ``logicseg_loss`` (LogicSeg: asymmetric BCE on the node targets plus the three logic
  rules, ramped in as the release does, scaled to the demo's length) on N node logits.

Flat heads are decoded with ``decode_leaf_logits(..., "top_down")`` (alternative: ``"argmax"``),
node heads with ``decode(..., "path")`` (alternative: ``"top_down"``; ``logic``: ``decode(...,
"logic")``, LogicSeg's logic-guided reasoning, reported against ``path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hierarchy import Hierarchy
from .model import paddle_model, torch_model

__all__ = ["TorchRunner", "PaddleRunner", "Objective", "OBJECTIVES", "MODELS"]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Objective:
    """One demo model: its table label, head (``"leaf"``: K channels, ``"node"``: N channels plus
    embeddings) and the backend functions it needs (checked before it is trained)."""

    name: str
    label: str
    head: str
    description: str
    needs: tuple[str, ...]


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("flat", "flat CE", "leaf", "cross-entropy on the leaf logits", ("decode_leaf_logits",)),
    Objective("hssn", "HSSN", "node", "hssn_loss, published weights: 5 x tree-min + CE per depth + "
              "scheduled triplet", ("hssn_loss", "decode")),
    Objective("hssn_tm1", "HSSN tm=1", "node", "hssn_loss with tree_min_weight=1",
              ("hssn_loss", "decode")),
    Objective("hxe", "HXE", "leaf", "hierarchical cross-entropy on the leaf logits (alpha)",
              ("hierarchical_cross_entropy", "decode_leaf_logits")),
    Objective("soft", "soft labels", "leaf", "soft-label cross-entropy on the leaf logits (beta)",
              ("soft_label_cross_entropy", "decode_leaf_logits")),
    Objective("logicseg", "LogicSeg", "node", "logicseg_loss: asymmetric BCE + 0.2 x the logic rules, ramped in "
              "over 25% to 62.5% of training (the release's 20k..50k of 80k)", ("logicseg_loss", "decode")),
)}
LOGICSEG_RAMP = (0.25, 0.625)  # the release's ramp, 20k..50k steps, as fractions of its 80k-step schedule
MODELS = tuple(OBJECTIVES)

FLAT_DECODE, FLAT_ALTERNATIVE = "top_down", "argmax"
HSSN_DECODE, HSSN_ALTERNATIVE = "path", "top_down"


def missing_functions(hl: Any, mode: str) -> list[str]:
    """The backend functions objective ``mode`` needs that the backend module ``hl`` lacks."""
    return [name for name in OBJECTIVES[mode].needs if not hasattr(hl, name)]


def _tree_min_weight(mode: str) -> float:
    return 1.0 if mode == "hssn_tm1" else 5.0


class _Runner:
    """What both frameworks share: objective bookkeeping."""

    def _setup(self, config: Any, hierarchy: Hierarchy, mode: str) -> tuple[int, int]:
        if mode not in OBJECTIVES:
            raise ValueError(f"unknown demo model {mode!r}; choose from {', '.join(MODELS)}")
        self.hierarchy, self.mode, self.config = hierarchy, mode, config
        self.leaf_head = OBJECTIVES[mode].head == "leaf"
        if self.leaf_head:
            return hierarchy.num_leaves, 0
        return hierarchy.num_nodes, config.embed_dim

    def _loss(self, logits, embeddings, y, step: int, total_steps: int) -> dict[str, Any]:
        """The model's objective on one batch (``hl`` is the backend's module: same names in both)."""
        hl, h, mode = self.hl, self.hierarchy, self.mode
        if mode == "flat":
            return {"loss": self._flat_ce(logits, y)}
        if mode == "hxe":
            return {"loss": hl.hierarchical_cross_entropy(logits, y, h, alpha=self.config.hxe_alpha,
                                                          ignore_index=IGNORE_INDEX)}
        if mode == "soft":
            return {"loss": hl.soft_label_cross_entropy(logits, y, h, beta=self.config.soft_beta,
                                                        ignore_index=IGNORE_INDEX)}
        if mode == "logicseg":
            ramp = (LOGICSEG_RAMP[0] * total_steps, LOGICSEG_RAMP[1] * total_steps)
            total, parts = hl.logicseg_loss(logits, y, h, step=step, ramp=ramp, ignore_index=IGNORE_INDEX,
                                            return_parts=True)
            return {"loss": total, **parts}
        total, parts = hl.hssn_loss(logits, y, h, embeddings=embeddings, step=step, total_steps=total_steps,
                                    tree_min_weight=_tree_min_weight(mode), generator=self.generator,
                                    ignore_index=IGNORE_INDEX, return_parts=True)
        return {"loss": total, **parts}


class TorchRunner(_Runner):
    def __init__(self, config: Any, hierarchy: Hierarchy, mode: str):
        import torch

        from .. import torch as hl

        self.torch, self.hl = torch, hl
        outputs, embed_dim = self._setup(config, hierarchy, mode)
        torch.manual_seed(config.seed)  # same trunk initialisation for every model
        # channels_last: oneDNN's convolutions skip their layout reorders (~20% less time per
        # step on the CPU, measured for every objective here).
        self.model = torch_model(outputs, embed_dim, config.width).to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        # The triplet sampler's generator: reproducible from the seed.
        self.generator = torch.Generator().manual_seed(config.seed)

    def _input(self, images: np.ndarray):
        return self.torch.from_numpy(images).contiguous(memory_format=self.torch.channels_last)

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _flat_ce(self, logits, y):
        return self.torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)

    def train_step(self, images: np.ndarray, labels: np.ndarray, step: int,
                   total_steps: int) -> dict[str, float]:
        torch = self.torch
        self.model.train()
        logits, embeddings = self.model(self._input(images))
        parts = self._loss(logits, embeddings, torch.from_numpy(labels), step, total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in parts.items()}

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch, hl, h = self.torch, self.hl, self.hierarchy
        self.model.eval()
        with torch.no_grad():
            logits, _ = self.model(self._input(images))
            logits = logits.contiguous()
            if self.leaf_head:
                out = {"decoded": hl.decode_leaf_logits(logits, h, method=FLAT_DECODE)[1],
                       "alternative": hl.decode_leaf_logits(logits, h, method=FLAT_ALTERNATIVE)[1]}
            else:
                out = {"decoded": hl.decode(logits, h, method=HSSN_DECODE)[1],
                       "alternative": hl.decode(logits, h, method=HSSN_ALTERNATIVE)[1],
                       "independent": hl.decode(logits, h, method="independent")[1],
                       "logic": hl.decode(logits, h, method="logic")[1]}
        return {"logits": logits.numpy(), **{k: v.numpy() for k, v in out.items()}}


class PaddleRunner(_Runner):
    def __init__(self, config: Any, hierarchy: Hierarchy, mode: str):
        import paddle

        from .. import paddle as hl

        self.paddle, self.hl = paddle, hl
        outputs, embed_dim = self._setup(config, hierarchy, mode)
        paddle.set_device("cpu")
        paddle.seed(config.seed)
        self.model = paddle_model(outputs, embed_dim, config.width)
        self.optimizer = paddle.optimizer.AdamW(learning_rate=config.lr, parameters=self.model.parameters(),
                                                weight_decay=config.weight_decay)
        self.generator = np.random.default_rng([config.seed, 3])

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.model.parameters()))

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

    def _flat_ce(self, logits, y):
        return self.paddle.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, axis=1)

    def train_step(self, images: np.ndarray, labels: np.ndarray, step: int,
                   total_steps: int) -> dict[str, float]:
        paddle = self.paddle
        self.model.train()
        logits, embeddings = self.model(paddle.to_tensor(images))
        parts = self._loss(logits, embeddings, paddle.to_tensor(labels), step, total_steps)
        self.optimizer.clear_grad()
        parts["loss"].backward()
        self.optimizer.step()
        return {k: float(v) for k, v in parts.items()}

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        paddle, hl, h = self.paddle, self.hl, self.hierarchy
        self.model.eval()
        with paddle.no_grad():
            logits, _ = self.model(paddle.to_tensor(images))
            if self.leaf_head:
                out = {"decoded": hl.decode_leaf_logits(logits, h, method=FLAT_DECODE)[1],
                       "alternative": hl.decode_leaf_logits(logits, h, method=FLAT_ALTERNATIVE)[1]}
            else:
                out = {"decoded": hl.decode(logits, h, method=HSSN_DECODE)[1],
                       "alternative": hl.decode(logits, h, method=HSSN_ALTERNATIVE)[1],
                       "independent": hl.decode(logits, h, method="independent")[1],
                       "logic": hl.decode(logits, h, method="logic")[1]}
        return {"logits": logits.numpy(), **{k: v.numpy() for k, v in out.items()}}
