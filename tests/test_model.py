"""The masked latent transformer: patching, loss masking, learning, presets and cost figures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmd.config import PRESETS, ModelConfig
from lmd.masking import num_visible
from lmd.model import (
    MaskedLatentTransformer,
    forward_flops_per_sample,
    param_count,
    patchify,
    sincos_pos_embed_2d,
    train_flops_per_sample,
    unpatchify,
)


@pytest.mark.parametrize(("channels", "size", "patch"), [(4, 16, 4), (4, 28, 4), (3, 32, 8), (1, 8, 2)])
def test_patchify_then_unpatchify_is_identity(channels, size, patch):
    x = torch.randn(3, channels, size, size)
    patches = patchify(x, patch)
    assert patches.shape == (3, (size // patch) ** 2, patch * patch * channels)
    assert torch.equal(unpatchify(patches, patch, channels), x)


def test_patchify_groups_each_patch_contiguously():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(x, 2)
    # Patch 0 holds rows 0-1, cols 0-1 of both channels, channel-last within each pixel.
    assert patches[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]


def test_sincos_embedding_has_zero_cls_row_and_distinct_positions():
    emb = sincos_pos_embed_2d(32, 4)
    assert emb.shape == (17, 32)
    assert torch.equal(emb[0], torch.zeros(32))
    assert torch.unique(emb[1:], dim=0).shape[0] == 16


def test_forward_shapes_and_mask_count():
    cfg = PRESETS["tiny"]
    model = MaskedLatentTransformer(cfg)
    loss, pred, mask = model(torch.randn(4, 4, 16, 16), 0.75)
    assert pred.shape == (4, 16, 64)
    assert torch.equal(mask.sum(1), torch.full((4,), 16.0 - num_visible(16, 0.75)))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_loss_ignores_visible_patches():
    model = MaskedLatentTransformer(PRESETS["tiny"])
    patches = torch.randn(2, 16, 64)
    pred = torch.randn(2, 16, 64)
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    base = model.forward_loss(patches, pred, mask)
    visible_changed = pred.clone()
    visible_changed[:, 5:] += 100.0
    assert torch.equal(model.forward_loss(patches, visible_changed, mask), base)
    masked_changed = pred.clone()
    masked_changed[:, 0] += 1.0
    assert model.forward_loss(patches, masked_changed, mask) > base


def test_visible_patch_predictions_get_no_gradient():
    model = MaskedLatentTransformer(PRESETS["tiny"])
    pred = torch.randn(2, 16, 64, requires_grad=True)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1
    model.forward_loss(torch.randn(2, 16, 64), pred, mask).backward()
    assert torch.count_nonzero(pred.grad[:, 1::2]) == 0
    assert torch.count_nonzero(pred.grad[:, ::2]) > 0


def test_normalised_target_has_zero_mean_unit_variance_per_patch():
    model = MaskedLatentTransformer(ModelConfig(**{**PRESETS["tiny"].__dict__, "norm_target": True}))
    target = model.target(torch.randn(2, 16, 64) * 5 + 3)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-3)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = MaskedLatentTransformer(PRESETS["tiny"])
    batch = torch.randn(8, 4, 16, 16)
    noise = torch.rand(8, 16)  # the same mask every step: a fixed target to memorise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        loss, _, _ = model(batch, 0.5, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_decoder_positions_change_predictions():
    # With positions added, the same visible content at different places predicts differently.
    torch.manual_seed(0)
    model = MaskedLatentTransformer(PRESETS["tiny"]).eval()
    x = torch.randn(1, 4, 16, 16)
    _, pred, _ = model(x, 0.5, torch.rand(1, 16))
    masked_preds = pred[0]
    assert torch.unique(masked_preds.round(decimals=5), dim=0).shape[0] == 16


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_matches_an_instantiated_model(name):
    model = MaskedLatentTransformer(PRESETS[name])
    assert param_count(PRESETS[name]) == sum(p.numel() for p in model.parameters())


def test_official_preset_shape_and_size():
    cfg = PRESETS["base_p4"]
    assert (cfg.latent_size, cfg.in_chans, cfg.patch_size, cfg.num_patches, cfg.patch_dim) == (28, 4, 4, 49, 64)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (12, 768, 12)
    assert (cfg.decoder_depth, cfg.decoder_embed_dim, cfg.decoder_num_heads) == (8, 512, 16)
    # ViT-B encoder (~85M) + 8-block 512-wide decoder (~25M).
    assert 100e6 < param_count(cfg) < 120e6


def test_flops_follow_the_mask_ratio_and_the_parameter_count():
    cfg = PRESETS["base_p4"]
    assert forward_flops_per_sample(cfg, 0.75) < forward_flops_per_sample(cfg, 0.15)
    # Rule of thumb: forward matmul FLOPs ~ 2 * params * tokens; the encoder sees 13 tokens, the decoder 50.
    enc = 12 * 12 * 768 * 768 * 13 * 2
    dec = 8 * 12 * 512 * 512 * 50 * 2
    assert forward_flops_per_sample(cfg, 0.75) == pytest.approx(enc + dec, rel=0.1)


@pytest.mark.parametrize("ratio", [0.15, 0.75])
@pytest.mark.parametrize("cfg", [
    PRESETS["mini_p1"],  # the ablation's latent variants: 16 tokens of 4 values
    replace(PRESETS["mini_p1"], latent_size=32, in_chans=3, patch_size=4),  # its pixel MAE: 64 tokens of 48 values
    replace(PRESETS["tiny"], depth=2, decoder_depth=1),
], ids=["mini_p1", "mini_p1-pixel", "tiny"])
def test_train_flops_match_torchs_flop_counter_on_a_real_step(cfg, ratio):
    """The budgets' FLOPs against torch's own count of one forward + backward (matmuls; the math attention
    kernel, since the counter does not see the fused CPU one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, batch = MaskedLatentTransformer(cfg), 2
    latents = torch.randn(batch, cfg.in_chans, cfg.latent_size, cfg.latent_size)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss, _, _ = model(latents, ratio, torch.rand(batch, cfg.num_patches))
        loss.backward()
    assert counter.get_total_flops() / batch == pytest.approx(train_flops_per_sample(cfg, ratio), rel=1e-3)


def test_normalised_predictions_are_restored_without_the_hidden_patches_statistics():
    """With per-patch normalised targets, a reconstruction (what PSNR decodes) may use only what the model sees:
    changing the masked patches' values must not change what is put in their place."""
    from lmd.evaluation import reconstruct

    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], norm_target=True)
    model = MaskedLatentTransformer(cfg).eval()
    latents = torch.randn(2, cfg.in_chans, cfg.latent_size, cfg.latent_size)
    noise = torch.rand(2, cfg.num_patches)
    _, _, mask = model(latents, 0.75, noise)
    hidden = mask.bool().unsqueeze(-1)  # [N, L, 1]
    patches = patchify(latents, cfg.patch_size)
    changed = unpatchify(torch.where(hidden, 5 * patches + 3, patches), cfg.patch_size, cfg.in_chans)
    a = patchify(reconstruct(model, latents, 0.75, noise), cfg.patch_size)
    b = patchify(reconstruct(model, changed, 0.75, noise), cfg.patch_size)
    assert torch.equal(a, b)
