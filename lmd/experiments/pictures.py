"""Reconstruction pictures for the dashboard, made once by the experiment driver from final checkpoints.

For each variant, the trial with the median final PSNR (the ablation: representative, not the best
seed) or the best one (the search: one per scheduler) is loaded from its verified checkpoint; a few
held-out images are masked with the PSNR evaluation's seed at ratio `mask.eval_ratio` (on the CPU:
the very masks of a CPU evaluation; a GPU evaluation draws its own from the CUDA generator) and
reconstructed through the variant's projector. The dashboard only reads the resulting
`pictures.parquet` (PNG bytes per picture): nothing re-runs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lmd.checkpoint import load_checkpoint
from lmd.config import TrainConfig
from lmd.evaluation import PSNR_SEED, reconstruct
from lmd.experiments.results import complete_trials, final_rows, trial_id_of
from lmd.io import atomic_path
from lmd.masking import num_visible, random_masking
from lmd.model import build_model
from lmd.projector.quality import psnr

log = logging.getLogger(__name__)

PICTURES_FILE = "pictures.parquet"
NUM_PICTURES = 4
MASK_GREY = 0.5


def representative_trials(table: pd.DataFrame, pick: str = "median", metric: str = "val_psnr") -> dict[str, str]:
    """variant -> trial_id of the trial whose final `metric` is the (lower) median (or the best) of that variant.

    Among the trials that trained to the end of their budget when a variant has any: a trial an early-stopping
    scheduler cut short ended at another budget, and its last value is not a final one."""
    final = final_rows(table, metric)
    done = set(complete_trials(table)[0]["trial_id"])
    chosen = {}
    for variant, group in final.groupby("variant"):
        full = group[group["trial_id"].isin(done)]
        ordered = (full if not full.empty else group).sort_values([metric, "trial_id"])
        chosen[str(variant)] = str(ordered["trial_id"].iloc[(len(ordered) - 1) // 2 if pick == "median" else -1])
    return chosen


def _png(image: torch.Tensor) -> bytes:
    """image: [3, H, W] in [0, 1] -> PNG bytes."""
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def checkpoint_pictures(ckpt_dir: Path, num: int = NUM_PICTURES) -> dict[str, Any]:
    """Originals, masked inputs and reconstructions of the first `num` held-out images: [num, 3, H, W] each."""
    from lmd.data.latents import resolve_store, val_images
    from lmd.data.store import read_store

    state, manifest = load_checkpoint(ckpt_dir)
    cfg = TrainConfig.from_dict(manifest["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    root, projector = resolve_store(cfg, progress=False)
    images = val_images(root, num)
    if images is None:
        raise ValueError(f"{root / 'val'}: the store's source images cannot be re-rendered")
    num = images.shape[0]
    latents = read_store(root / "val", validate=False)[:num]
    noise = torch.rand(num, cfg.model.num_patches, generator=torch.Generator().manual_seed(PSNR_SEED))
    ratio = cfg.mask.eval_ratio
    decoded = projector.cpu().decode(reconstruct(model, latents, ratio, noise)).clamp(0, 1)
    # The model's mask for this noise, without a second forward pass: [N, L], 1 = masked.
    tokens = noise.unsqueeze(-1)  # random_masking only needs [N, L, D] for its shapes
    _, mask, _ = random_masking(tokens, num_visible(cfg.model.num_patches, ratio), noise)
    grid = int(round(cfg.model.num_patches ** 0.5))
    cover = F.interpolate(mask.float().reshape(num, 1, grid, grid), size=images.shape[-2:], mode="nearest")
    masked = images * (1 - cover) + MASK_GREY * cover
    return {"original": images, "masked": masked, "reconstruction": decoded, "psnr": psnr(images, decoded),
            "ratio": ratio, "step": manifest["step"]}


def _checkpoint_path(result: Any) -> str | None:
    """A Tune result's last checkpoint: Tune's own (in-process trials) or the Train run's (multi-worker)."""
    if result.checkpoint is not None:
        return result.checkpoint.path
    return (result.metrics or {}).get("checkpoint_path")


def pictures_table(results: Any, table: pd.DataFrame, num: int = NUM_PICTURES, pick: str = "median",
                   metric: str = "val_psnr") -> pd.DataFrame:
    """One row per picture: variant, trial_id, seed, kind, index, psnr, png."""
    from ray import tune

    paths = {trial_id_of(r): _checkpoint_path(r) for r in results if r.path}
    rows = []
    for variant, trial_id in representative_trials(table, pick, metric).items():
        path = paths.get(trial_id)
        if path is None:
            log.warning("pictures: trial %s (%s) has no checkpoint; skipped", trial_id, variant)
            continue
        with tune.Checkpoint(path).as_directory() as local:
            pics = checkpoint_pictures(Path(local), num)
        seed = table.loc[table["trial_id"] == trial_id, "seed"].iloc[0]
        for kind in ("original", "masked", "reconstruction"):
            for i, image in enumerate(pics[kind]):
                rows.append({"variant": variant, "trial_id": trial_id, "seed": int(seed), "kind": kind, "index": i,
                             "step": int(pics["step"]), "mask_ratio": float(pics["ratio"]),
                             "psnr": float(pics["psnr"][i]) if kind == "reconstruction" else float("nan"),
                             "png": _png(image)})
    return pd.DataFrame(rows)


def write_pictures(results: Any, table: pd.DataFrame, experiment: Path, pick: str = "median",
                   metric: str = "val_psnr") -> Path | None:
    """Best effort: a failure here (e.g. a checkpoint on unreachable storage) must not lose the results."""
    try:
        pictures = pictures_table(results, table, pick=pick, metric=metric)
    except Exception as err:  # noqa: BLE001 - reported, and the dashboard says pictures are missing
        log.warning("pictures: not made (%s: %s)", type(err).__name__, err)
        print(f"pictures: not made ({type(err).__name__}: {err})")
        return None
    if pictures.empty:
        return None
    path = experiment / PICTURES_FILE
    with atomic_path(path) as tmp:
        pictures.to_parquet(tmp, index=False)
    return path
