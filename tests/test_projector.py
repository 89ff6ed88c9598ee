"""Projectors: shapes, official TAESD key layout, SD-VAE from a local dir, and the shipped weights' quality."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lmd.projector import IdentityProjector, ProjectorError, TAESDProjector, load_projector
from lmd.projector.quality import heldout_psnr, psnr
from lmd.projector.taesd import taesd_decoder, taesd_encoder


def test_identity_round_trip_is_exact_and_pixel_shaped():
    proj = load_projector("identity")
    images = torch.rand(2, 3, 32, 32)
    latents = proj.encode(images)
    assert latents.shape == (2, 3, 32, 32) and latents.min() >= -1 and latents.max() <= 1
    assert torch.allclose(proj.decode(latents), images, atol=1e-6)
    assert isinstance(proj, IdentityProjector) and proj.latent_shape(64) == (3, 64, 64)


@pytest.mark.parametrize("resolution", [64, 128])
def test_bundled_projector_shapes(resolution):
    proj = load_projector("lmd-f8c4")
    latents = proj.encode(torch.rand(2, 3, resolution, resolution))
    assert latents.shape == (2, 4, resolution // 8, resolution // 8)
    assert proj.decode(latents).shape == (2, 3, resolution, resolution)
    assert proj.latent_shape(resolution) == (4, resolution // 8, resolution // 8)


def test_resolution_must_divide_by_the_downsampling_factor():
    with pytest.raises(ProjectorError, match="resolution=100: must be divisible by lmd-f8c4's downsampling factor 8"):
        load_projector("lmd-f8c4").latent_shape(100)


def _official_layout_files(tmp_path, fmt: str):
    """Write encoder/decoder state dicts exactly as the official TAESD files lay them out."""
    torch.manual_seed(0)
    enc, dec = taesd_encoder(4, 64), taesd_decoder(4, 64)
    enc_sd, dec_sd = enc.state_dict(), dec.state_dict()
    assert "0.weight" in enc_sd and "1.conv.0.weight" in enc_sd and "14.weight" in enc_sd
    assert "1.weight" in dec_sd and "3.conv.4.weight" in dec_sd and "19.weight" in dec_sd
    for name, sd in (("taesd_encoder", enc_sd), ("taesd_decoder", dec_sd)):
        if fmt == "pth":
            torch.save(sd, tmp_path / f"{name}.pth")
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
    return enc, dec


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_official_taesd_layout_loads_without_key_remapping(tmp_path, fmt):
    enc, dec = _official_layout_files(tmp_path, fmt)
    proj = load_projector(f"taesd:{tmp_path}")
    assert isinstance(proj, TAESDProjector) and proj.width == 64
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(proj.encode(images), enc(images))
        z = torch.randn(1, 4, 8, 8)
        assert torch.equal(proj.decode(z), dec(z).clamp(0, 1))
    assert load_projector(str(tmp_path)).checksum() == proj.checksum()  # bare directory works too


def test_taesd_file_with_foreign_keys_is_named(tmp_path):
    _official_layout_files(tmp_path, "pth")
    sd = torch.load(tmp_path / "taesd_decoder.pth", weights_only=True)
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "taesd_decoder.pth")
    with pytest.raises(ProjectorError, match=r"taesd_decoder\.pth: not a TAESD-layout state dict.*extra\.weight"):
        load_projector(f"taesd:{tmp_path}")


def test_unknown_projector_spec_is_named(tmp_path):
    with pytest.raises(ProjectorError, match="projector 'nope': not a known name"):
        load_projector("nope")
    with pytest.raises(ProjectorError, match="no taesd_encoder"):
        load_projector(f"taesd:{tmp_path}")


def test_own_format_round_trips_weights_and_card(tmp_path):
    torch.manual_seed(1)
    proj = TAESDProjector(4, width=8, decoder_width=16, scale=2.5, shift=0.1, name="mine")
    proj.save(tmp_path / "p.safetensors", {"note": "test"})
    loaded = load_projector(str(tmp_path / "p.safetensors"))
    assert loaded.checksum() == proj.checksum() and loaded.card == {"note": "test"}
    assert (loaded.width, loaded.decoder_width, loaded.scale, loaded.shift) == (8, 16, 2.5, 0.1)


def test_checksum_changes_with_weights_and_scale():
    a = TAESDProjector(4, width=8)
    b = TAESDProjector(4, width=8)
    b.load_state_dict(a.state_dict())
    assert a.checksum() == b.checksum()
    b.scale = 2.0
    assert a.checksum() != b.checksum()


def test_sd_vae_loads_from_a_local_directory(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    proj = load_projector(f"sdvae:{tmp_path / 'vae'}")
    assert (proj.downsample, proj.latent_channels, proj.scale, proj.shift) == (2, 4, 0.5, 0.0)
    images = torch.rand(2, 3, 16, 16)
    latents = proj.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        expected = vae.encode(images * 2 - 1).latent_dist.mode() * 0.5
    assert torch.allclose(latents, expected)
    assert proj.decode(latents).shape == (2, 3, 16, 16)


def test_sd_vae_directory_without_config_is_named(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(ProjectorError, match="no config.json"):
        load_projector(f"sdvae:{tmp_path / 'vae'}")


def test_psnr_of_known_error():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, abs=1e-4)
    # An exact reconstruction (a constant image's fill) is capped, so a mean over images stays finite.
    assert psnr(torch.cat([a, a]), torch.cat([a, a + 0.1])).tolist() == pytest.approx([100.0, 20.0], abs=1e-4)


# The shipped weights measure 23.03 dB (64 px) and 24.66 dB (128 px) on 256 held-out crops (MODEL_CARD.md).
# Here the first 48 of those crops (22.88 and 23.74 dB), with floors ~0.5 dB under those figures.
@pytest.mark.parametrize(("resolution", "floor"), [(64, 22.4), (128, 23.2)])
def test_bundled_weights_beat_the_psnr_floor_on_heldout_photos(resolution, floor):
    value = heldout_psnr(load_projector("lmd-f8c4"), resolution, num=48)
    assert value >= floor, f"held-out PSNR at {resolution}px regressed to {value:.2f} dB"


def test_shipped_weights_whose_bytes_differ_from_their_card_are_refused_by_name(tmp_path):
    import shutil

    from lmd.projector import ProjectorError, bundled_weights_path, check_bundled_weights

    for name in ("lmd-f8c4", "lmd-f8c4-fmnist"):
        check_bundled_weights(bundled_weights_path(name))  # as shipped: the card's hash matches
    weights = tmp_path / "lmd_f8c4.safetensors"
    shutil.copy(bundled_weights_path("lmd-f8c4"), weights)
    shutil.copy(bundled_weights_path("lmd-f8c4").with_suffix(".card.json"), tmp_path / "lmd_f8c4.card.json")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of a tensor: the file still parses and loads
    weights.write_bytes(bytes(data))
    with pytest.raises(ProjectorError, match=rf"^{re.escape(str(weights))}: sha256 .*, its card records"):
        check_bundled_weights(weights)
