"""The masked latent transformer of LMD: an MAE over patches of a projector's latent.

Encoder: linear patch embedding + fixed 2-D sin-cos positions + CLS token, run on the visible
patches only. Decoder: a lighter transformer over visible tokens plus a shared mask token, with
its own sin-cos positions *added* (the official code subtracts them, a bug), predicting every
patch. Loss: MSE on the masked patches only. Attention uses `scaled_dot_product_attention`, so
PyTorch picks the flash / memory-efficient kernel on GPU.

Its size presets live with the configs (`lmd.config.PRESETS`); `param_count` and
`train_flops_per_sample` give the figures that MFU is computed from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmd.config import ModelConfig
from lmd.masking import num_visible, random_masking


# --------------------------------------------------------------------------------------------
# Position embeddings and patching
# --------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE's). Returns [grid*grid (+1), dim]; the CLS row is zeros."""
    assert dim % 4 == 0, "validated in ModelConfig"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # [D/4]
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:  # pos: [M] -> [M, D/2]
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(cols), encode(rows)], axis=1)  # [grid*grid, D]; cols first as in MAE
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """latents: [N, C, H, W] -> patches: [N, L, p*p*C], row-major over the patch grid."""
    n, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """patches: [N, L, p*p*C] -> latents: [N, C, H, W]; the inverse of `patchify`."""
    n, length, _ = patches.shape
    p, g = patch_size, math.isqrt(length)
    assert g * g == length, f"{length} patches do not form a square grid"
    x = patches.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


# --------------------------------------------------------------------------------------------
# Transformer block (pre-norm, SDPA attention)
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape  # x: [N, L, D]
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, D/H]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class MaskedLatentTransformer(nn.Module):
    """MAE-style masked autoencoder over latent patches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        grid = cfg.latent_size // cfg.patch_size
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim

        # Encoder. A Linear on patchified tokens equals MAE's stride-p Conv2d, and shares the
        # patchify with the loss target instead of redoing it.
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

        # Decoder.
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, cfg.patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # MAE's init: xavier for linears, N(0, .02) for the learned tokens.
        w = self.patch_embed.weight.data
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.patch_embed:
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(
        self, patches: torch.Tensor, keep: int, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(patches) + self.pos_embed[:, 1:]  # x: [N, L, D]
        x, mask, ids_restore = random_masking(x, keep, noise)  # x: [N, keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # x: [N, 1 + keep, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch (nothing masked), as a linear probe sees it: [N, 1 + L, D]."""
        x = self.patch_embed(patches) + self.pos_embed[:, 1:]  # x: [N, L, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # x: [N, 1 + L, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # x: [N, 1 + keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [N, 1 + L, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1 + L, p*p*C]
        return x[:, 1:]  # drop CLS: [N, L, p*p*C]

    def target(self, patches: torch.Tensor) -> torch.Tensor:
        if not self.cfg.norm_target:
            return patches
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        return (patches - mean) / (var + 1.0e-6) ** 0.5

    def forward_loss(self, patches: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only. patches, pred: [N, L, P]; mask: [N, L]."""
        per_patch = (pred.float() - self.target(patches).float()).pow(2).mean(dim=-1)  # [N, L]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, latents: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents: [N, C, H, W]; noise: optional [N, L] masking noise.

        Returns (loss, pred [N, L, p*p*C], mask [N, L] with 1 = masked).
        """
        patches = patchify(latents, self.cfg.patch_size)  # [N, L, p*p*C]
        keep = num_visible(patches.shape[1], mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(patches, keep, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(patches, pred, mask), pred, mask


# --------------------------------------------------------------------------------------------
# Size and cost figures
# --------------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig) -> MaskedLatentTransformer:
    return MaskedLatentTransformer(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = MaskedLatentTransformer(cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one transformer block (matmuls only; 2 FLOPs per multiply-add)."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, mlp
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return float(linear + attention)


def _patch_embed_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of the patch embedding (applied to every patch, before masking)."""
    return 2.0 * cfg.num_patches * cfg.patch_dim * cfg.embed_dim


def encoder_flops_per_sample(cfg: ModelConfig) -> float:
    """Matmul FLOPs of encoding one image for a downstream task: every patch visible (ratio 0), no decoder.
    The cost a user of the pre-trained encoder pays per image (the search's second objective)."""
    return _patch_embed_flops(cfg) + cfg.depth * _block_flops(1 + cfg.num_patches, cfg.embed_dim, cfg.mlp_ratio)


def forward_flops_per_sample(cfg: ModelConfig, mask_ratio: float) -> float:
    """Matmul FLOPs of one forward pass at `mask_ratio` (the encoder only sees visible tokens)."""
    length = cfg.num_patches
    enc_tokens = 1 + num_visible(length, mask_ratio)
    dec_tokens = 1 + length
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    flops = _patch_embed_flops(cfg)
    flops += cfg.depth * _block_flops(enc_tokens, d, cfg.mlp_ratio)
    flops += 2.0 * enc_tokens * d * dd  # decoder_embed
    flops += cfg.decoder_depth * _block_flops(dec_tokens, dd, cfg.mlp_ratio)
    flops += 2.0 * dec_tokens * dd * cfg.patch_dim  # decoder_pred
    return flops


def train_flops_per_sample(cfg: ModelConfig, mask_ratio: float) -> float:
    """Forward + backward: the backward computes two matmuls per forward one (input and weight gradients),
    except at the patch embedding, whose input is data and needs no gradient (one). Torch's FlopCounterMode
    agrees to within 0.1% (tests/test_model.py)."""
    return 3.0 * forward_flops_per_sample(cfg, mask_ratio) - _patch_embed_flops(cfg)
