"""A tiny fully-convolutional network, in PyTorch and in PaddlePaddle (same layers and shapes).

Encoder: a stride-2 3x3 conv and a 3x3 conv at 1/2 resolution, then a stride-2 stage with two
dilated convs at 1/4 resolution. Decoder: upsample x2 with a skip connection, a 1x1 head at 1/2
resolution, then bilinear upsampling of the logits to the input size (as segmentation networks
usually do; it keeps the CPU cost low). Outputs ``logits [B, num_outputs, H, W]`` and, if
``embed_dim > 0``, ``embeddings [B, embed_dim, H/4, W/4]`` from the 1/4-resolution features (the
triplet loss works at low resolution, as in the published method).
"""

from __future__ import annotations

__all__ = ["torch_model", "paddle_model"]


def torch_model(num_outputs: int, embed_dim: int = 0, width: int = 32):
    """The network as a ``torch.nn.Module`` returning ``(logits, embeddings or None)``."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class TinyFCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.stem = nn.Sequential(block(3, w, 2), block(w, w))
            self.down2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w, dilation=2),
                                       block(2 * w, 2 * w, dilation=4))
            self.up = block(3 * w, w)
            self.head = nn.Conv2d(w, num_outputs, 1)
            self.embed = nn.Conv2d(2 * w, embed_dim, 1) if embed_dim > 0 else None

        def forward(self, x: torch.Tensor):
            f2 = self.stem(x)
            f4 = self.down2(f2)
            u = F.interpolate(f4, size=f2.shape[-2:], mode="bilinear", align_corners=False)
            u = self.up(torch.cat([u, f2], dim=1))
            logits = F.interpolate(self.head(u), size=x.shape[-2:], mode="bilinear", align_corners=False)
            emb = self.embed(f4) if self.embed is not None else None
            return logits, emb

    return TinyFCN()


def paddle_model(num_outputs: int, embed_dim: int = 0, width: int = 32):
    """The same network as a ``paddle.nn.Layer`` returning ``(logits, embeddings or None)``."""
    import paddle
    from paddle import nn
    from paddle.nn import functional as F

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2D(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias_attr=False),
            nn.BatchNorm2D(cout),
            nn.ReLU(),
        )

    class TinyFCN(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.stem = nn.Sequential(block(3, w, 2), block(w, w))
            self.down2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w, dilation=2),
                                       block(2 * w, 2 * w, dilation=4))
            self.up = block(3 * w, w)
            self.head = nn.Conv2D(w, num_outputs, 1)
            self.embed = nn.Conv2D(2 * w, embed_dim, 1) if embed_dim > 0 else None

        def forward(self, x):
            f2 = self.stem(x)
            f4 = self.down2(f2)
            u = F.interpolate(f4, size=f2.shape[-2:], mode="bilinear", align_corners=False)
            u = self.up(paddle.concat([u, f2], axis=1))
            logits = F.interpolate(self.head(u), size=x.shape[-2:], mode="bilinear", align_corners=False)
            emb = self.embed(f4) if self.embed is not None else None
            return logits, emb

    return TinyFCN()
