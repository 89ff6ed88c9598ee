"""Image sources: bundled photos split by photo, deterministic crops, image folders, bad files named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmd.data.images import HELDOUT, PHOTOS, BundledPhotos, ImageFolder, ImageSourceError, image_source


def test_every_bundled_photo_loads_as_rgb():
    train, val = BundledPhotos("train", 64, 1), BundledPhotos("val", 64, 1)
    assert len(train.photos) + len(val.photos) == len(PHOTOS) == 32
    for i in range(64):  # crops touch many photos; any missing file raises
        assert train.image(i).shape == (3, 64, 64)


def test_splits_are_disjoint_by_source_photo():
    train, val = BundledPhotos("train", 64, 400), BundledPhotos("val", 64, 400)
    train_used = {train.crop_params(i)[0] for i in range(400)}
    val_used = {val.crop_params(i)[0] for i in range(400)}
    assert not train_used & val_used
    assert val_used == set(HELDOUT)
    assert {"motorcycle_left", "motorcycle_right"} <= train_used  # a stereo pair never straddles splits


def test_crops_are_deterministic_in_seed_and_index_and_within_range():
    a, b, c = BundledPhotos("train", 64, 16, seed=3), BundledPhotos("train", 64, 16, seed=3), BundledPhotos(
        "train", 64, 16, seed=4)
    assert torch.equal(a.images(0, 16), b.images(0, 16))
    assert not torch.equal(a.images(0, 16), c.images(0, 16))
    assert torch.equal(a.images(5, 9), a.images(0, 16)[5:9])  # random access equals sequential
    x = a.images(0, 16)
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


def test_image_folder_uses_train_and_val_subfolders(tmp_path):
    _write_images(tmp_path / "train" / "cls", 5)
    _write_images(tmp_path / "val" / "cls", 2)
    train, val = ImageFolder(tmp_path, "train", 32), ImageFolder(tmp_path, "val", 32)
    assert (len(train), len(val)) == (5, 2)
    assert train.images(0, 5).shape == (5, 3, 32, 32)


def test_image_folder_without_splits_holds_out_a_fixed_tenth(tmp_path):
    _write_images(tmp_path, 60)
    train, val = ImageFolder(tmp_path, "train", 16), ImageFolder(tmp_path, "val", 16)
    assert len(train) + len(val) == 60 and 1 <= len(val) <= 15
    assert not set(train.files) & set(val.files)


def test_unreadable_image_is_named(tmp_path):
    _write_images(tmp_path / "train", 1)
    _write_images(tmp_path / "val", 1)
    (tmp_path / "train" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageSourceError, match=r"broken\.jpg: not a readable image"):
        ImageFolder(tmp_path, "train", 16).images(0, 2)


def test_unknown_dataset_or_empty_folder_is_named(tmp_path):
    with pytest.raises(ImageSourceError, match="not a directory of images"):
        image_source(str(tmp_path / "nope"), "train", 64)
    with pytest.raises(ImageSourceError, match="no images"):
        image_source(str(tmp_path), "train", 64)


def test_a_decompression_bomb_is_one_error_naming_the_file(tmp_path, monkeypatch):
    from lmd.data.images import load_rgb

    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels is > 2x the limit: PIL refuses it
    with pytest.raises(ImageSourceError, match=f"{path}: not a readable image"):
        load_rgb(path)


def test_16_bit_greyscale_is_rescaled_by_its_depth_and_32_bit_is_refused_by_name(tmp_path):
    from lmd.data.images import load_rgb

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    pixels = load_rgb(tmp_path / "g16.png")
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
    # Clipping at 255 (PIL's convert) would make almost every pixel white; rescaled, the ramp keeps its range.
    assert (pixels == 255).float().mean() < 0.01 and abs(pixels.float().mean().item() - 127.5) < 1.0
    assert torch.equal(pixels[0], torch.from_numpy(np.round(ramp / 65535 * 255).astype(np.uint8)))
    Image.fromarray(ramp.astype(np.int32) * 1000).save(tmp_path / "g32.tif")
    with pytest.raises(ImageSourceError, match=r"g32.tif: a 32-bit integer greyscale image"):
        load_rgb(tmp_path / "g32.tif")
