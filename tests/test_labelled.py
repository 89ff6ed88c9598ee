"""Labelled real data, the linear probe and the no-model references."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmd.config import PRESETS
from lmd.data.images import FashionMNIST, ImageFolder, ImageSourceError, image_source
from lmd.data.latents import build_store, probe_set
from lmd.data.memory import InMemoryLatents
from lmd.data.store import StoreError, read_labels, read_manifest, read_store
from lmd.evaluation import reconstruction_psnr
from lmd.experiments.references import fill_psnr
from lmd.model import build_model
from lmd.probe import linear_probe, raw_probe, ridge_probe
from lmd.projector import IdentityProjector, load_projector
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def fashion_store(tmp_path_factory) -> Path:
    """A small real Fashion-MNIST store in pixel space (identity projector: no encoding cost)."""
    root = tmp_path_factory.mktemp("fashion") / "store"
    build_store(root, "fashion-mnist", IdentityProjector(), 32, num_train=600, num_val=300, shard_size=256,
                progress=False)
    return root


def test_labels_survive_image_to_store_to_batch(fashion_store):
    source = FashionMNIST("train", 32, 600)
    manifest = read_manifest(fashion_store / "train")
    assert manifest["classes"] == list(FashionMNIST.classes) and manifest["source"]["dataset"] == "fashion-mnist"
    labels = read_labels(fashion_store / "train")
    assert torch.equal(labels, source.labels(0, 600))
    assert sorted(set(labels.tolist())) == list(range(10))  # all ten classes are among the first 600
    latents = read_store(fashion_store / "train")
    data = InMemoryLatents(latents, batch_size=32, seed=3, labels=labels)
    for step in (0, 7, 25):  # 25 is in the second epoch
        batch, batch_labels = data.labelled_batch(step)
        assert torch.equal(batch, data.batch(step))
        # Each item's label is its own image's: the identity store holds (image * 2 - 1) exactly in fp16.
        ids = data.batch_ids(step)
        assert torch.equal(batch_labels, source.labels(0, 600)[ids])
        images = torch.cat([source.images(i, i + 1) for i in ids.tolist()])
        assert torch.allclose((batch + 1) / 2, images, atol=2e-3)


def test_a_store_whose_label_column_is_out_of_range_is_refused_by_name(fashion_store, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmd.data.store import check_shard, validate_store

    copy = tmp_path / "train"
    shutil.copytree(fashion_store / "train", copy)
    shard = copy / "shard-00000.parquet"
    table = pq.read_table(shard)
    table = table.set_column(2, table.schema.field("label"), pa.array(np.full(table.num_rows, 12, dtype=np.int64)))
    pq.write_table(table, shard)
    with pytest.raises(StoreError, match=r"shard-00000.parquet: (bytes|sha256)"):  # the manifest notices first
        validate_store(copy)
    manifest = read_manifest(copy)
    with pytest.raises(StoreError, match=r"shard-00000.parquet: label: values outside \[0, 10\)"):
        check_shard(shard, manifest["shards"][0]["rows"], manifest["latent_shape"], manifest["dtype"], 0,
                    num_classes=len(manifest["classes"]))


def test_probe_is_deterministic_above_chance_and_at_chance_on_shuffled_labels(fashion_store):
    probe = probe_set(fashion_store, 600)
    assert probe is not None and probe.train.shape[0] == 600 and probe.val.shape[0] == 300
    raw = raw_probe(probe)
    assert raw == raw_probe(probe)  # closed form: the same to the last bit
    assert raw.accuracy > 0.6  # ten balanced classes: chance is 0.1
    torch.manual_seed(0)
    model = build_model(PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "latent_size": 32, "in_chans": 3,
                                                     "patch_size": 8}))
    encoder = linear_probe(model, probe)
    assert encoder == linear_probe(model, probe) and encoder.accuracy > 0.4
    shuffled = probe.train_labels[torch.randperm(600, generator=torch.Generator().manual_seed(1))]
    chance = ridge_probe(probe.train.flatten(1), shuffled, probe.val.flatten(1), probe.val_labels, 10)
    assert chance.accuracy < 0.2  # nothing to learn from shuffled labels: ~0.1


def test_ridge_probe_separates_what_is_linearly_separable():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    labels = torch.arange(300) % 3
    x = centres[labels] + torch.randn(300, 8, generator=g)
    result = ridge_probe(x[:200], labels[:200], x[200:], labels[200:], 3)
    assert result.accuracy > 0.95 and result.features == 8


@pytest.mark.parametrize("items", [300, 40])  # more items than features (primal form), fewer (dual form)
def test_ridge_weights_equal_the_direct_closed_form(items):
    from lmd.probe import _ridge_path

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(items, 50, generator=g).double(), torch.rand(items, 3, generator=g).double()
    lam = 0.1
    (w,) = _ridge_path(x, y, (lam,))
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = torch.linalg.solve(xc.T @ xc + lam * items * torch.eye(50, dtype=torch.float64), xc.T @ yc)
    assert torch.allclose(w[:-1], direct, atol=1e-8)
    assert torch.allclose(w[-1], y.mean(0) - x.mean(0) @ direct, atol=1e-8)  # the bias row


def test_unlabelled_stores_have_no_probe(tmp_path):
    root = tmp_path / "store"
    build_store(root, "bundled", IdentityProjector(), 64, num_train=8, num_val=4, progress=False)
    assert probe_set(root, 100) is None
    with pytest.raises(StoreError, match="classes: the store is unlabelled"):
        read_labels(root / "train")


def test_image_folder_class_subfolders_are_labels(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog", "fox")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (20, 16), (k * 80, i * 20, 0)).save(tmp_path / split / name / f"{i}.png")
    source = ImageFolder(tmp_path, "val", 16)
    labels = source.labels(0, 30)
    assert source.classes == ("cat", "dog", "fox") and sorted(labels.tolist()) == [0] * 10 + [1] * 10 + [2] * 10
    assert all(path.parent.name == source.classes[k] for path, k in zip(source.files, labels.tolist(), strict=True))
    # Items are in a fixed mixed order, so a prefix (a --limit, the probe's first items) is not one class
    # (sorted paths would give nine cats).
    assert len(set(ImageFolder(tmp_path, "val", 16, limit=9).labels(0, 9).tolist())) >= 2
    assert [p.name for p in ImageFolder(tmp_path, "val", 16).files] == [p.name for p in source.files]
    assert image_source(str(tmp_path), "train", 16).describe()["classes"] == ["cat", "dog", "fox"]
    (tmp_path / "val" / "wolf").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "val" / "wolf" / "0.png")
    with pytest.raises(ImageSourceError, match="class folder 'wolf' does not exist"):
        ImageFolder(tmp_path, "val", 16)


def test_held_out_images_that_changed_since_the_store_was_made_are_refused_by_name(tmp_path):
    from PIL import Image

    from lmd.data.latents import val_images

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(tmp_path / "images" / split / f"{i}.png")
    root = tmp_path / "store"
    build_store(root, str(tmp_path / "images"), IdentityProjector(), 16, num_train=None, num_val=None,
                progress=False)
    assert val_images(root, 4).shape == (4, 3, 16, 16)
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "val" / "0a.png")  # sorts second: shifts the images
    with pytest.raises(StoreError, match=r"val/manifest.json: source: the held-out images are no longer.*files_sha256"):
        val_images(root, 4)


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    env = {**os.environ, "LMD_FASHION_MNIST": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "lmd.cli", "precompute", "--dataset", "fashion-mnist", "--projector",
                           "identity", "--resolution", "32", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "train-images-idx3-ubyte.gz: Fashion-MNIST is not installed" in line and ".ci/datasets" in line
    assert "apt-get install dataset-fashion-mnist" in line


def test_a_truncated_idx_file_is_named(tmp_path):
    from lmd.data.images import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(ImageSourceError, match="truncated"):
        read_idx(path, 3)


def test_fill_reference_matches_a_direct_computation():
    from lmd.evaluation import PSNR_SEED

    flat = torch.full((4, 3, 32, 32), 0.3)
    assert fill_psnr(flat, 8, 0.75) == pytest.approx(100.0)  # a flat image is its visible pixels' mean: PSNR capped
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(5, 16, generator=torch.Generator().manual_seed(PSNR_SEED))  # the evaluation's first chunk
    expected = []
    for image, order in zip(images, noise.argsort(dim=1), strict=True):
        visible = order[:4].tolist()  # 16 patches of 8 px at ratio 0.75: 4 stay visible
        cells = [(k // 4, k % 4) for k in range(16)]
        colour = torch.stack([image[:, r * 8:r * 8 + 8, c * 8:c * 8 + 8] for r, c in (cells[k] for k in visible)])
        colour = colour.mean(dim=(0, 2, 3))  # [3]
        filled = image.clone()
        for k in set(range(16)) - set(visible):
            r, c = cells[k]
            filled[:, r * 8:r * 8 + 8, c * 8:c * 8 + 8] = colour[:, None, None]
        expected.append(10 * torch.log10(1 / (filled - image).pow(2).mean()))
    assert fill_psnr(images, 8, 0.75) == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_the_evaluation_hides_the_patches_the_fill_reference_fills():
    """A 'model' whose every prediction is grey scores exactly grey pasted into the fill's masked patches."""
    from lmd.evaluation import PSNR_SEED
    from lmd.masking import num_visible, random_masking
    from lmd.model import patchify, unpatchify
    from lmd.projector.quality import psnr

    cfg = tiny_config(**{"model.latent_size": 32, "model.in_chans": 3, "model.patch_size": 8})
    model = build_model(cfg.model)
    with torch.no_grad():  # every predicted patch is latent 0, which the identity projector decodes to 0.5
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.zero_()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    proj = IdentityProjector()
    model_psnr = reconstruction_psnr(model, proj, proj.encode(images), images, 0.75)
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(PSNR_SEED))
    patches = patchify(images, 8)
    _, mask, _ = random_masking(patches, num_visible(16, 0.75), noise)
    pasted = unpatchify(torch.where(mask.bool()[..., None], torch.full_like(patches, 0.5), patches), 8, 3)
    assert model_psnr == pytest.approx(psnr(images, pasted).mean().item(), abs=1e-3)


def test_probe_command_reports_the_probe_and_its_references(tmp_path, fashion_store):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmd.cli"]
    base = ["--preset", "tiny", "--latents", str(fashion_store), "--projector", "identity", "--resolution", "32",
            "--patch-size", "8", "--batch-size", "32", "--num-train", "600", "--num-val", "300", "--steps", "4",
            "--eval-every", "4", "--num-probe", "300", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run([*cmd, "train", *base, "--run-dir", str(run_dir)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0.1 < rows[-1]["val_probe_acc"] <= 1.0 and rows[-1]["train_flops"] > 0
    probe = subprocess.run([*cmd, "probe", str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    out = json.loads(probe.stdout)
    assert out["step"] == 4 and out["probe_items"] == 300 and out["heldout_items"] == 300
    # The command and the training run's last evaluation probe the same weights on the same items.
    assert out["val_probe_acc"] == pytest.approx(rows[-1]["val_probe_acc"])
    assert 0.5 < out["raw_input_probe_acc"] <= 1.0 and 0.1 < out["random_encoder_probe_acc"] <= 1.0
    bad = subprocess.run([*cmd, "probe", str(tmp_path / "nothing")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "nothing" in bad.stderr


def test_shipped_fashion_projector_meets_its_card():
    proj = load_projector("lmd-f8c4-fmnist")
    heldout = FashionMNIST("val", 32, 256)
    from lmd.projector.quality import psnr

    with torch.no_grad():
        value = psnr(heldout.images(0, 256), proj.decode(proj.encode(heldout.images(0, 256)))).mean().item()
    assert value >= 22.0, f"lmd-f8c4-fmnist held-out PSNR {value:.2f} dB fell below 22 dB"


def test_asking_a_digits_split_for_more_items_than_it_holds_is_refused_by_name():
    with pytest.raises(ImageSourceError, match=r"^fashion-mnist val: 10001 items asked, the split has 10000$"):
        FashionMNIST("val", 32, limit=10_001)


def test_precompute_of_fashion_mnist_defaults_to_its_own_projector_at_its_native_size(tmp_path):
    # `lmd precompute --dataset fashion-mnist` encodes with the projector `lmd train --dataset fashion-mnist` uses, at
    # the images' own 32 px, as the experiments do (it used to be the photo projector at 128 px, a 16x larger store).
    out = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "lmd.cli", "precompute", "--dataset", "fashion-mnist", "--limit", "32",
                           "--num-val", "16", "--encoders", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_manifest(out / "train")
    assert manifest["projector"]["name"] == "lmd-f8c4-fmnist", manifest["projector"]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["source"]["resolution"] == 32, manifest
