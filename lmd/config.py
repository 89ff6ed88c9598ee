"""Typed run configuration: the config sections, their presets and their validation at the edge.

Everything a run needs is one `TrainConfig` made of five frozen sections (model, mask, optim,
data, run); `ClusterConfig` says how to place it on Ray. Each section's `validate` range-checks its
fields, and any problem raises `ConfigError` whose message names the field and the offending value,
so the CLI can print one line instead of a traceback. Configs are built in one place,
`lmd.config_build.build_config`, from the preset (`PRESETS`), a YAML/JSON file and dotted overrides.

A field that is also a command-line flag is declared with `option` (lmd/options.py), next to its
default; `lmd train` builds its parser and its overrides from `cli_flags`, so each flag is written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmd.io import has_credentials, shown_uri
from lmd.options import option

SCHEDULERS = ("uniform", "piecewise", "cosine", "constant")
CREDENTIALS_REFUSED = ("credentials in the URI are refused (they would be saved with the run and shown in messages); "
                       "set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or use an instance "
                       "role")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes
DATASETS = ("fashion-mnist", "bundled", "mnist", "synthetic")  # or a directory of images
LOADERS = ("auto", "ray", "memory")
# Which held-out items a run is scored on: all of them, or one half. A search selects its configurations on the
# first half ("select") and scores its finalists on the second ("confirm"), which it never selected on.
HELDOUT_PARTS = ("all", "select", "confirm")
PIXEL_PROJECTORS = ("identity",)  # projectors that keep pixel space (f=1, 3 channels)
DEFAULT_PROJECTOR = "lmd-f8c4"  # the shipped photo projector
# The shipped projector made for a dataset: what `data.projector` defaults to when the dataset has one.
DATASET_PROJECTORS = {"fashion-mnist": "lmd-f8c4-fmnist"}
LATENT_FACTOR = 8  # presets describe f8 latents: latent_size * 8 = image resolution
# Seeds are at most 32 bits: NumPy takes no more, and the engine's per-step seeds (lmd.engine.step_seed)
# must stay within torch's int64 generator seed.
MAX_SEED = 2**32 - 1
# Items each split of a fixed dataset holds (train, held-out), checked before anything is built.
SOURCE_SIZES = {"fashion-mnist": (60_000, 10_000), "mnist": (60_000, 10_000)}
# Random crops of the bundled photos: more than this is hours of encoding for no new pixels (~30 photos).
MAX_BUNDLED_CROPS = 1_000_000
DEFAULT_PRESET = "tiny"


def dataset_projector(dataset: str) -> str:
    """The projector a dataset's latents are made with unless one is named: its own shipped one, else the photos'."""
    return DATASET_PROJECTORS.get(dataset, DEFAULT_PROJECTOR)


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field/file and value."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the masked latent transformer: a preset (`PRESETS`), then any field overridden.

    The field defaults are the official base_p4; `build_config` starts from the tiny preset unless told.
    """

    # Once built, informational: which registry entry this came from.
    preset: str = option("custom", "--preset", f"model preset (see `lmd presets`); default {DEFAULT_PRESET}")
    latent_size: int = option(28, "--latent-size", "latent grid side (overrides the preset)")  # 224 px / f8
    in_chans: int = option(4, "--in-chans", "latent channels (overrides the preset; 4 for f8c4, 3 in pixel space)")
    patch_size: int = option(4, "--patch-size", "patch side in latent pixels (overrides the preset)")
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    # Per-patch normalised targets (official "norm_pix"). Off by default: raw targets keep the
    # eval MSE (and decoded PSNR) comparable across latent and pixel variants without borrowing
    # the hidden patch's own statistics.
    norm_target: bool = option(False, "--norm-target", "per-patch normalised targets")

    @property
    def num_patches(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def validate(self) -> None:
        for name in ("latent_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            _require(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "must be > 0")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", self.mlp_ratio, "must be > 0")
        _require(self.embed_dim % self.num_heads == 0, "model.embed_dim", self.embed_dim,
                 f"must be divisible by model.num_heads={self.num_heads}")
        _require(self.decoder_embed_dim % self.decoder_num_heads == 0, "model.decoder_embed_dim",
                 self.decoder_embed_dim,
                 f"must be divisible by model.decoder_num_heads={self.decoder_num_heads}")
        _require(self.latent_size % self.patch_size == 0, "model.latent_size", self.latent_size,
                 f"must be divisible by model.patch_size={self.patch_size}")
        _require(self.num_patches >= 2, "model.patch_size", self.patch_size,
                 "leaves fewer than 2 patches: nothing to mask")
        # 2-D sin-cos position embeddings split the width in 4 (sin/cos x rows/cols).
        _require(self.embed_dim % 4 == 0, "model.embed_dim", self.embed_dim, "must be divisible by 4")
        _require(self.decoder_embed_dim % 4 == 0, "model.decoder_embed_dim", self.decoder_embed_dim,
                 "must be divisible by 4")


@dataclass(frozen=True)
class MaskConfig:
    """Mask-ratio schedule: ratio rises from `start` to `end` over `ramp` of the steps, then holds."""

    # No argparse `choices`: validate() checks them, so the message names the field (mask.scheduler).
    scheduler: str = option("cosine", "--scheduler", f"mask-ratio scheduler: {', '.join(SCHEDULERS)} (default "
                            "{default})")
    start: float = option(0.15, "--mask-start", "initial mask ratio (default {default})", "F")
    end: float = option(0.75, "--mask-end", "final mask ratio (default {default})", "F")
    ramp: float = option(2 / 3, "--mask-ramp", "fraction of steps to reach the end (default {default:.3g})", "F")
    eval_ratio: float = option(0.75, "--eval-ratio", "fixed ratio every variant is also evaluated at (default "
                               "{default})", "F")

    def validate(self) -> None:
        _require(self.scheduler in SCHEDULERS, "mask.scheduler", self.scheduler,
                 f"unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
        for name in ("start", "end", "eval_ratio"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"mask.{name}", value, "must be in [0, 1)")
        _require(self.end >= self.start, "mask.end", self.end, f"must be >= mask.start={self.start}")
        _require(0.0 < self.ramp <= 1.0, "mask.ramp", self.ramp, "must be in (0, 1]")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to `min_lr`."""

    lr: float = option(1e-3, "--lr", "peak learning rate (default {default})")
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95  # MAE's choice: steadier than 0.999 for masked-token pre-training
    warmup_steps: int = option(20, "--warmup-steps", "linear warm-up steps (default {default})")
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Where latents come from and how they are batched.

    `dataset` images are encoded by `projector` at `resolution` into a Parquet latent store
    (`latents`, or a cached default store built on first use), streamed by Ray Data (`loader=ray`)
    or held in memory (`loader=memory`); `auto` holds stores up to `memory_limit_mb` (decoded) in
    memory and streams larger ones. In memory, each epoch is one permutation of the store; streamed,
    each rank reads only its own lanes of the store (`lmd.data.lanes`: `stream_lanes` regions, each
    shuffled in windows of `stream_window` items), so the two loaders give different, equally
    deterministic orders. `synthetic` skips images and projector altogether.
    """

    dataset: str = option("bundled", "--dataset", "{default} (default), fashion-mnist, mnist, synthetic, or a "
                          "directory of images")
    # Default: the dataset's own shipped projector (DATASET_PROJECTORS), if any.
    projector: str = option(DEFAULT_PROJECTOR, "--projector", "{default} (default; fashion-mnist: lmd-f8c4-fmnist), "
                            "identity (pixel space), taesd:DIR, sdvae:DIR or a file")
    resolution: int = option(0, "--resolution", "image side in pixels (default: preset latent_size x 8)")  # 0: that
    # A store made by `lmd precompute` (with train/ and val/); "" = the cached default.
    latents: str = option("", "--latents", "store from `lmd precompute` (default: a cached one)", "DIR")
    loader: str = option("auto", "--loader", "auto (default: memory if it fits, else Ray Data), ray or memory")
    memory_limit_mb: int = 2048
    # Streamed order: the global batch takes batch_size / stream_lanes items from each lane; workers
    # share out the lanes (so --workers must divide stream_lanes) and the order does not depend on them.
    stream_lanes: int = option(8, "--stream-lanes", "streamed loader: store regions per batch (default {default})")
    # Items of one lane shuffled together: larger windows mix more shards and hold more memory per worker.
    stream_window: int = option(2048, "--stream-window", "streamed loader: items per lane shuffle window "
                                "(default {default})")
    batch_size: int = option(64, "--batch-size", "global batch size (default {default})")
    num_train: int = option(2048, "--num-train", "training images (crops for the bundled photos; default {default})")
    num_val: int = option(256, "--num-val", "held-out images (default {default})")
    # Labelled training items the linear probe is fit on (scored on the num_val held-out items) at
    # every evaluation; 0 turns the probe off. Unlabelled stores have no probe.
    num_probe: int = option(2048, "--num-probe", "labelled items the probe is fit on (0 = off; default {default})")
    heldout: str = "all"  # HELDOUT_PARTS: the held-out items evaluations score (lmd.data.latents.heldout_slice)

    def validate(self) -> None:
        _require(self.dataset in DATASETS or Path(self.dataset).is_dir(), "data.dataset", self.dataset,
                 f"neither one of {', '.join(DATASETS)} nor an existing directory of images")
        _require(self.loader in LOADERS, "data.loader", self.loader, f"choose one of {', '.join(LOADERS)}")
        _require(self.resolution >= 0 and self.resolution % LATENT_FACTOR == 0, "data.resolution", self.resolution,
                 f"must be a positive multiple of {LATENT_FACTOR}")
        # A URI (s3://...) is checked when the run opens it: that needs the network and credentials. It is saved
        # with the run (config.json, checkpoints), so it must not carry credentials.
        uri = "://" in self.latents and not self.latents.startswith("file://")
        _require(not has_credentials(self.latents), "data.latents", shown_uri(self.latents), CREDENTIALS_REFUSED)
        _require(not self.latents or uri or Path(self.latents.removeprefix("file://")).is_dir(), "data.latents",
                 self.latents, "no such directory (make one with `lmd precompute`)")
        _require(self.batch_size > 0, "data.batch_size", self.batch_size, "must be > 0")
        _require(self.stream_lanes > 0, "data.stream_lanes", self.stream_lanes, "must be > 0")
        _require(self.stream_window > 0, "data.stream_window", self.stream_window, "must be > 0")
        _require(self.loader != "ray" or self.batch_size % self.stream_lanes == 0, "data.batch_size",
                 self.batch_size, f"must be a multiple of data.stream_lanes={self.stream_lanes} with loader=ray "
                 "(each lane gives the same number of items to every batch)")
        _require(self.num_train >= self.batch_size, "data.num_train", self.num_train,
                 f"must be >= data.batch_size={self.batch_size}")
        _require(self.num_val > 0, "data.num_val", self.num_val, "must be > 0")
        _require(self.heldout in HELDOUT_PARTS, "data.heldout", self.heldout,
                 f"choose one of {', '.join(HELDOUT_PARTS)}")
        _require(self.heldout == "all" or self.num_val >= 2, "data.heldout", self.heldout,
                 f"needs data.num_val >= 2 to split the held-out items in halves (num_val={self.num_val})")
        _require(self.num_probe == 0 or self.num_probe >= 10, "data.num_probe", self.num_probe,
                 "must be 0 (no probe) or >= 10")


@dataclass(frozen=True)
class RunConfig:
    """Length, seed, logging, evaluation, checkpointing and device of one run."""

    steps: int = option(200, "--steps", "total optimisation steps (sets the schedules' length; default {default})")
    seed: int = option(0, "--seed", "random seed (default {default})")
    log_every: int = option(10, "--log-every", "steps between logged metrics (default {default})")
    eval_every: int = option(50, "--eval-every", "steps between evaluations (default {default})")
    # Equal-compute comparisons need evaluations at equal compute: a schedule's early (easy) steps cost more
    # FLOPs, so step-spaced evaluations would sample its curve at other FLOPs than a constant ratio's.
    evals: int = option(0, "--evals", "evaluate at this many equal fractions of the run's training FLOPs, each "
                        "also checkpointed (replaces --eval-every; a --ckpt-every checkpoint still evaluates, and "
                        "fractions that end in one step share it; default {default}: off)")
    ckpt_every: int = option(100, "--ckpt-every", "steps between checkpoints (default {default})")
    keep_last: int = option(3, "--keep-last", "checkpoints to keep (default {default})")
    device: str = option("auto", "--device", f"{', '.join(DEVICES)} (default {{default}})")
    precision: str = option("auto", "--precision", f"{', '.join(PRECISIONS)} (default {{default}}: bf16 autocast on "
                            "CUDA, fp32 on CPU)")
    compile: bool = option(False, "--compile", "torch.compile the model")
    compile_mode: str = option("default", "--compile-mode", f"with --compile: {', '.join(COMPILE_MODES)} (default "
                               "{default}; reduce-overhead replays CUDA graphs, one per visible-token count)")

    def validate(self) -> None:
        _require(self.steps > 0, "run.steps", self.steps, "must be > 0")
        _require(0 <= self.seed <= MAX_SEED, "run.seed", self.seed, f"must be in [0, {MAX_SEED}]")
        for name in ("log_every", "eval_every", "ckpt_every", "keep_last"):
            _require(getattr(self, name) > 0, f"run.{name}", getattr(self, name), "must be > 0")
        _require(0 <= self.evals <= self.steps, "run.evals", self.evals, f"must be in [0, run.steps={self.steps}]")
        _require(self.device in DEVICES, "run.device", self.device, f"choose one of {', '.join(DEVICES)}")
        _require(self.precision in PRECISIONS, "run.precision", self.precision,
                 f"choose one of {', '.join(PRECISIONS)}")
        _require(self.compile_mode in COMPILE_MODES, "run.compile_mode", self.compile_mode,
                 f"choose one of {', '.join(COMPILE_MODES)}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        for section in (self.model, self.mask, self.optim, self.data, self.run):
            section.validate()
        check_source_sizes(self.data.dataset, self.data.num_train, self.data.num_val)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Strictly typed construction from a nested dict (e.g. a checkpoint's saved config)."""
        # Imported here: lmd.config_build imports this module, so a top-level import would be circular.
        from lmd.config_build import build_config, flatten

        return build_config(overrides=flatten(raw), preset=None)


@dataclass(frozen=True)
class ClusterConfig:
    """How to place the run on Ray (validated here, at the edge, like TrainConfig)."""

    # Passing --workers is what selects Ray Train: without it `lmd train` is one process.
    workers: int = option(1, "--workers", "train with Ray Train on this many workers (default: one process)")
    gpus_per_worker: float = option(0.0, "--gpus-per-worker", "GPUs each worker reserves (default {default})")
    cpus_per_worker: float = option(1.0, "--cpus-per-worker", "CPUs each worker reserves (default {default})")
    storage: str = option("runs/ray", "--storage", "run storage shared by all nodes: a path or s3://bucket/prefix "
                          "(default {default})")
    name: str = option("", "--name", "run name (default lmd-<preset>-<scheduler>-s<seed>)")
    max_failures: int = option(2, "--max-failures", "worker failures to recover from (default {default})")
    spread: bool = option(False, "--spread", "place each worker on a different node")
    keep_best: bool = option(False, "--keep-best", "keep the checkpoints of lowest val_masked_mse_fixed, not the "
                             "newest")

    def validate(self, cfg: TrainConfig) -> None:
        check_name(self.name, "--name")
        if self.workers < 1:
            raise ConfigError(f"--workers={self.workers}: must be >= 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"--gpus-per-worker={self.gpus_per_worker} / cpus per worker {self.cpus_per_worker}: "
                              "must be >= 0 and > 0")
        if cfg.data.batch_size % self.workers:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size}: must be divisible by --workers={self.workers} "
                              "(each worker trains an equal slice of the global batch)")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures={self.max_failures}: must be >= 0")
        if has_credentials(self.storage):
            raise ConfigError(f"--storage={shown_uri(self.storage)}: {CREDENTIALS_REFUSED}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "mask": MaskConfig, "optim": OptimConfig,
                             "data": DataConfig, "run": RunConfig}

# Model presets (DiT-style registry; `lmd presets` lists them with size and cost). latent_size / in_chans
# describe the input (an f8c4 latent); override them for other resolutions or for pixel space.
PRESETS: dict[str, ModelConfig] = {
    # CPU unit tests: a forward/backward in milliseconds.
    "tiny": ModelConfig(preset="tiny", latent_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    # The ablation's default (Fashion-MNIST at 32 px): a 4x4x4 latent, 16 tokens of 4 values; in pixel
    # space MAE-style 4 px patches give 64 tokens (4x, as ViT-B/16 at 224 px has 4x LMD's 49).
    "mini_p1": ModelConfig(preset="mini_p1", latent_size=4, patch_size=1, embed_dim=128, depth=4, num_heads=4,
                           decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2),
    # CPU ablations in minutes: 64 tokens of a 16x16x4 latent (128 px images).
    "small": ModelConfig(preset="small", latent_size=16, patch_size=2, embed_dim=192, depth=6, num_heads=3,
                         decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # Official LMD: 224 px -> 28x28x4 latent, patch 4 -> 49 tokens of 64 values; ViT-B encoder.
    "base_p4": ModelConfig(preset="base_p4", latent_size=28, patch_size=4, embed_dim=768, depth=12,
                           num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    # ViT-L encoder on the same tokens.
    "large": ModelConfig(preset="large", latent_size=28, patch_size=4, embed_dim=1024, depth=24,
                         num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def check_source_sizes(dataset: str, num_train: int, num_val: int) -> None:
    """Refuse, before anything is built, more items than a split of the source holds (or a bundled crop count
    that would take days to encode)."""
    limits = SOURCE_SIZES.get(dataset) or ((MAX_BUNDLED_CROPS,) * 2 if dataset == "bundled" else None)
    if limits is None:  # a folder of images: its size is checked when it is read
        return
    for name, value, limit in (("data.num_train", num_train, limits[0]), ("data.num_val", num_val, limits[1])):
        what = "crops is the most the bundled photos are cut into" if dataset == "bundled" else \
            f"items is all the {dataset} split holds"
        _require(value <= limit, name, value, f"{limit} {what}")


def check_name(name: str, flag: str) -> None:
    """A run or experiment name is one path component: it must not climb out of, or into, the storage."""
    if name and (name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip()):
        raise ConfigError(f"{flag}={name!r}: must be one folder name (no '/', '\\', '..' or surrounding spaces)")


def _require(ok: bool, name: str, value: Any, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {reason}")
