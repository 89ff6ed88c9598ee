"""Reconstruction quality of a projector on held-out photos (PSNR in dB, images in [0, 1])."""

from __future__ import annotations

import torch

from lmd.data.images import BundledPhotos
from lmd.projector.base import Projector

HELDOUT_SEED = 7  # held-out crops are the same in every evaluation


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR [N] of images in [0, 1], at most 100 dB: an exact reconstruction (say, the fill of a
    constant image) would otherwise be +inf and make every mean it enters +inf."""
    mse = (reference.float() - estimate.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def heldout_psnr(projector: Projector, resolution: int, num: int = 128, batch_size: int = 32,
                 device: torch.device | str | None = None) -> float:
    """Mean per-image PSNR of encode -> decode on crops of photos never used for training."""
    photos = BundledPhotos("val", resolution, num, seed=HELDOUT_SEED)
    values = []
    for start in range(0, num, batch_size):
        images = photos.images(start, start + batch_size, device=device)
        values.append(psnr(images, projector.decode(projector.encode(images))))
    return torch.cat(values).mean().item()
