"""Which device and arithmetic a run uses: `run.device` and `run.precision` resolved for this process."""

from __future__ import annotations

import torch

from lmd.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` = CUDA when visible, else CPU; asking for CUDA without one fails naming the field."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda': no CUDA device is visible to this process")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `run.precision` on `device`: bf16 (auto on CUDA, or asked for), else None (fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None
