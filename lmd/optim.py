"""The optimiser and learning-rate schedule shared by the transformer and the projector trainers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from lmd.config import OptimConfig


def warmup_cosine(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int,
                  progress_floor: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then half-cosine decay from `lr` to `min_lr` at `total_steps`.

    `progress_floor` lets a caller end the decay early (a time-limited run follows whichever of
    steps or time runs out first, so it still ends at `min_lr` instead of being cut at a high LR).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, progress_floor), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(params: Iterable[Any], device: torch.device, lr: float, betas: tuple[float, float],
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with one fused kernel per step on GPU and the multi-tensor path on CPU (fused AdamW is CUDA-only)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused, foreach=not fused)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on norms, biases and the learned tokens (as MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith("_token") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, device, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
