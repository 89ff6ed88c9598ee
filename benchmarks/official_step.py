"""The official LMD train step, rebuilt: the baseline of issue 14's "2x the official step".

The official code (ma-xu/LMD, built on facebookresearch/mae) trains MAE's `MaskedAutoencoderViT`
with timm 0.3.2 `Block`s on SD-VAE latents. This file rebuilds that step from its description,
with its own model classes, so our step can be timed against it on the same machine and batch:

- model: stride-p Conv2d patch embed, fixed sin-cos positions held as frozen Parameters, CLS token;
  blocks with a qkv Linear and attention written out as softmax(q @ k^T * scale) @ v (no SDPA),
  GELU MLP x4, pre-LayerNorm eps 1e-6, p=0 dropouts; masking by argsort of fresh `torch.rand`
  noise keeping int(L * (1 - ratio)) tokens; decoder with mask tokens un-shuffled by gather, its
  positions *subtracted* (the official code's sign); MSE on masked patches, raw targets.
- step (`engine_pretrain.train_one_epoch`): the LR set on every param group, fp16 autocast,
  `loss.item()` (a host sync), an isfinite check, `loss /= accum_iter`, MAE's NativeScaler
  (GradScaler scale, backward, unscale, the grad norm it always computes, step, update),
  `optimizer.zero_grad()`, `torch.cuda.synchronize()`; AdamW betas (0.9, 0.95), weight decay
  0.05 except 1-D tensors and biases (timm's `add_weight_decay`), torch's default (foreach, not
  fused) kernels.

Left out, each of which only makes the official step *slower* (so our ratio to it is conservative):
the SD-VAE encoding of every batch inside the official loop (we precompute latents), the data
loader, and MetricLogger's printing. `zero_grad()` uses today's default (set_to_none=True); the
torch 1.x the official code ran on zeroed gradients with a kernel per tensor. On CPU there is no
fp16 autocast or GradScaler: the step runs in fp32 and the row's `mode` says so.

FLOPs per sample are `lmd.model.train_flops_per_sample` of the same preset and ratio, so both
steps' TFLOP/s and MFU share one count; `benchmarks/step_speed.py --official` prints the ratio.

    python benchmarks/official_step.py --batch-size 256 --device cuda     # ViT-B (base_p4 dims)
    python benchmarks/official_step.py --preset tiny --batch-size 64      # CPU-sized, fp32
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lmd.config import PRESETS, ModelConfig
from lmd.config_build import build_config
from lmd.device import resolve_device
from lmd.flops import device_peak_flops
from lmd.masking import num_visible
from lmd.model import sincos_pos_embed_2d, train_flops_per_sample


# --------------------------------------------------------------------------------------------
# timm 0.3.2's ViT block, as MAE uses it
# --------------------------------------------------------------------------------------------
class OfficialAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape  # x: [N, L, D]
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [N, H, L, D/H]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # [N, H, L, L], materialised
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(n, length, dim)
        return self.proj_drop(self.proj(x))


class OfficialMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class OfficialBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAttention(dim, num_heads)
        self.drop_path = nn.Identity()  # drop_path_rate 0 in MAE pre-training
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = OfficialMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# MAE's MaskedAutoencoderViT over latents
# --------------------------------------------------------------------------------------------
class OfficialMAE(nn.Module):
    """The official model at the dims of a `ModelConfig` (base_p4: ViT-B 12x768 on 49 tokens, decoder 8x512)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size, self.in_chans = cfg.patch_size, cfg.in_chans
        grid = cfg.latent_size // cfg.patch_size
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(d, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(OfficialBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dd, grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            OfficialBlock(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size**2 * cfg.in_chans, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear, as MAE does
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [N, C, H, W] -> [N, L, p*p*C]."""
        n, c, h, _ = latents.shape
        p, g = self.patch_size, h // self.patch_size
        x = torch.einsum("nchpwq->nhwpqc", latents.reshape(n, c, g, p, g, p))
        return x.reshape(n, g * g, p * p * c)

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, L, D] -> visible [N, int(L(1-r)), D], mask [N, L] (1 = masked), ids_restore [N, L].

        `noise` ([N, L]) lets tests fix the mask; the official code always draws it here.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep stay
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))  # repeat: a copy, as official
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(
        self, latents: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(latents).flatten(2).transpose(1, 2)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)  # [N, 1 + keep, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, 1 + keep, Dd]
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # un-shuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1 + L, Dd]
        x = x - self.decoder_pos_embed  # the official sign (MAE adds)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # [N, L, p*p*C]

    def forward_loss(self, latents: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE (norm_pix_loss off)."""
        loss = ((pred - self.patchify(latents)) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, latents: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(latents, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(latents, pred, mask), pred, mask


def official_param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the official model (its frozen position tables excluded)."""
    with torch.device("meta"):
        model = OfficialMAE(cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# engine_pretrain's step
# --------------------------------------------------------------------------------------------
@dataclass
class OfficialTrainer:
    model: OfficialMAE
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool  # fp16 autocast + GradScaler (CUDA only)
    losses: list[float] = field(default_factory=list)  # what MetricLogger keeps


def build_official(cfg: ModelConfig, device: torch.device, lr: float = 1.5e-4,
                   weight_decay: float = 0.05) -> OfficialTrainer:
    model = OfficialMAE(cfg).to(device)
    model.train(True)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # timm's add_weight_decay
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    amp = device.type == "cuda"
    return OfficialTrainer(model, optimizer, torch.amp.GradScaler("cuda", enabled=amp), device, amp)


def grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """MAE's `get_grad_norm_`: one norm per tensor, then the norm of the stack."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def official_step(trainer: OfficialTrainer, samples: torch.Tensor, mask_ratio: float, lr: float) -> float:
    """One iteration of `train_one_epoch` (accum_iter 1). Returns the loss as a Python float."""
    model, optimizer, scaler = trainer.model, trainer.optimizer, trainer.scaler
    for group in optimizer.param_groups:  # lr_sched.adjust_learning_rate, every iteration
        group["lr"] = lr
    samples = samples.to(trainer.device, non_blocking=True)
    with torch.autocast(trainer.device.type, dtype=torch.float16, enabled=trainer.amp):
        loss, _, _ = model(samples, mask_ratio=mask_ratio)
    loss_value = loss.item()  # the per-step host sync
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"official step: loss is {loss_value}")
    loss /= 1  # accum_iter
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm(list(model.parameters()))  # computed (and logged) by NativeScaler even without clipping
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    trainer.losses.append(loss_value)
    return loss_value


def measure_official(batch: int, steps: int, warmup: int, ratio: float, device: str,
                     preset: str = "base_p4") -> dict:
    """Time the official step at `preset`'s dims; a row with step_speed's `measure` keys plus `mode`."""
    # The same config step_speed's `measure` builds, so both models see the same latent shape and tokens.
    cfg = build_config(overrides={"model.preset": preset, "data.batch_size": batch, "data.num_train": batch,
                                  "data.num_val": 1}).model
    if int(cfg.num_patches * (1 - ratio)) != num_visible(cfg.num_patches, ratio):
        # The official code truncates the kept count and ours rounds; at 0.75 on 49 tokens both keep 12.
        logging.warning("mask ratio %s: the official step keeps %d tokens, ours %d; FLOPs are counted at ours",
                        ratio, int(cfg.num_patches * (1 - ratio)), num_visible(cfg.num_patches, ratio))
    dev = resolve_device(device)
    torch.manual_seed(0)
    trainer = build_official(cfg, dev)
    samples = torch.randn(batch, cfg.in_chans, cfg.latent_size, cfg.latent_size, device=dev)
    for _ in range(warmup):
        official_step(trainer, samples, ratio, lr=1.5e-4)
    start = time.perf_counter()
    for _ in range(steps):  # each step already ends in a host sync
        official_step(trainer, samples, ratio, lr=1.5e-4)
    seconds = time.perf_counter() - start
    flops = train_flops_per_sample(cfg, ratio)
    name, peak = device_peak_flops(dev)
    samples_s = steps * batch / seconds
    mode = "official fp16+GradScaler" if trainer.amp else f"official fp32 ({dev.type}: no autocast)"
    return {"preset": preset, "device": name, "compile": False, "mode": mode, "batch": batch, "mask_ratio": ratio,
            "params": official_param_count(cfg), "steps_per_s": steps / seconds, "samples_per_s": samples_s,
            "tflops": samples_s * flops / 1e12, "mfu": samples_s * flops / peak if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base_p4", choices=list(PRESETS), help="dims to build (default base_p4)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio (default 0.75)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the row to FILE")
    args = parser.parse_args()
    r = measure_official(args.batch_size, args.steps, args.warmup, args.ratio, args.device, args.preset)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{r['preset']} {r['mode']}: batch {r['batch']}, {r['steps_per_s']:.2f} steps/s, "
          f"{r['samples_per_s']:.1f} samples/s, {r['tflops']:.3f} TFLOP/s, MFU {mfu}, "
          f"{r['params'] / 1e6:.1f} M params, {r['device']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
