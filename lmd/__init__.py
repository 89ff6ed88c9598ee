"""LMD-Ray: Latent Masking Diffusion (Ma et al., AAAI 2024) trained, searched and ablated on Ray."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("lmd-ray")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"


@functools.cache
def code_version() -> str:
    """Package version plus the git commit of the source tree (and '-dirty'), when there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}" if commit else __version__
