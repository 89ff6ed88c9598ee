"""The official LMD step rebuilt in benchmarks/official_step.py: its masking, loss, training and size.

It is the baseline our step's speed is reported against (step_speed.py --official), so it must be the
same model doing the same work: these tests check it at the tiny preset's dims against the official
behaviour and against our model with copied weights.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lmd.config import PRESETS
from lmd.model import MaskedLatentTransformer, param_count, patchify, unpatchify

TINY = PRESETS["tiny"]


def _load_official():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "official_step.py"
    spec = importlib.util.spec_from_file_location("official_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


official = _load_official()


def _latents(n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY.in_chans, TINY.latent_size, TINY.latent_size, generator=gen)


@pytest.mark.parametrize("length", [16, 49])
@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75, 0.9])
def test_official_masking_keeps_int_of_length_times_visible_fraction(length, ratio):
    x = torch.randn(4, length, 8)
    visible, mask, ids_restore = official.OfficialMAE.random_masking(x, ratio)
    keep = int(length * (1 - ratio))  # truncation, as the official code (ours rounds: 41 vs 42 at L=49, 0.15)
    assert visible.shape == (4, keep, 8)
    assert mask.sum(dim=1).tolist() == [length - keep] * 4
    for i in range(4):  # the kept tokens are exactly those the mask marks visible, in the noise's order
        kept = x[i, mask[i] == 0]
        assert sorted(map(tuple, visible[i].tolist())) == sorted(map(tuple, kept.tolist()))
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(length).expand(4, -1))


def test_official_loss_ignores_visible_patches_and_counts_masked_ones():
    torch.manual_seed(0)
    model = official.OfficialMAE(TINY)
    latents = _latents()
    assert torch.equal(model.patchify(latents), patchify(latents, TINY.patch_size))
    with torch.no_grad():
        loss, pred, mask = model(latents, 0.75, torch.rand(3, TINY.num_patches))

        def loss_with_patch_changed(masked: bool) -> torch.Tensor:
            n, patch = (mask == (1 if masked else 0)).nonzero()[0].tolist()
            patches = patchify(latents, TINY.patch_size)
            patches[n, patch] += 5.0
            return model.forward_loss(unpatchify(patches, TINY.patch_size, TINY.in_chans), pred, mask)

        assert torch.equal(loss_with_patch_changed(masked=False), loss)
        assert not torch.allclose(loss_with_patch_changed(masked=True), loss)


def _ours_with_official_weights(ref) -> MaskedLatentTransformer:
    ours = MaskedLatentTransformer(TINY)
    state = {}
    for name, tensor in ref.state_dict().items():
        if name.endswith("pos_embed"):
            continue  # fixed tables: buffers in ours
        if name == "patch_embed.weight":  # Conv2d [D, C, p, p] -> Linear over (p, q, c) patch tokens
            tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
        state[name.replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.2")] = tensor
    ours.load_state_dict(state, strict=True)
    return ours


def test_official_loss_equals_ours_with_copied_weights_and_the_decoder_position_sign_undone():
    torch.manual_seed(0)
    ref = official.OfficialMAE(TINY)
    ours = _ours_with_official_weights(ref)
    latents, noise = _latents(), torch.rand(3, TINY.num_patches)
    with torch.no_grad():
        ours_loss, ours_pred, ours_mask = ours(latents, 0.75, noise)
        subtracted, _, _ = ref(latents, 0.75, noise)
        ref.decoder_pos_embed.copy_(-ref.decoder_pos_embed)  # official subtracts its positions; ours adds
        ref_loss, ref_pred, ref_mask = ref(latents, 0.75, noise)
    assert torch.equal(ref_mask, ours_mask)
    torch.testing.assert_close(ref_pred, ours_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_loss, ours_loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(subtracted, ours_loss)  # the sign matters, so the comparison above can fail


def test_official_step_trains_in_fp32_on_cpu_and_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    trainer = official.build_official(TINY, torch.device("cpu"), lr=1e-3)
    assert not trainer.amp and not trainer.scaler.is_enabled()
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    latents = _latents(8)
    for _ in range(15):
        torch.manual_seed(1)  # the official model draws its mask noise itself: the same mask every step
        official.official_step(trainer, latents, 0.75, lr=1e-3)
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in after)  # zero_grad() after the step
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert len(trainer.losses) == 15
    assert trainer.losses[-1] < 0.7 * trainer.losses[0], trainer.losses


def test_official_weight_decay_skips_biases_and_norms_only():
    trainer = official.build_official(TINY, torch.device("cpu"))
    no_decay, decay = trainer.optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    one_d = {id(p) for p in trainer.model.parameters() if p.requires_grad and p.ndim == 1}  # biases, norms
    assert {id(p) for p in no_decay["params"]} == one_d and len(one_d) > 0
    assert len(decay["params"]) + len(one_d) == sum(p.requires_grad for p in trainer.model.parameters())
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.95)
    assert not trainer.optimizer.defaults["fused"]
    assert any(p is trainer.model.cls_token for p in decay["params"])  # timm 0.3.2 decays the tokens


@pytest.mark.parametrize("preset", ["tiny", "base_p4", "large"])
def test_official_model_has_as_many_trainable_parameters_as_ours(preset):
    assert official.official_param_count(PRESETS[preset]) == param_count(PRESETS[preset])


def test_measure_official_row_has_step_speed_keys_and_says_fp32_on_cpu():
    row = official.measure_official(batch=4, steps=2, warmup=1, ratio=0.75, device="cpu", preset="tiny")
    assert set(row) == {"preset", "device", "compile", "mode", "batch", "mask_ratio", "params", "steps_per_s",
                        "samples_per_s", "tflops", "mfu"}
    assert "fp32" in row["mode"] and row["mfu"] is None and row["steps_per_s"] > 0
