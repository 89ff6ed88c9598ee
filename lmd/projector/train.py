"""Train the project's own f8c4 projectors (`lmd projector-train`): on the bundled photos
(`lmd-f8c4`, the default) or on a dataset's training split (`lmd-f8c4-fmnist` on Fashion-MNIST).

Why our own: no pip package ships SD-VAE / TAESD weights and these machines cannot reach a model
hub, so the default projector is made here, reproducibly (fixed seed, bundled photos only), and
its weights are committed with a model card. Architecture: TAESD layout (see taesd.py) with a
narrow encoder (so encoding the default dataset on 2 CPU cores stays under 2 minutes) and the
official-width decoder (reconstruction quality). Loss: pixel MSE, which is what PSNR measures.

Crops are drawn on the fly from the training photos, alternating 128 px and 64 px batches so the
fully convolutional model is good at both resolutions the project uses. After training, the
latent scale/shift are fitted on training crops (unit variance for the transformer) and the
held-out PSNR at 64 and 128 px is measured on photos never seen in training. With `dataset` set
to a dataset name (e.g. fashion-mnist) batches are random training items at the first of
`resolutions` with random horizontal flips (rotations and channel shuffles would make
greyscale garments something they are not), and the held-out PSNR is measured on the dataset's
held-out split, which the projector never sees.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmd.data.images import HELDOUT, BundledPhotos, ImageSource, image_source
from lmd.io import atomic_path, sha256_file, write_json_atomic
from lmd.optim import adamw, set_lr, warmup_cosine
from lmd.projector.loaders import TAESDProjector
from lmd.projector.quality import heldout_psnr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectorTrainConfig:
    steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 500
    encoder_width: int = 32
    decoder_width: int = 64
    latent_channels: int = 4
    resolutions: tuple[int, ...] = (128, 64)  # alternated step by step
    seed: int = 0
    max_minutes: float = 0.0  # 0 = no limit; otherwise stop early (the card records the steps done)
    eval_crops: int = 256
    # Extra augmentation (random 90-degree rotations and RGB channel permutations) on top of the
    # crops' flips and rescales: 25 training photos are few, and the held-out gap is the limit.
    augment: bool = True
    init: str = ""  # start from these weights (a .safetensors of this project, or lmd-f8c4), e.g. to fine-tune
    dataset: str = "bundled"  # or a dataset's training split: fashion-mnist, mnist, a labelled folder
    name: str = "lmd-f8c4"  # the projector's name in its file (what stores and manifests record)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "encoder_width", "decoder_width", "latent_channels", "eval_crops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"projector.{name}={getattr(self, name)!r}: must be > 0")
        if any(r % 8 for r in self.resolutions):
            raise ValueError(f"projector.resolutions={self.resolutions!r}: each must be divisible by 8")


def _lr(step: int, cfg: ProjectorTrainConfig, elapsed_s: float = 0.0) -> float:
    """Warm-up then cosine decay, ending early under `max_minutes` (whichever of steps or time runs out first)."""
    floor = elapsed_s / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, progress_floor=floor)


@torch.no_grad()
def fit_scale_shift(proj: TAESDProjector, device: torch.device, num: int = 512, seed: int = 1,
                    source: ImageSource | None = None) -> tuple[float, float]:
    """Scalar shift/scale that give the training latents zero mean and unit variance."""
    source = source or BundledPhotos("train", 128, num, seed=seed)
    num = min(num, len(source))
    raw = torch.cat([proj.encode_raw(source.images(i, min(num, i + 64)).to(device)) for i in range(0, num, 64)])
    return 1.0 / raw.float().std().item(), raw.float().mean().item()


class DatasetBatches:
    """Random training items of a dataset (a fixed permutation per epoch, seeded), randomly h-flipped."""

    def __init__(self, source: ImageSource, batch_size: int, seed: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.per_epoch = len(source) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"projector.batch_size={batch_size}: larger than the {len(source)} training items")

    def images(self, step: int, device: torch.device) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        ids = torch.randperm(len(self.source), generator=g)[k * self.batch_size:(k + 1) * self.batch_size]
        x = torch.cat([self.source.images(i, i + 1) for i in ids.tolist()])
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        return x.to(device)


@torch.no_grad()
def dataset_heldout_psnr(proj: TAESDProjector, source: ImageSource, num: int, device: torch.device) -> float:
    """Mean per-image PSNR of encode -> decode on the first `num` held-out items of a dataset."""
    from lmd.projector.quality import psnr

    num = min(num, len(source))
    values = [psnr(x, proj.decode(proj.encode(x))) for x in
              (source.images(i, min(num, i + 64)).to(device) for i in range(0, num, 64))]
    return torch.cat(values).mean().item()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random rot90 and channel permutation. images: [N, 3, R, R]."""
    out = torch.empty_like(images)
    rots = torch.randint(4, (images.shape[0],), generator=generator).tolist()
    for i, k in enumerate(rots):
        perm = torch.randperm(3, generator=generator).to(images.device)
        out[i] = torch.rot90(images[i], k, dims=(1, 2))[perm]
    return out


def train_projector(cfg: ProjectorTrainConfig, out: Path, device: torch.device) -> dict:
    """Train, fit scale/shift, evaluate on held-out photos, and write `out` (.safetensors) + its card."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    proj = TAESDProjector(cfg.latent_channels, cfg.encoder_width, cfg.decoder_width, name=cfg.name)
    if cfg.init:
        from lmd.projector import BUNDLED_WEIGHTS, bundled_weights_path

        start_from = TAESDProjector.load(bundled_weights_path(cfg.init) if cfg.init in BUNDLED_WEIGHTS else cfg.init)
        proj.encoder.load_state_dict(start_from.encoder.state_dict())
        proj.decoder.load_state_dict(start_from.decoder.state_dict())
        prior = start_from.card
    proj = proj.to(device)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    proj = proj.to(memory_format=torch.channels_last)
    opt = adamw(proj.parameters(), device, lr=cfg.lr, betas=(0.9, 0.99))
    amp = device.type == "cuda"
    on_photos = cfg.dataset == "bundled"
    if on_photos:
        sources = {r: BundledPhotos("train", r, num=cfg.steps * cfg.batch_size, seed=cfg.seed) for r in cfg.resolutions}
    else:
        batches = DatasetBatches(image_source(cfg.dataset, "train", cfg.resolutions[0]), cfg.batch_size, cfg.seed)
    start, done, recent = time.perf_counter(), 0, []
    for step in range(cfg.steps):
        if on_photos:
            res = cfg.resolutions[step % len(cfg.resolutions)]
            first = step * cfg.batch_size
            images = sources[res].images(first, first + cfg.batch_size, device=device)
            images = augment(images, aug_gen) if cfg.augment else images
        else:
            images = batches.images(step, device)
        images = images.contiguous(memory_format=torch.channels_last)
        lr = _lr(step, cfg, time.perf_counter() - start)
        set_lr(opt, lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon = proj.decode_raw(proj.encode_raw(images))
        loss = F.mse_loss(recon.float(), images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        recent.append(loss.detach())
        done = step + 1
        if done % 250 == 0 or done == cfg.steps:
            mse = torch.stack(recent).mean().item()
            recent.clear()
            log.info("step %d/%d  train mse %.5f (~%.2f dB)  lr %.2e  %.0fs", done, cfg.steps, mse,
                     -10 * math.log10(max(mse, 1e-12)), lr, time.perf_counter() - start)
            if not math.isfinite(mse):
                raise RuntimeError(f"projector training diverged at step {done}; lower --lr")
        if cfg.max_minutes and time.perf_counter() - start > 60 * cfg.max_minutes:
            log.warning("time limit of %.1f min reached at step %d of %d", cfg.max_minutes, done, cfg.steps)
            break
    seconds = time.perf_counter() - start

    proj = proj.float().to(memory_format=torch.contiguous_format).eval()
    if on_photos:
        proj.scale, proj.shift = fit_scale_shift(proj, device)
        quality = {f"heldout_psnr_{r}": round(heldout_psnr(proj, r, cfg.eval_crops, device=device), 3)
                   for r in (64, 128)}
        data = {"train_photos": BundledPhotos("train", 128, 1).photos, "heldout_photos": sorted(HELDOUT)}
    else:
        res = cfg.resolutions[0]
        proj.scale, proj.shift = fit_scale_shift(proj, device, source=batches.source)
        heldout = image_source(cfg.dataset, "val", res)
        quality = {f"heldout_psnr_{res}": round(dataset_heldout_psnr(proj, heldout, cfg.eval_crops, device), 3)}
        data = {"train_data": batches.source.describe(), "heldout_data": heldout.describe()}
    card = {
        "config": asdict(cfg), "steps_done": done, "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, **data, "scale": proj.scale, "shift": proj.shift,
        "params": sum(p.numel() for p in proj.parameters()), **quality,
    }
    if cfg.init:
        card["initialised_from"] = prior
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        proj.cpu().save(tmp, card)
    out.chmod(0o644)  # safetensors creates files owner-only; the weights ship in the package
    # The file cannot hold its own hash: the card beside it does, and loading a shipped projector checks it.
    write_json_atomic(out.with_suffix(".card.json"), {**card, "weights_sha256": sha256_file(out)})
    log.info("wrote %s: held-out PSNR %s", out, quality)
    return card
