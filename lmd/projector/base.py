"""The projector interface: images in [0, 1] <-> latents, plus an identity for manifests.

A projector is LMD's "perceptual latent space projection": a frozen autoencoder that maps images
[N, 3, H, W] in [0, 1] to latents [N, C, H/f, W/f] and back. `scale` and `shift` standardise the
raw latent (latent = (raw - shift) * scale) so the masked transformer sees roughly unit-variance
inputs whatever the autoencoder. `info()` is what a latent store's manifest records and what a
training run checks the store against.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class ProjectorError(ValueError):
    """A projector cannot be found or loaded; the message names the file or spec."""


class Projector(nn.Module, ABC):
    name: str = "projector"
    latent_channels: int = 4
    downsample: int = 8

    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.scale = float(scale)
        self.shift = float(shift)

    @abstractmethod
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> raw latents [N, C, H/f, W/f]."""

    @abstractmethod
    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """raw latents -> images [N, 3, H, W], roughly in [0, 1] (clamped by `decode`)."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.encode_raw(images) - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(latents / self.scale + self.shift).clamp(0.0, 1.0)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ProjectorError(f"resolution={resolution}: must be divisible by {self.name}'s "
                                 f"downsampling factor {self.downsample}")
        side = resolution // self.downsample
        return (self.latent_channels, side, side)

    def checksum(self) -> str:
        """SHA-256 over parameter names and bytes (and scale/shift): identifies the weights."""
        digest = hashlib.sha256(f"{self.name}|{self.scale!r}|{self.shift!r}".encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "checksum": self.checksum(), "scale": self.scale, "shift": self.shift,
                "latent_channels": self.latent_channels, "downsample": self.downsample}


class IdentityProjector(Projector):
    """Pixel space: the "without projector" ablation. Latent = image mapped to [-1, 1]."""

    name = "identity"
    latent_channels = 3
    downsample = 1

    def __init__(self):
        super().__init__(scale=2.0, shift=0.5)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
