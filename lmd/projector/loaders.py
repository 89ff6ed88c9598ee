"""Concrete projectors: TAESD files, the project's own pretrained f8c4 weights, and SD-VAE.

All load from local paths only (research clusters are often offline, and nothing here reaches a
model hub). Every failure names the file and what was wrong with it.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from lmd.projector.base import Projector, ProjectorError
from lmd.projector.taesd import taesd_decoder, taesd_encoder

OWN_FORMAT = "lmd-projector/1"
# Bounds on the architecture a weights file's metadata may ask for (the shipped ones: 4 channels, width 32-64):
# a hostile or corrupt file must not make the loader allocate petabytes.
MAX_LATENT_CHANNELS, MAX_WIDTH = 64, 1024


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from a .safetensors or a .pth/.pt file. A pickle is read with
    `weights_only=True`: tensors and plain containers only, never arbitrary objects or code."""
    if not path.is_file():
        raise ProjectorError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns before refusing a foreign pickle; the refusal says it all
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object, or the bytes are no pickle at all
        reasons = [line.strip() for line in str(err).splitlines() if "Unsupported" in line or "GLOBAL" in line]
        raise ProjectorError(f"{path}: refused by torch.load(weights_only=True): not a plain state dict of tensors"
                             f"{f' ({reasons[0]})' if reasons else ''}") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        detail = str(err).splitlines()[0] if str(err) else "empty or truncated"
        raise ProjectorError(f"{path}: cannot be read as a state dict ({type(err).__name__}: {detail})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ProjectorError(f"{path}: not a state dict (a mapping of names to tensors), but a "
                             f"{type(state).__name__}")
    return state


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ProjectorError(f"{path}: not a TAESD-layout state dict (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ProjectorError(f"{path}: shape mismatch ({str(err).splitlines()[-1].strip()})") from None


class TAESDProjector(Projector):
    """TAESD-layout encoder + decoder. Official TAESD latents are already in SD's scaled space."""

    name = "taesd"

    def __init__(self, latent_channels: int = 4, width: int = 64, decoder_width: int | None = None,
                 scale: float = 1.0, shift: float = 0.0, name: str | None = None):
        super().__init__(scale=scale, shift=shift)
        self.latent_channels = latent_channels
        self.width, self.decoder_width = width, decoder_width or width
        if name:
            self.name = name
        self.encoder = taesd_encoder(latent_channels, self.width)
        self.decoder = taesd_decoder(latent_channels, self.decoder_width)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    @classmethod
    def from_files(cls, encoder_path: str | Path, decoder_path: str | Path) -> TAESDProjector:
        """Official `taesd_encoder` / `taesd_decoder` files (.pth or .safetensors), no key remapping."""
        enc_path, dec_path = Path(encoder_path), Path(decoder_path)
        enc, dec = _load_state(enc_path), _load_state(dec_path)
        for path, state, key in ((enc_path, enc, "0.weight"), (dec_path, dec, "1.weight")):
            if key not in state:
                raise ProjectorError(f"{path}: not a TAESD-layout state dict (no {key!r})")
        width, latent_channels = enc["0.weight"].shape[0], dec["1.weight"].shape[1]
        proj = cls(latent_channels=latent_channels, width=width, decoder_width=dec["1.weight"].shape[0])
        _load_strict(proj.encoder, enc, enc_path)
        _load_strict(proj.decoder, dec, dec_path)
        return proj.eval()

    @classmethod
    def from_dir(cls, directory: str | Path) -> TAESDProjector:
        directory = Path(directory)
        found = {}
        for part in ("encoder", "decoder"):
            files = [directory / f"taesd_{part}{ext}" for ext in (".safetensors", ".pth")]
            found[part] = next((f for f in files if f.is_file()), None)
            if found[part] is None:
                raise ProjectorError(f"{directory}: no taesd_{part}.safetensors or taesd_{part}.pth")
        return cls.from_files(found["encoder"], found["decoder"])

    # ------------------------------------------------------------------ the project's own format
    def save(self, path: str | Path, card: dict[str, Any]) -> None:
        """One .safetensors file: encoder.* and decoder.* tensors, architecture and card in metadata."""
        tensors = {f"encoder.{k}": v.contiguous() for k, v in self.encoder.state_dict().items()}
        tensors.update({f"decoder.{k}": v.contiguous() for k, v in self.decoder.state_dict().items()})
        meta = {"format": OWN_FORMAT, "name": self.name, "latent_channels": str(self.latent_channels),
                "width": str(self.width), "decoder_width": str(self.decoder_width),
                "scale": repr(self.scale), "shift": repr(self.shift), "card": json.dumps(card, sort_keys=True)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> TAESDProjector:
        path = Path(path)
        if not path.is_file():
            raise ProjectorError(f"{path}: no such projector file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ProjectorError(f"{path}: not a readable .safetensors file ({err})") from None
        if meta.get("format") != OWN_FORMAT:
            raise ProjectorError(f"{path}: metadata format={meta.get('format')!r}, expected {OWN_FORMAT!r}")
        arch = _own_metadata(meta, path)
        try:
            card = json.loads(meta.get("card", "{}"))
        except json.JSONDecodeError as err:
            raise ProjectorError(f"{path}: metadata field card is not valid JSON ({err})") from None
        if not isinstance(card, dict):
            raise ProjectorError(f"{path}: metadata field card is not a JSON object")
        proj = cls(**arch)
        state = _load_state(path)
        for part, module in (("encoder", proj.encoder), ("decoder", proj.decoder)):
            sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            _load_strict(module, sub, path)
        proj.card = card
        return proj.eval()


def _own_metadata(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The architecture and scaling a project-format file declares, each checked before anything is built."""
    arch: dict[str, Any] = {}
    for key, cast in (("latent_channels", int), ("width", int), ("decoder_width", int), ("scale", float),
                      ("shift", float), ("name", str)):
        if key not in meta:
            raise ProjectorError(f"{path}: metadata field {key!r} missing")
        try:
            arch[key] = cast(meta[key])
        except ValueError:
            raise ProjectorError(f"{path}: metadata field {key}={meta[key]!r}: expected {cast.__name__}") from None
    bounds = {"latent_channels": MAX_LATENT_CHANNELS, "width": MAX_WIDTH, "decoder_width": MAX_WIDTH}
    for key, bound in bounds.items():
        if not 1 <= arch[key] <= bound:
            raise ProjectorError(f"{path}: metadata field {key}={arch[key]}: must be in [1, {bound}]")
    if not (math.isfinite(arch["scale"]) and arch["scale"] != 0 and math.isfinite(arch["shift"])):
        raise ProjectorError(f"{path}: metadata scale={arch['scale']}, shift={arch['shift']}: must be finite, "
                             "scale non-zero")
    return arch


class SDVAEProjector(Projector):
    """diffusers `AutoencoderKL` from a local directory (the `sdvae` extra). Uses the posterior mean."""

    name = "sdvae"

    def __init__(self, directory: str | Path):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ProjectorError("the SD-VAE projector needs diffusers: pip install 'lmd-ray[sdvae]'") from None
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ProjectorError(f"{directory}: no config.json of a diffusers AutoencoderKL")
        try:
            vae = AutoencoderKL.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ProjectorError(f"{directory}: cannot load AutoencoderKL ({err})") from None
        cfg = vae.config
        super().__init__(scale=float(cfg.scaling_factor), shift=float(getattr(cfg, "shift_factor", None) or 0.0))
        self.vae = vae.eval()
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images * 2 - 1).latent_dist.mode()

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(latents).sample + 1) / 2
