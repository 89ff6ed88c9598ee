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


def load_projector(spec: str, device: str | None = None) -> Projector:
    """Resolve `spec` to an eval-mode, frozen projector (on `device` when given)."""
    if spec == "identity":
        proj: Projector = IdentityProjector()
    elif spec in BUNDLED_WEIGHTS:
        path = bundled_weights_path(spec)
        if not path.is_file():
            raise ProjectorError(f"{spec}: bundled weights {path} are missing from this install; "
                                 "run `lmd projector-train` to make them")
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
