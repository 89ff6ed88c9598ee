"""Latent projectors: `load_projector(spec)` turns a name or local path into a `Projector`.

Specs: `lmd-f8c4` (default: the project's own pretrained weights on photos, shipped in this package),
`lmd-f8c4-fmnist` (the same architecture fine-tuned on Fashion-MNIST at 32 px, also shipped),
`identity` (pixel space), `taesd:DIR` (official TAESD files), `sdvae:DIR` (diffusers AutoencoderKL),
or a bare path: a `.safetensors` file in the project's format, or a directory holding TAESD or
SD-VAE files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lmd.config import DATASET_PROJECTORS, DEFAULT_PROJECTOR  # noqa: E402 - one definition, torch-free
from lmd.projector.base import IdentityProjector, Projector, ProjectorError
from lmd.projector.loaders import SDVAEProjector, TAESDProjector

BUNDLED_WEIGHTS = {"lmd-f8c4": "weights/lmd_f8c4.safetensors",  # photos, 64-128 px
                   "lmd-f8c4-fmnist": "weights/lmd_f8c4_fmnist.safetensors"}  # Fashion-MNIST, 32 px

__all__ = ["DATASET_PROJECTORS", "DEFAULT_PROJECTOR", "IdentityProjector", "Projector", "ProjectorError",
           "SDVAEProjector", "TAESDProjector", "bundled_weights_path", "load_projector"]


def bundled_weights_path(name: str = DEFAULT_PROJECTOR) -> Path:
    return Path(str(resources.files("lmd.projector").joinpath(BUNDLED_WEIGHTS[name])))


WEIGHTS_SHA256 = "weights_sha256"  # the card's record of its weights file's SHA-256 (lmd.projector.train writes it)


def check_bundled_weights(path: Path) -> None:
    """Refuse shipped weights whose bytes are not the ones their card (`<name>.card.json`) records: a flipped bit
    would otherwise load, and the store it makes would carry the altered weights' checksum as if they were right."""
    import json

    from lmd.io import sha256_file

    card_path = path.with_suffix(".card.json")
    try:
        expected = json.loads(card_path.read_text()).get(WEIGHTS_SHA256)
    except (OSError, ValueError) as err:
        raise ProjectorError(f"{card_path}: the shipped weights' card is unreadable ({err})") from None
    if expected is None:
        raise ProjectorError(f"{card_path}: no {WEIGHTS_SHA256} recorded for {path.name}")
    actual = sha256_file(path)
    if actual != expected:
        raise ProjectorError(f"{path}: sha256 {actual[:16]}..., its card records {expected[:16]}... (damaged or "
                             "replaced; reinstall the package or rerun `lmd projector-train`)")


def load_projector(spec: str, device: str | None = None) -> Projector:
    """Resolve `spec` to an eval-mode, frozen projector (on `device` when given)."""
    if spec == "identity":
        proj: Projector = IdentityProjector()
    elif spec in BUNDLED_WEIGHTS:
        path = bundled_weights_path(spec)
        if not path.is_file():
            raise ProjectorError(f"{spec}: bundled weights {path} are missing from this install; "
                                 "run `lmd projector-train` to make them")
        check_bundled_weights(path)
        proj = TAESDProjector.load(path)
    elif spec.startswith("taesd:"):
        proj = TAESDProjector.from_dir(spec[len("taesd:"):])
    elif spec.startswith("sdvae:"):
        proj = SDVAEProjector(spec[len("sdvae:"):])
    else:
        path = Path(spec)
        if path.is_file() and path.suffix == ".safetensors":
            proj = TAESDProjector.load(path)
        elif path.is_dir() and any(path.glob("taesd_encoder.*")):
            proj = TAESDProjector.from_dir(path)
        elif path.is_dir() and (path / "config.json").is_file():
            proj = SDVAEProjector(path)
        else:
            raise ProjectorError(f"projector {spec!r}: not a known name ({', '.join(['identity', *BUNDLED_WEIGHTS])}),"
                                 " nor a .safetensors file or a TAESD / SD-VAE directory")
    proj.requires_grad_(False)
    return proj.to(device).eval() if device else proj.eval()
