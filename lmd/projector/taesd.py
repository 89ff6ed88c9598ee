"""TAESD-compatible f8 autoencoder (encoder/decoder module layout of madebyollin/taesd).

The `nn.Sequential` indices reproduce the official layout exactly, so the official
`taesd_encoder.pth` / `taesd_decoder.pth` (or `.safetensors`) state dicts load with `strict=True` and
no key remapping (keys like `0.weight`, `1.conv.0.weight`). `width` generalises the official 64
channels; the project's own pretrained projector uses this same architecture at other widths.
Images are in [0, 1]; the decoder starts with a soft clamp of the latent to (-3, 3).
"""

from __future__ import annotations

import torch
from torch import nn


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convs with ReLUs and an identity skip (a 1x1 conv only when widths differ)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """images [N, 3, H, W] in [0, 1] -> latents [N, C, H/8, W/8]."""
    w = width
    return nn.Sequential(
        conv(3, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, latent_channels),
    )


def taesd_decoder(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """latents [N, C, h, w] -> images [N, 3, 8h, 8w] (unclamped; callers clamp to [0, 1])."""
    w = width
    return nn.Sequential(
        Clamp(), conv(latent_channels, w), nn.ReLU(),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), conv(w, 3),
    )
