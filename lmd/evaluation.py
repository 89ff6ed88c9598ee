"""Image-space quality of a masked-latent model: decode (visible + predicted) patches, compare to images.

What makes latent and pixel variants comparable (docs/DESIGN.md, "Quality metrics"): the masked
MSE lives in each variant's own space, but PSNR of the decoded reconstruction against the
original held-out images is in one space for all. Latent variants decode through their projector;
pixel variants (identity projector) paste their visible patches back as they are. The projector's
own reconstruction PSNR (nothing masked) is the ceiling a latent variant can reach.
"""

from __future__ import annotations

import torch

from lmd.model import MaskedLatentTransformer, patchify, unpatchify
from lmd.projector.base import Projector
from lmd.projector.quality import psnr

PSNR_SEED = 20_240_202  # the masks of the PSNR evaluation, the same at every eval and in every run


@torch.no_grad()
def reconstruct(model: MaskedLatentTransformer, latents: torch.Tensor, ratio: float,
                noise: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, H, W] with their masked patches replaced by the model's predictions."""
    patches = patchify(latents, model.cfg.patch_size)  # [N, L, P]
    _, pred, mask = model(latents, ratio, noise)
    pred = pred.float()
    if model.cfg.norm_target:
        # Predictions are per-patch normalised. MAE's visualisation restores them with the hidden patch's own mean
        # and variance, which hands over part of the answer (all of a 4-value latent patch's level and spread);
        # here they get what the model could know: the average statistics of the image's visible patches.
        visible = (1.0 - mask.float()).unsqueeze(-1)  # [N, L, 1]
        count = visible.sum(1, keepdim=True).clamp(min=1.0)  # [N, 1, 1]
        mean = (patches.mean(-1, keepdim=True) * visible).sum(1, keepdim=True) / count
        var = (patches.var(-1, keepdim=True) * visible).sum(1, keepdim=True) / count
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    mixed = torch.where(mask.bool().unsqueeze(-1), pred, patches)
    return unpatchify(mixed, model.cfg.patch_size, model.cfg.in_chans)


@torch.no_grad()
def reconstruction_psnr(model: MaskedLatentTransformer, projector: Projector, latents: torch.Tensor,
                        images: torch.Tensor, ratio: float, batch_size: int = 32) -> float:
    """Mean per-image PSNR (dB) of decode(visible + predicted latents) against `images`, at `ratio`."""
    model.eval()
    device = next(model.parameters()).device
    # The masks are drawn on the CPU whatever the device, so they are the same on every machine and the
    # same as the no-model fill reference's (lmd.experiments.references); a CUDA generator draws others.
    gen = torch.Generator()
    values = []
    for i in range(0, latents.shape[0], batch_size):
        chunk = latents[i:i + batch_size].to(device)
        gen.manual_seed(PSNR_SEED + i)
        noise = torch.rand(chunk.shape[0], model.cfg.num_patches, generator=gen).to(device)
        decoded = projector.to(device).decode(reconstruct(model, chunk, ratio, noise))
        values.append(psnr(images[i:i + batch_size].to(device), decoded).cpu())
    return torch.cat(values).mean().item()


@torch.no_grad()
def projector_ceiling_psnr(projector: Projector, latents: torch.Tensor, images: torch.Tensor) -> float:
    """PSNR of decoding the stored latents unmasked: the best any model on these latents can do."""
    return psnr(images, projector.cpu().decode(latents.cpu())).mean().item()
