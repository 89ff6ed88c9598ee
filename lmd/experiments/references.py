"""The references every learned result is shown against: no-model baselines and ceilings.

Computed once per experiment by its driver, on the same held-out items, masks and probe split as
the trials' own evaluations (docs/DESIGN.md, "Quality metrics"):

- `fill`: reconstruction PSNR when every masked patch is the mean colour of that image's visible
  pixels, at the variant's own patch grid (in pixels) and the evaluation's masks (`PSNR_SEED`
  noise, `mask.eval_ratio`). No model: a learned variant that does not beat it has learnt nothing
  useful about reconstruction.
- `ceiling`: PSNR of decoding the stored latents with nothing masked (the projector's own error);
  no model on those latents can do better. Pixel space stores fp16 pixels: its ceiling is the
  rounding error only.
- `raw_probe`: the linear probe on the flattened inputs (raw pixels for pixel variants, raw latents
  for latent ones).
- `random_probe`: the linear probe on a randomly initialised encoder of the variant's preset and
  geometry, initialised exactly as the trial of the same seed starts, over the experiment's seeds.

One record per (reference, variant): `{"reference", "variant", "metric", "mean", "ci95", "n"}`.
Variants that share a store and geometry share the computation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from lmd.config import LATENT_FACTOR, TrainConfig
from lmd.evaluation import PSNR_SEED, projector_ceiling_psnr
from lmd.experiments.results import interval
from lmd.masking import num_visible, random_masking
from lmd.model import build_model, patchify, unpatchify
from lmd.probe import linear_probe, raw_probe
from lmd.projector.quality import psnr

log = logging.getLogger(__name__)

REFERENCE_METRIC = {"fill": "val_psnr", "ceiling": "val_psnr", "raw_probe": "val_probe_acc",
                    "random_probe": "val_probe_acc"}


@torch.no_grad()
def fill_psnr(images: torch.Tensor, patch_px: int, ratio: float, batch_size: int = 32) -> float:
    """Mean per-image PSNR of the mean-of-visible fill. images: [N, 3, R, R] in [0, 1].

    Masks are drawn exactly as `lmd.evaluation.reconstruction_psnr` draws them on the CPU (same seed per
    chunk of `batch_size`, same token count), so the fill and the model hide the same patches.
    """
    side = images.shape[-1]
    if side % patch_px:
        raise ValueError(f"patch of {patch_px} px does not tile {side} px images")
    length = (side // patch_px) ** 2
    keep = num_visible(length, ratio)
    values = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float()
        n = x.shape[0]
        gen = torch.Generator().manual_seed(PSNR_SEED + i)
        noise = torch.rand(n, length, generator=gen)
        patches = patchify(x, patch_px)  # [n, L, p*p*3]
        _, mask, _ = random_masking(patches, keep, noise)  # mask: [n, L], 1 = masked
        pixels = patches.reshape(n, length, patch_px * patch_px, 3)  # channel-last, as patchify lays it out
        visible = (1.0 - mask)[:, :, None, None]  # [n, L, 1, 1]
        colour = (pixels * visible).sum(dim=(1, 2)) / (visible.sum(dim=(1, 2)) * patch_px * patch_px)  # [n, 3]
        filled = torch.where(mask.bool()[:, :, None, None], colour[:, None, None, :], pixels)
        values.append(psnr(x, unpatchify(filled.reshape(n, length, -1), patch_px, 3)))
    return torch.cat(values).mean().item()


def patch_pixels(cfg: TrainConfig) -> int:
    """A variant's patch side in image pixels (a latent patch covers LATENT_FACTOR times more)."""
    pixel_space = cfg.model.in_chans == 3 and cfg.model.latent_size == cfg.data.resolution
    return cfg.model.patch_size * (1 if pixel_space else LATENT_FACTOR)


def _record(reference: str, variant: str, values: Sequence[float]) -> dict[str, Any]:
    mean, half = interval(pd.Series(list(values), dtype=float))
    return {"reference": reference, "variant": variant, "metric": REFERENCE_METRIC[reference], "mean": mean,
            "ci95": 0.0 if len(values) == 1 else half, "n": len(values)}


def compute_references(configs: dict[str, TrainConfig], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """References for each variant (name -> its seed-0 config) over `seeds`. Builds nothing: stores must exist."""
    from lmd.data.latents import PSNR_IMAGES, heldout_slice, probe_set, resolve_store, val_images
    from lmd.data.store import read_manifest, read_store

    cache: dict[Any, list[float]] = {}
    records = []
    for variant, cfg in configs.items():
        root, projector = resolve_store(cfg, progress=False, verify_checksums=False)  # hashed by the driver
        part = heldout_slice(read_manifest(root / "val")["count"], cfg.data.heldout)  # the items the trials score
        val = read_store(root / "val", validate=False)[part]
        images = val_images(root, min(PSNR_IMAGES, val.shape[0]), start=part.start)
        where = (str(root), cfg.data.heldout)
        if images is not None:
            key = ("fill", patch_pixels(cfg), cfg.data.resolution, where, cfg.mask.eval_ratio)
            if key not in cache:
                cache[key] = [fill_psnr(images, patch_pixels(cfg), cfg.mask.eval_ratio)]
            records.append(_record("fill", variant, cache[key]))
            key = ("ceiling", where)
            if key not in cache:
                cache[key] = [projector_ceiling_psnr(projector, val[:images.shape[0]], images)]
            records.append(_record("ceiling", variant, cache[key]))
        probe = probe_set(root, cfg.data.num_probe, val=val, heldout=cfg.data.heldout)
        if probe is None:
            continue
        key = ("raw_probe", where, cfg.data.num_probe)
        if key not in cache:
            cache[key] = [raw_probe(probe).accuracy]
        records.append(_record("raw_probe", variant, cache[key]))
        key = ("random_probe", where, cfg.data.num_probe, json.dumps(cfg.to_dict()["model"], sort_keys=True))
        if key not in cache:
            accuracies = []
            for seed in seeds:
                torch.manual_seed(seed)  # as the engine initialises the trial of this seed
                accuracies.append(linear_probe(build_model(cfg.model), probe).accuracy)
            cache[key] = accuracies
        records.append(_record("random_probe", variant, cache[key]))
        log.info("references of %s done", variant)
    return records

