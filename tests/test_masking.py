"""Schedulers match docs/DESIGN.md and masking keeps exactly the computed count."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lmd.cli import main
from lmd.config import SCHEDULERS, MaskConfig
from lmd.masking import mask_ratio, num_visible, random_masking, schedule_table

T = 300  # with ramp 2/3 the ramp ends at step 200, so u = step / 200


@pytest.mark.parametrize(("step", "expected"), [(0, 0.15), (50, 0.242), (100, 0.454), (150, 0.663), (200, 0.75)])
def test_cosine_matches_design_points(step, expected):
    assert mask_ratio(step, T, MaskConfig(scheduler="cosine")) == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.15), (50, 0.30), (100, 0.45), (150, 0.60), (200, 0.75)])
def test_uniform_is_a_linear_ramp(step, expected):
    assert mask_ratio(step, T, MaskConfig(scheduler="uniform")) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"),
                         [(0, 0.15), (25, 0.275), (50, 0.40), (75, 0.40), (100, 0.40), (150, 0.575), (200, 0.75)])
def test_piecewise_rises_holds_at_mid_then_rises(step, expected):
    assert mask_ratio(step, T, MaskConfig(scheduler="piecewise")) == pytest.approx(expected)


def test_constant_is_end_everywhere():
    cfg = MaskConfig(scheduler="constant", end=0.8)
    assert {mask_ratio(s, T, cfg) for s in range(T + 1)} == {0.8}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("start", "end", "ramp"),
                         [(0.15, 0.75, 2 / 3), (0.0, 0.9, 1.0), (0.3, 0.5, 0.1), (0.6, 0.6, 0.5)])
def test_every_schedule_is_monotone_bounded_and_holds_after_ramp(scheduler, start, end, ramp):
    cfg = MaskConfig(scheduler=scheduler, start=start, end=end, ramp=ramp)
    total = 500
    ratios = [mask_ratio(s, total, cfg) for s in range(total + 1)]
    assert all(b >= a for a, b in itertools.pairwise(ratios))
    assert min(ratios) >= start and max(ratios) <= end
    ramp_end = int(ramp * total + 0.999)
    assert all(r == pytest.approx(end) for r in ratios[ramp_end:])
    if scheduler != "constant":
        assert ratios[0] == pytest.approx(start)


def test_schedule_is_a_pure_function_of_step():
    cfg = MaskConfig()
    first = [mask_ratio(s, 1000, cfg) for s in range(0, 1000, 7)]
    assert first == [mask_ratio(s, 1000, cfg) for s in range(0, 1000, 7)]


@pytest.mark.parametrize(("patches", "ratio", "keep"), [(49, 0.75, 12), (49, 0.15, 42), (16, 0.5, 8), (16, 0.0, 15),
                                                         (16, 0.99, 1), (64, 0.6, 26)])
def test_num_visible_rounds_and_keeps_one_of_each(patches, ratio, keep):
    assert num_visible(patches, ratio) == keep


def test_random_masking_keeps_exactly_the_computed_count():
    x = torch.randn(5, 49, 8)
    keep = num_visible(49, 0.75)
    visible, mask, ids_restore = random_masking(x, keep)
    assert visible.shape == (5, keep, 8)
    assert mask.shape == (5, 49)
    assert torch.equal(mask.sum(dim=1), torch.full((5,), 49.0 - keep))
    # The visible tokens are exactly the rows of x where mask == 0, in shuffled order.
    for i in range(5):
        kept_rows = x[i][mask[i] == 0]
        assert torch.equal(visible[i].sort(dim=0).values, kept_rows.sort(dim=0).values)
    # ids_restore inverts the shuffle.
    shuffled = torch.cat([visible, torch.zeros(5, 49 - keep, 8)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(restored[mask == 0], x[mask == 0])


def test_masks_differ_per_sample_and_follow_the_noise():
    x = torch.randn(8, 16, 4)
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    _, m1, _ = random_masking(x, 6, noise)
    _, m2, _ = random_masking(x, 6, noise.clone())
    assert torch.equal(m1, m2)
    assert len({tuple(row.tolist()) for row in m1}) > 1


def test_schedule_table_includes_both_ends():
    rows = schedule_table(90, MaskConfig(), points=4)
    assert [s for s, _ in rows] == [0, 30, 60, 90]
    assert len(schedule_table(5, MaskConfig(), points=0)) == 6


def test_schedule_cli_prints_rows_as_json(capsys):
    assert main(["schedule", "--scheduler", "cosine", "--total-steps", "300", "--points", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scheduler"] == "cosine"
    assert [r["step"] for r in out["rows"]] == [0, 75, 150, 225, 300]
    assert out["rows"][2]["ratio"] == pytest.approx(0.663, abs=6e-4)
    assert out["rows"][-1]["ratio"] == pytest.approx(0.75)


def test_schedule_cli_prints_a_table(capsys):
    assert main(["schedule", "--scheduler", "uniform", "--total-steps", "10", "--mask-end", "0.5",
                 "--mask-ramp", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split() == ["10", "0.5000"]


def test_shape_ratio_keeps_the_visible_count_with_one_value_per_count():
    from lmd.masking import shape_ratio

    for length in (4, 16, 49, 196, 1024):
        ratios = [i / 997 for i in range(997)]
        for r in ratios:
            assert num_visible(length, shape_ratio(length, r)) == num_visible(length, r)
        assert len({shape_ratio(length, r) for r in ratios}) == len({num_visible(length, r) for r in ratios})
