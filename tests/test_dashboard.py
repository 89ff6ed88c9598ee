"""Dashboards of real and synthetic experiment results, rendered in headless Chromium; bad and old results files.

Most tests build a small synthetic experiment (a results table, references.json, summary.json, args.json)
whose answer is known, so the figures can be checked for what they must show; the two real runs of
tests/conftest.py check the whole path from Tune to the browser.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmd.dashboard import ResultsError, load_experiment, render_dashboard
from lmd.dashboard import figures as F
from lmd.dashboard import spend as S
from lmd.dashboard.load import FINALISTS_FILE, IMPORTANCES_FILE, PARETO_FILE, PICTURES_FILE
from lmd.dashboard.page import budget_caption, build_panels
from lmd.dashboard.search_figures import importance_figure, param_groups
from lmd.experiments.pictures import PICTURES_FILE as WRITTEN_PICTURES_FILE
from lmd.experiments.pictures import representative_trials
from lmd.experiments.results import (
    COMPUTE_COLUMNS,
    CONFIG_COLUMNS,
    PLACEMENT_COLUMNS,
    SCHEMA_KEY,
    interval,
    write_table,
)
from lmd.experiments.summary import crossing, summarize
from tests.browser import render

REPO = Path(__file__).resolve().parent.parent
ABLATION_FIGURES = {"fig-curves-flops", "fig-curves-samples", "fig-curves-wall", "fig-quality", "fig-time-to-target",
                    "fig-speedup", "fig-budget", "fig-schedules", "fig-cost"}
SEARCH_FIGURES = {"fig-curves-flops", "fig-curves-samples", "fig-curves-wall", "fig-schedules", "fig-history",
                  "fig-parallel", "fig-slice", "fig-cost", "fig-objective-flops"}  # + fANOVA's or the search's effects
ANSWER_FIGURES = {"fig-finalists", "fig-effects", "fig-pareto"}  # finalists.json, importances.json, pareto.json

# ------------------------------------------------------------------ a synthetic ablation with a known answer
# variant: patch size, tokens, steps, scheduler, final PSNR, final probe accuracy. Every trial spends BUDGET TFLOP.
VARIANTS = {"lmd_cosine": (1, 16, 40, "cosine", 14.0, 0.80), "pixel_mae": (4, 64, 10, "constant", 12.0, 0.70),
            "pixel_mae_equal_tokens": (8, 16, 40, "constant", 11.0, 0.60)}
BUDGET, EVALS, SEEDS = 1.6, 4, 3
REFERENCES = [  # the latent and the equal-token pixel variant share an 8-px patch grid, so their fills agree
    *({"reference": "fill", "variant": v, "metric": "val_psnr", "mean": m, "ci95": 0.0, "n": 1}
      for v, m in (("lmd_cosine", 10.5), ("pixel_mae", 10.0), ("pixel_mae_equal_tokens", 10.5))),
    *({"reference": "ceiling", "variant": v, "metric": "val_psnr", "mean": m, "ci95": 0.0, "n": 1}
      for v, m in (("lmd_cosine", 25.0), ("pixel_mae", 90.5), ("pixel_mae_equal_tokens", 90.5))),
    *({"reference": "raw_probe", "variant": v, "metric": "val_probe_acc", "mean": m, "ci95": 0.0, "n": 1}
      for v, m in (("lmd_cosine", 0.66), ("pixel_mae", 0.64), ("pixel_mae_equal_tokens", 0.64))),
    *({"reference": "random_probe", "variant": v, "metric": "val_probe_acc", "mean": m, "ci95": 0.03, "n": 3}
      for v, m in (("lmd_cosine", 0.55), ("pixel_mae", 0.50), ("pixel_mae_equal_tokens", 0.52))),
]


def synthetic_table(psnr_offsets: dict[str, list[float]] | None = None) -> pd.DataFrame:
    """Schema-3 rows: EVALS evaluations per trial; PSNR rises 6 dB to its final value (+ a per-seed offset)."""
    rows = []
    for variant, (patch, tokens, steps, scheduler, psnr_end, probe_end) in VARIANTS.items():
        for seed in range(SEEDS):
            offset = (psnr_offsets or {}).get(variant, [-0.45, 0.1, 0.35])[seed]  # mean 0: no exact ties
            for k in range(1, EVALS + 1):
                step, frac = steps * k // EVALS, k / EVALS
                seconds = 20.0 * frac * (1 + 0.1 * seed) * (0.5 if variant == "lmd_cosine" else 1.0)
                rows.append({
                    "trial_id": f"{variant}_s{seed}", "variant": variant, "seed": seed, "step": step,
                    "samples_seen": step * 64, "wall_seconds": seconds, "device_seconds": seconds, "loss": 1 - frac / 2,
                    "mask_ratio": 0.75, "lr": 1e-3, "val_masked_mse": 0.5 - 0.2 * frac,
                    "val_masked_mse_fixed": 0.5 - 0.2 * frac + 0.01 * seed,
                    "val_psnr": psnr_end - 6 * (1 - frac) + offset,
                    "train_flops": BUDGET * 1e12 * frac, "val_probe_acc": probe_end - 0.1 * (1 - frac) + 0.01 * seed,
                    "workers": 1, "num_nodes": 1, "scheduler": scheduler, "mask_start": 0.15, "mask_end": 0.75,
                    "mask_ramp": 0.67, "projector": "lmd-f8c4" if patch == 1 else "identity", "preset": "mini_p1",
                    "total_steps": steps, "patch_size": patch, "tokens": tokens})
    return pd.DataFrame(rows)


def _write(table: pd.DataFrame, path: Path, schema: bytes | None) -> Path:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({SCHEMA_KEY: schema} if schema is not None else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow, path)
    return path


def budget_record(tflops: dict[str, float] | None = None, budget_by: str = "flops") -> dict:
    variants = {v: {"steps": steps, "samples": steps * 64, "train_tflops": (tflops or {}).get(v, BUDGET),
                    "tokens": tokens, "patch_size": patch, "projector": "x", "about": ""}
                for v, (patch, tokens, steps, *_) in VARIANTS.items()}
    return {"budget_by": budget_by, "budget": BUDGET, "unit": "TFLOP", "variants": variants,
            "projector_encode_gflop_per_image": {"lmd-f8c4": 0.1204}, "note": "training FLOPs count the transformer"}


def write_experiment(root: Path, table: pd.DataFrame | None = None, schema: bytes | None = b"3",
                     references: bool = True, budget: dict | None = None) -> Path:
    """An ablation folder as tune/ablation.py leaves it, minus the pictures."""
    _write(synthetic_table() if table is None else table, root / "results.parquet", schema)
    (root / "args.json").write_text(json.dumps({"variants": list(VARIANTS), "seeds": SEEDS, "budget_by": "flops",
                                                "budget": BUDGET, "target_metric": "val_psnr"}))
    if references:
        (root / "references.json").write_text(json.dumps({"references": REFERENCES}))
    (root / "summary.json").write_text(json.dumps({"budget": budget or budget_record(), "variants": []}))
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_experiment(tmp_path_factory.mktemp("synthetic") / "ablation")


def _summary() -> pd.DataFrame:
    return summarize(synthetic_table(), "pixel_mae", "val_psnr", REFERENCES)


def _assert_rendered(page, expected: set[str]) -> None:
    assert page.errors == []
    assert expected <= set(page.figures), sorted(expected - set(page.figures))
    for fid in expected:
        fig = page.figures[fid]
        assert fig["traces"] > 0 and fig["points"] > 0, (fid, fig)  # drawn with data, not an empty div
        assert fig["width"] > 100 and fig["height"] > 100, (fid, fig)
    assert not page.screenshot_is_blank()


# ------------------------------------------------------------------ synthetic: what the figures must show
def test_synthetic_ablation_renders_every_panel_with_its_verdicts(synthetic, tmp_path):
    page = render(render_dashboard(synthetic, tmp_path / "dash.html"), tmp_path / "synthetic.png")
    _assert_rendered(page, ABLATION_FIGURES)
    assert "no references.json" not in page.text and "uses results schema" not in page.text
    # The verdicts of lmd.experiments.summary are listed under the table: the weak variant fails its fill.
    assert "pixel_mae_equal_tokens: held-out PSNR 11.00 dB does not beat the no-model fill" in page.text
    assert "FLOPs speedup" in page.text and "never reached the target" in page.text


def test_an_ablation_without_its_baseline_shows_no_time_to_target_and_says_why(tmp_path):
    table = synthetic_table()
    root = write_experiment(tmp_path / "ablation", table=table[table["variant"] != "pixel_mae"])
    keys = [panel.key for panel in build_panels(load_experiment(root))]
    assert "quality" in keys and "time-to-target" not in keys and "speedup" not in keys
    page = render(render_dashboard(root), tmp_path / "no-baseline.png")
    assert page.errors == [] and "nan" not in page.text.lower().replace("nanoseconds", "")
    assert "No time to target: the baseline pixel_mae has no finished trial with val_psnr" in page.text


def test_reference_lines_are_drawn_and_an_off_scale_ceiling_is_only_listed():
    fig = F.curves_figure(synthetic_table(), "train_flops", references=REFERENCES, target=12.0,
                          target_metric="val_psnr")
    traces = {t.name: t for t in fig.data}
    fill = traces["no-model fill 10.50 dB (lmd_cosine, pixel_mae_equal_tokens)"]  # one line for a shared value
    assert fill.line.dash == "dash" and set(fill.y) == {10.5} and fill.xaxis == "x"
    assert "no-model fill 10.00 dB (pixel_mae)" in traces
    assert traces["projector ceiling 25.00 dB (lmd_cosine)"].visible is not False
    pixel_ceiling = traces["projector ceiling 90.50 dB (pixel_mae, pixel_mae_equal_tokens), off scale"]
    assert pixel_ceiling.visible == "legendonly"
    drawn_psnr = [y for t in fig.data if t.xaxis == "x" and t.visible != "legendonly" for y in t.y]
    assert max(drawn_psnr) < 30  # the 90 dB pixel ceiling does not squash the PSNR panel
    probe_axis = traces["raw-input probe 0.660 (lmd_cosine)"].xaxis
    assert probe_axis == "x3" and traces["raw-input probe 0.640 (pixel_mae, pixel_mae_equal_tokens)"].xaxis == "x3"
    band = traces["random-encoder probe 0.550 ± 0.030 (lmd_cosine) 95%"]
    assert band.fill == "toself" and min(band.y) == pytest.approx(0.52) and max(band.y) == pytest.approx(0.58)
    target = traces["target 12 (pixel_mae's worst final)"]
    assert target.xaxis == "x" and set(target.y) == {12.0}
    # The x axis is in TFLOP: the last evaluation is at the budget.
    assert max(traces["lmd_cosine"].x) == pytest.approx(BUDGET)
    # The probe panel spans its accuracies and references (0.47-0.82 here) with a margin, not a flat 0-1 axis.
    assert list(fig.layout.yaxis3.range) == pytest.approx([0.47 - 0.055, 0.82 + 0.055])


def test_the_probe_range_holds_every_accuracy_and_reference_within_zero_and_one():
    table = pd.DataFrame({"val_probe_acc": [0.95, 0.99, math.nan]})
    refs = pd.DataFrame({"variant": ["a"], "random_probe_acc": [0.90], "random_probe_acc_ci95": [0.08],
                         "raw_probe_acc": [0.97]})
    low, high = F.probe_range(table, refs, target=0.96)
    assert low == pytest.approx(0.82 - 0.02 - 0.1 * (0.99 - 0.82)) and high == 1.0  # clipped at 1
    assert F.probe_range(pd.DataFrame({"val_probe_acc": [0.5]}), pd.DataFrame()) == pytest.approx([0.48, 0.52])


def test_curves_without_references_or_probe_draw_no_reference_lines():
    table = synthetic_table().drop(columns=["val_probe_acc"])
    fig = F.curves_figure(table, "samples_seen")
    assert len(fig.layout.annotations) == 2  # two subplot titles: no probe panel
    assert not [t.name for t in fig.data if re.match("no-model|projector|raw-input|random-encoder|target", t.name)]


def test_time_to_target_and_speedup_bars_are_asymmetric_and_never_below_zero():
    # Widely spread crossings (0.4, 1.0 and 1.3 TFLOP): a symmetric t-interval on the raw times reaches below zero.
    table = synthetic_table({"lmd_cosine": [4.0, 0.2, -0.9], "pixel_mae": [-0.6, 0.1, 0.5]})
    crossings = pd.Series([crossing(table[table["trial_id"] == f"lmd_cosine_s{s}"], "val_psnr", 12.0, "train_flops")
                           for s in range(SEEDS)]) / 1e12
    mean, half = interval(crossings)
    assert mean - half < 0
    summary = summarize(table, "pixel_mae", "val_psnr", REFERENCES)
    checked = 0
    for fig, cap in ((F.time_to_target_figure(summary), BUDGET), (F.speedup_figure(summary), math.inf)):
        for trace in (t for t in fig.data if t.error_y.array is not None):
            err = trace.error_y
            for y, plus, minus in zip(trace.y, err.array, err.arrayminus, strict=True):
                if y is None or math.isnan(y) or plus is None:
                    continue
                assert y - minus > 0 and plus >= 0
                checked += 1
                if y != 1.0:  # the baseline's own speedup is exactly 1 by definition
                    # Log-scale intervals: longer above than below, unless capped at the budget a seed spent.
                    assert plus > minus or y + plus == pytest.approx(cap)
    assert checked >= 4
    bars = F.time_to_target_figure(summary)
    lmd = list(bars.data[0].x).index("lmd_cosine")
    assert bars.data[0].y[lmd] - bars.data[0].error_y.arrayminus[lmd] > 0
    assert bars.layout.xaxis.ticktext[lmd] == "lmd_cosine<br>reached 3/3"
    assert F.asymmetric_errors(pd.Series([1.0]), pd.Series([-3.0]), pd.Series([2.0]))["arrayminus"] == [1.0]
    for fig in (bars, F.speedup_figure(summary)):  # said where the bar or marker would be
        never = next(t for t in fig.data if t.name == "never reached the target")
        assert list(never.x) == ["pixel_mae_equal_tokens"]


def test_speedup_panel_has_the_1x_and_3x_lines_and_the_flops_axis_first():
    fig = F.speedup_figure(_summary())
    shapes = {s.name: s for s in fig.layout.shapes}
    assert shapes["1x"].y0 == 1.0 and shapes["3x"].y0 == 3.0 and "paper" in shapes["3x"].label.text
    low, high = fig.layout.yaxis.range
    assert fig.layout.yaxis.type == "log" and low < 0 < math.log10(3) < high
    assert [t.name for t in fig.data][:3] == ["speedup in FLOPs", "speedup in samples", "speedup in wall seconds"]
    flops = dict(zip(fig.data[0].x, fig.data[0].y, strict=True))
    assert flops["lmd_cosine"] > 1 and flops["pixel_mae"] == 1.0


def test_quality_table_shows_the_references_and_the_verdicts():
    table = F.quality_table_figure(_summary()).data[0]
    columns = {name: list(values) for name, values in zip(table.header.values, table.cells.values, strict=True)}
    assert columns["variant"] == ["lmd_cosine", "pixel_mae", "pixel_mae_equal_tokens"]
    assert columns["fill dB"] == ["10.50", "10.00", "10.50"] and columns["ceiling dB"][0] == "25.00"
    assert columns["beats fill"] == ["yes", "yes", "no"]
    assert columns["random-encoder probe"][0] == "0.550 ± 0.030" and columns["raw-input probe"][1] == "0.640"
    assert columns["beats random"][0] == "yes" and columns["TFLOP spent"] == ["1.600"] * 3


def test_budget_panel_shows_equal_tflop():
    table = synthetic_table()
    for budget in (budget_record(), None):  # summary.json's record, or the trials' last rows without one
        rows = S.budget_rows(table, budget)
        bars = S.budget_figure(rows, budget).data[0]
        assert bars.name == "TFLOP per trial" and list(bars.y) == pytest.approx([BUDGET] * 3)
        assert S.spread(rows["tflops"]) == pytest.approx(0.0)
    caption = budget_caption(S.budget_rows(table, budget_record()), budget_record())
    assert "0.0% apart (equal in FLOPs up to whole steps)" in caption and "0.1204 GFLOP per image" in caption
    uneven = budget_record({"pixel_mae": 0.4}, budget_by="steps")
    caption = budget_caption(S.budget_rows(table, uneven), uneven)
    assert "300.0% apart" in caption and "not set in FLOPs" in caption


# ------------------------------------------------------------------ older, bad and empty results files
def test_older_schemas_render_with_notes_on_what_they_cannot_show(tmp_path):
    # Schema 1 (the first release) wrote no version and had no workers, config or compute columns.
    old = synthetic_table().drop(columns=PLACEMENT_COLUMNS + CONFIG_COLUMNS + COMPUTE_COLUMNS, errors="ignore")
    root = write_experiment(tmp_path / "old", old, schema=None, references=False)
    (root / "summary.json").write_text("[]")  # the summary of the first releases was a list of rows
    page = render(render_dashboard(root), tmp_path / "old.png")
    _assert_rendered(page, ABLATION_FIGURES - {"fig-curves-flops"})
    assert "fig-curves-flops" not in page.figures
    for note in ("results schema 1", "no train_flops column", "no val_probe_acc column", "no references.json",
                 "reconstructions are not shown", "samples to target"):
        assert note in page.text, note
    # Schema 2 had the config columns but no FLOPs or probe; it is read, with its own note.
    exp = load_experiment(write_experiment(tmp_path / "v2", synthetic_table().drop(columns=COMPUTE_COLUMNS), b"2"))
    assert exp.schema == 2 and not exp.has_flops and not exp.has_probe
    assert any("schema 2" in n and "no train_flops" in n for n in exp.notes)
    keys = [p.key for p in build_panels(exp)]
    assert [k for k in keys if k.startswith("curves-")] == ["curves-samples", "curves-wall"]  # no FLOPs curves
    assert keys.index("quality") < keys.index("curves-samples")  # the answer before the curves


def test_missing_columns_are_named(tmp_path):
    path = _write(synthetic_table().drop(columns=["val_psnr", "seed"]), tmp_path / "results.parquet", b"3")
    with pytest.raises(ResultsError, match=r"results.parquet: missing column\(s\) seed, val_psnr"):
        load_experiment(path)
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "dashboard.py"), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing column(s) seed, val_psnr" in proc.stderr


def test_newer_schema_and_non_parquet_files_are_refused(tmp_path):
    with pytest.raises(ResultsError, match="schema 99, newer than"):
        load_experiment(_write(synthetic_table(), tmp_path / "results.parquet", b"99"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.parquet").write_text("not parquet")
    with pytest.raises(ResultsError, match="junk/results.parquet: not a readable Parquet file"):
        load_experiment(tmp_path / "junk")
    with pytest.raises(ResultsError, match="no such results file"):
        load_experiment(tmp_path / "nowhere")


def test_empty_results_get_a_page_that_says_so(tmp_path):
    root = write_experiment(tmp_path / "empty", synthetic_table().iloc[:0])
    page = render(render_dashboard(root), tmp_path / "empty.png")
    assert page.errors == [] and page.figures == {}
    assert "no result rows yet" in page.text


def test_rendering_the_dashboard_needs_no_torch(synthetic, tmp_path):
    # Rendering, not only importing: the schedule panel evaluates the mask schedules (pure Python).
    code = ("import sys; from lmd.dashboard.page import render_dashboard; "
            f"render_dashboard({str(synthetic)!r}, {str(tmp_path / 'page.html')!r}); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.stdout.strip() == "False", proc.stderr
    assert (tmp_path / "page.html").stat().st_size > 100_000
    assert PICTURES_FILE == WRITTEN_PICTURES_FILE  # spelt out in load.py so that it need not import pictures


# ------------------------------------------------------------------ searches
def _search_folder(root: Path, metric: str | None) -> Path:
    """A search as tune/search.py left it before the finalist phase (results schema 3): per-trial rows (variant =
    scheduler), args.json, an Optuna journal."""
    table = synthetic_table()
    table["variant"] = table["scheduler"]
    _write(table, root / "results.parquet", b"3")
    (root / "args.json").write_text(json.dumps({"samples": 3, "name": "search", **({"metric": metric} if metric
                                                                                     else {})}))
    return _write_journal(root)


def _write_journal(root: Path) -> Path:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name="search", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(root / "optuna.journal"))))
    dists = {"scheduler": optuna.distributions.CategoricalDistribution(["constant", "cosine"]),
             "mask_end": optuna.distributions.FloatDistribution(0.5, 0.9)}
    for i, (scheduler, end) in enumerate([("cosine", 0.6), ("constant", 0.7), ("cosine", 0.8)]):
        study.add_trial(optuna.trial.create_trial(params={"scheduler": scheduler, "mask_end": end}, distributions=dists,
                                                  value=0.5 + 0.1 * i))
    return root


@pytest.mark.parametrize(("metric", "label"), [("val_probe_acc", "held-out linear-probe accuracy"),
                                               ("val_psnr", "held-out PSNR (dB)"),
                                               (None, "held-out PSNR (dB)")])  # before --metric: PSNR
def test_search_objective_is_named_after_args_metric(tmp_path, metric, label):
    exp = load_experiment(_search_folder(tmp_path / "search", metric))
    assert exp.kind == "search" and exp.study is not None
    panels = {p.key: p for p in build_panels(exp)}
    assert "time-to-target" not in panels and "budget" not in panels  # a search has no baseline or budget
    assert panels["history"].figure.layout.yaxis.title.text == label
    assert panels["slice"].figure.layout.yaxis.title.text == label
    assert panels["parallel"].figure.data[0].dimensions[-1].label == label  # the table's, the objective last
    assert label in panels["history"].caption and label in panels["slice"].caption
    other = "held-out PSNR (dB)" if "probe" in label else "linear-probe"
    assert other not in panels["history"].caption + panels["slice"].caption


def test_a_search_table_without_its_journal_is_still_read_as_a_search(tmp_path):
    table = synthetic_table()
    table["variant"] = table["scheduler"]
    exp = load_experiment(_write(table, tmp_path / "results.parquet", b"3"))
    assert exp.kind == "search" and exp.study is None
    assert any("optuna.journal" in note for note in exp.notes)


def test_representative_trial_is_the_median_seed():
    rows = [{"trial_id": f"t{i}", "variant": "v", "step": 10, "val_psnr": psnr} for i, psnr in
            enumerate([14.0, 12.0, 13.0])]
    table = pd.DataFrame(rows)
    assert representative_trials(table) == {"v": "t2"}
    assert representative_trials(table, pick="best") == {"v": "t0"}


def test_conditional_parameters_are_grouped_with_the_trials_that_have_them():
    cat = optuna.distributions.CategoricalDistribution(["constant", "cosine"])
    flt = optuna.distributions.FloatDistribution(0.0, 1.0)

    def trial(scheduler: str, end: float, start: float | None) -> optuna.trial.FrozenTrial:
        params, dists = {"scheduler": scheduler, "mask_end": end}, {"scheduler": cat, "mask_end": flt}
        if start is not None:
            params["mask_start"], dists["mask_start"] = start, flt
        return optuna.trial.create_trial(params=params, distributions=dists, value=end)

    trials = [trial("constant", 0.6, None), trial("cosine", 0.7, 0.1), trial("cosine", 0.8, 0.2)]
    groups = param_groups(trials)
    assert groups[0] == (["mask_end", "scheduler"], trials)
    assert groups[1] == (["mask_start"], trials[1:])


def test_conditional_importances_are_a_separate_fit_over_the_trials_that_have_them():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        scheduler = trial.suggest_categorical("scheduler", ["constant", "cosine"])
        end = trial.suggest_float("mask_end", 0.5, 0.9)
        start = trial.suggest_float("mask_start", 0.05, 0.4) if scheduler != "constant" else 0.0
        return 10 * end + start

    study.optimize(objective, n_trials=16)
    fig = importance_figure(study)
    series = {trace.name: dict(zip(trace.y, trace.x, strict=True)) for trace in fig.data}
    everyone = next(v for k, v in series.items() if k.startswith("over all 16"))
    with_start = next(v for k, v in series.items() if "with mask_start" in k)
    assert set(everyone) == {"scheduler", "mask_end"} and set(with_start) == {"scheduler", "mask_end", "mask_start"}
    assert sum(everyone.values()) == pytest.approx(1) and sum(with_start.values()) == pytest.approx(1)
    assert everyone["mask_end"] > everyone["scheduler"]  # the objective is driven by the final ratio


# ------------------------------------------------------------------ a search with its answer (results schema 4)
# trial: scheduler, mask_end, depth, decoder_depth, lr, encoder GFLOP/image, final PSNR, step ASHA stopped it at.
SEARCH_TRIALS = {"cosine_a": ("cosine", 0.80, 2, 1, 1e-3, 0.012, 15.2, None),
                 "cosine_b": ("cosine", 0.70, 4, 2, 3e-4, 0.024, 15.6, None),
                 "uniform_a": ("uniform", 0.60, 1, 1, 2e-3, 0.006, 14.1, None),
                 "piecewise_a": ("piecewise", 0.85, 3, 1, 5e-4, 0.018, 14.9, None),
                 "uniform_stopped": ("uniform", 0.55, 2, 2, 1e-3, 0.012, 12.0, 20)}
SEARCH_STEPS, SEARCH_EVAL = 40, 10
# (gflops, PSNR) of the finished trials: cheaper and better than piecewise_a, cosine_a dominates it.
FRONT, DOMINATED = ["uniform_a", "cosine_a", "cosine_b"], ["piecewise_a"]
ANSWER = ("finalist_1 (cosine 0.70, depth 4/2, lr 0.0003) is not separable from the paper's configuration on "
          "val_psnr: +0.30 dB [-0.10, +0.70] over 3 fresh seeds")
FINALIST_SEEDS = [100, 101, 102]


def search_table() -> pd.DataFrame:
    """Schema-4 rows of a search: each trial's sampled values on every row, training FLOPs per step growing with
    depth, an evaluation every SEARCH_EVAL steps; uniform_stopped ends at step 20 of 40 (ASHA stopped it)."""
    rows = []
    for trial_id, (scheduler, end, depth, dec, lr, gflops, psnr, stop) in SEARCH_TRIALS.items():
        for step in range(SEARCH_EVAL, (stop or SEARCH_STEPS) + 1, SEARCH_EVAL):
            frac = step / SEARCH_STEPS
            rows.append({"trial_id": trial_id, "variant": scheduler, "seed": 0, "step": step, "samples_seen": step * 8,
                         "wall_seconds": float(step), "device_seconds": float(step), "loss": 1 - frac / 2,
                         "mask_ratio": end, "lr": lr, "val_masked_mse": 0.4, "val_masked_mse_fixed": 0.4,
                         "val_psnr": psnr - 3 * (1 - frac), "train_flops": step * (0.01 + 0.005 * depth) * 1e12,
                         "val_probe_acc": 0.7 + 0.05 * frac, "workers": 1, "num_nodes": 1, "scheduler": scheduler,
                         "mask_start": 0.2, "mask_end": end, "mask_ramp": 0.6, "projector": "lmd-f8c4",
                         "preset": "mini_p1", "total_steps": SEARCH_STEPS, "patch_size": 1, "tokens": 16,
                         "depth": depth, "decoder_depth": dec, "peak_lr": lr, "encoder_gflops": gflops})
    return pd.DataFrame(rows)


def _seed_stats(values: list[float]) -> dict:
    mean, half = interval(pd.Series(values, dtype=float))
    return {"mean": mean, "ci95": half, "values": values}


def finalists_record() -> dict:
    """finalists.json: two finalists (the second with one seed: no interval, no probe, a reference missing) and the
    paper's configuration, listed last as the search writes it."""
    refs = {"fill_psnr": 11.6, "ceiling_psnr": 26.2, "raw_probe_acc": 0.70, "random_probe_acc": 0.66,
            "random_probe_acc_ci95": 0.02}

    def row(name: str, rank: int | None, trial: str | None, psnr: list[float], probe: list[float] | None,
            vs: dict | None, references: dict) -> dict:
        scheduler, end, depth, dec, lr, gflops, search, _ = SEARCH_TRIALS.get(trial, ("cosine", 0.75, 2, 1, 1e-3,
                                                                                      0.012, None, None))
        return {"name": name, "rank": rank, "source_trial": trial, "search_value": search if trial else None,
                "params": {"scheduler": scheduler, "mask_start": 0.2, "mask_end": end, "mask_ramp": 0.6,
                           "depth": depth, "decoder_depth": dec, "lr": lr},
                "encoder_gflops": gflops, "train_tflops": 1.6, "n": len(psnr),
                "trial_ids": [f"{name}_s{s}" for s in FINALIST_SEEDS[:len(psnr)]], "val_psnr": _seed_stats(psnr),
                "val_probe_acc": _seed_stats(probe) if probe else None, "references": references,
                "beats": {"fill_psnr": "yes", "random_probe_acc": "yes", "raw_probe_acc": "no"} if probe else {},
                "vs_paper": vs}

    return {"metric": "val_psnr", "heldout": "confirm", "seeds": FINALIST_SEEDS, "paper": "paper_default",
            "budget": {"budget_by": "flops", "budget": 1.6, "unit": "TFLOP"}, "answer": ANSWER, "finalists": [
                row("finalist_1", 1, "cosine_b", [15.3, 15.4, 15.6], [0.78, 0.79, 0.80],
                    {"metric": "val_psnr", "diff": 0.3, "lo": -0.1, "hi": 0.7, "verdict": "not separable"}, refs),
                row("finalist_2", 2, "cosine_a", [14.2], None,
                    {"metric": "val_psnr", "diff": -0.93, "lo": math.nan, "hi": math.nan, "verdict": "not separable"},
                    {"fill_psnr": 11.6, "ceiling_psnr": None}),
                row("paper_default", None, None, [15.0, 15.1, 15.3], [0.76, 0.77, 0.78], None, refs)]}


def pareto_record() -> dict:
    def point(trial_id: str) -> dict:
        scheduler, end, depth, dec, lr, gflops, psnr, _ = SEARCH_TRIALS[trial_id]
        return {"trial_id": trial_id, "params": {"scheduler": scheduler, "mask_end": end, "depth": depth},
                "val_psnr": psnr, "encoder_gflops": gflops}

    return {"objectives": [{"name": "val_psnr", "mode": "max"}, {"name": "encoder_gflops", "mode": "min"}],
            "front": [point(t) for t in FRONT], "others": [point(t) for t in DOMINATED]}


IMPORTANCES = {"evaluator": "PedAnovaImportanceEvaluator", "objective": "val_psnr", "trials": 4, "seed_spread": 0.25,
               "importances": {"scheduler": {"importance": 0.41, "effect": 0.9},
                               "depth": {"importance": 0.3, "effect": 0.6},
                               "mask_end": {"importance": 0.2, "effect": 0.1},  # below the seed noise
                               "lr": {"importance": 0.05, "effect": None}}}


def write_search(root: Path, answer: bool = True, journal: bool = True) -> Path:
    """A search folder as tune/search.py leaves it from results schema 4: the table (written by the writer itself),
    args.json, and with `answer` finalists.json, pareto.json and importances.json."""
    root.mkdir(parents=True, exist_ok=True)
    write_table(search_table(), root / "results.parquet")
    (root / "args.json").write_text(json.dumps({"samples": 5, "name": "search", "metric": "val_psnr",
                                                "budget_by": "flops", "budget": 1.6, "objectives": answer}))
    if answer:
        (root / FINALISTS_FILE).write_text(json.dumps(finalists_record()))  # NaN intervals as JSON's NaN
        (root / PARETO_FILE).write_text(json.dumps(pareto_record()))
        (root / IMPORTANCES_FILE).write_text(json.dumps(IMPORTANCES))
    return _write_journal(root) if journal else root


@pytest.fixture(scope="module")
def answered_search(tmp_path_factory) -> Path:
    return write_search(tmp_path_factory.mktemp("answered") / "search")


def test_a_search_with_its_answer_renders_every_new_panel_with_the_answer_on_top(answered_search, tmp_path):
    path = render_dashboard(answered_search, tmp_path / "search.html")
    page = render(path, tmp_path / "answered.png")
    _assert_rendered(page, SEARCH_FIGURES | ANSWER_FIGURES)
    # The search's own importances replace fANOVA's on the journal, the table's parallel coordinates the journal's.
    assert "fig-importance" not in page.figures
    assert len(re.findall(r"id=\"fig-parallel\"", path.read_text())) == 1
    assert f"Answer: {ANSWER}" in page.text
    assert page.text.index(ANSWER) < page.text.index("The answer: finalists against")  # above every panel
    assert "uniform_stopped, stopped early" in page.text  # the stopped trial, named as stopped in the legend
    assert not [n for n in ("no finalists.json", "no pareto.json", "no importances.json") if n in page.text]
    # The verdicts in words, in the table under the finalists' figure: the paper first, as the reference.
    table = re.search(r"<table class='finalists' id='finalists-table'>(.*?)</table>", path.read_text(), re.S)
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)[1:]
    assert [re.search(r"<td>(.*?)</td>", r).group(1) for r in rows] == [
        "paper_default (the paper&#x27;s)", "finalist_1", "finalist_2"]
    assert "(the reference)" in rows[0] and "+0.30 dB [-0.10, +0.70]: not separable" in rows[1]
    assert "-0.93 dB: not separable" in rows[2] and "14.20 (one seed: no interval)" in rows[2]


def _panels(root: Path) -> dict:
    return {p.key: p for p in build_panels(load_experiment(root))}


def test_stopped_trials_are_marked_as_stopped_on_the_flops_axis(answered_search):
    panel = _panels(answered_search)["objective-flops"]
    traces = {t.name: t for t in panel.figure.data}
    stopped = traces["uniform · uniform_stopped, stopped early"]
    assert stopped.line.dash == "dash" and "stopped early at step 20 of 40" in stopped.hovertext
    marks = traces["stopped early by ASHA (1)"]
    assert marks.marker.symbol == "x" and list(marks.x) == pytest.approx([stopped.x[-1]]) and len(stopped.x) == 2
    assert {t.line.dash for t in panel.figure.data if "stopped" not in t.name} == {"solid"}
    ends = {t.hovertext: max(t.x) for t in panel.figure.data if isinstance(t.hovertext, str)}
    assert ends["cosine_a (cosine)"] == pytest.approx(SEARCH_STEPS * 0.02)  # TFLOP: depth 2, 0.02 TFLOP a step
    assert ends["cosine_b (cosine)"] == pytest.approx(SEARCH_STEPS * 0.03)
    assert "rungs are in training FLOPs" in panel.caption and "1 of 5 trials were stopped early" in panel.caption
    assert panel.figure.layout.shapes[0].x0 == 1.6  # args.json's budget, in TFLOP under --budget-by flops


def test_only_the_front_is_drawn_as_the_front(answered_search):
    traces = {t.name: t for t in _panels(answered_search)["pareto"].figure.data}
    gflops = {t: SEARCH_TRIALS[t][5] for t in SEARCH_TRIALS}
    front = traces["Pareto front (3 trials)"]
    assert list(front.x) == [gflops[t] for t in FRONT] and front.mode == "lines+markers"  # joined, by cost
    assert list(front.y) == [SEARCH_TRIALS[t][6] for t in FRONT] and front.line.shape == "hv"
    dominated = traces["dominated trials (1)"]
    assert list(dominated.x) == [gflops[t] for t in DOMINATED]
    assert dominated.opacity < 0.5 and dominated.mode == "markers"


def test_parallel_coordinates_come_from_the_table_and_leave_out_stopped_trials(answered_search):
    for root in (answered_search, write_search(answered_search.parent / "no-journal", journal=False)):
        parcoords = _panels(root)["parallel"].figure.data[0]
        labels = [d.label for d in parcoords.dimensions]
        assert labels == ["scheduler", "mask_end", "mask_start", "mask_ramp", "depth", "decoder_depth",
                          "lr (log scale)", "held-out PSNR (dB)"]
        scheduler = parcoords.dimensions[0]
        assert list(scheduler.ticktext) == ["cosine", "piecewise", "uniform"] and len(scheduler.values) == 4
        assert sorted(parcoords.dimensions[-1].values) == sorted(SEARCH_TRIALS[t][6] for t in FRONT + DOMINATED)


def test_effects_are_drawn_beside_the_seed_noise(answered_search):
    panel = _panels(answered_search)["effects"]
    bars = panel.figure.data[0]
    assert list(bars.x) == ["scheduler", "depth", "mask_end"] and list(bars.y) == [0.9, 0.6, 0.1]
    assert bars.text[0] == "importance 0.41"
    assert bars.marker.color[2] != bars.marker.color[0]  # below the line: drawn apart
    noise = next(s for s in panel.figure.layout.shapes if s.name == "seed noise")
    assert noise.y0 == noise.y1 == 0.25
    assert "no effect estimated (too few levels): lr" in panel.figure.layout.annotations[0].text
    assert "moves the objective less than a change of seed" in panel.caption


def test_finalists_are_drawn_with_intervals_references_and_verdicts(answered_search):
    panel = _panels(answered_search)["finalists"]
    traces = [t for t in panel.figure.data]
    means = [t for t in traces if t.name == "mean ± 95% CI over seeds"]
    assert [t.xaxis for t in means] == ["x", "x2"]  # the objective, then the probe
    psnr, probe = means
    assert list(psnr.y) == pytest.approx([15.133, 15.433, 14.2], abs=1e-3)  # the paper first
    assert psnr.error_y.array[0] == pytest.approx(interval(pd.Series([15.0, 15.1, 15.3]))[1])
    assert psnr.error_y.array[2] is None and probe.y[2] is None  # one seed: no interval; no probe
    names = {t.name: t for t in traces}
    fill = names["no-model fill 11.60 dB"]
    assert fill.xaxis == "x" and [x for x in fill.x if x is not None] == pytest.approx([-0.4, 0.4, 0.6, 1.4, 1.6, 2.4])
    # 26.2 dB: further above the intervals than the span of the intervals and fills (11.6-15.8 dB), so listed only.
    ceiling = names["projector ceiling 26.20 dB, off scale"]
    assert ceiling.visible == "legendonly"
    assert [x for x in ceiling.x if x is not None] == pytest.approx([-0.4, 0.4, 0.6, 1.4])  # finalist_2's is null
    assert names["random-encoder probe 0.660"].xaxis == "x2"
    assert len([s for s in panel.figure.layout.shapes if s.name == "random-encoder probe 95%"]) == 2
    assert list(names["verdict against the paper"].text) == ["not separable vs paper"] * 2
    assert "3 fresh seeds (100, 101, 102)" in panel.caption and "'confirm'" in unescape(panel.caption)


def _broken(mutate) -> dict:
    record = finalists_record()
    mutate(record)
    return record


@pytest.mark.parametrize(("file", "payload", "field"), [
    (FINALISTS_FILE, _broken(lambda r: r["finalists"][0]["vs_paper"].update(verdict="maybe")),
     r"finalists\[0\]\.vs_paper\.verdict='maybe'"),
    (FINALISTS_FILE, _broken(lambda r: r["finalists"][1]["val_psnr"].update(ci95="wide")),
     r"finalists\[1\]\.val_psnr\.ci95='wide': expected a JSON number or null"),
    (FINALISTS_FILE, _broken(lambda r: r.pop("answer")), "answer missing"),
    (FINALISTS_FILE, _broken(lambda r: r["finalists"][2].update(n=True)), r"finalists\[2\]\.n=True"),
    (FINALISTS_FILE, _broken(lambda r: r.update(paper="mae")), "paper='mae': no configuration"),
    (FINALISTS_FILE, [1, 2], "is not a JSON object"),
    (PARETO_FILE, {**pareto_record(), "front": [{"trial_id": "t", "val_psnr": 1.0}]},
     r"front\[0\]\.encoder_gflops missing"),
    (IMPORTANCES_FILE, {**IMPORTANCES, "importances": {"depth": {"importance": 0.3, "effect": "big"}}},
     r"importances\.depth\.effect='big'"),
])
def test_malformed_search_records_are_refused_naming_the_file_and_field(tmp_path, file, payload, field):
    root = write_search(tmp_path / "search", journal=False)
    (root / file).write_text(json.dumps(payload))
    with pytest.raises(ResultsError, match=f"{re.escape(file)}: .*{field}" if "is not" not in field else field):
        load_experiment(root)
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "dashboard.py"), str(root)], capture_output=True,
                          text=True, timeout=120) if file == FINALISTS_FILE and "verdict" in field else None
    assert proc is None or (proc.returncode == 2 and file in proc.stderr and "vs_paper.verdict" in proc.stderr)


def test_a_search_without_the_new_files_still_renders_and_says_what_it_lacks(tmp_path):
    for root, schema in ((write_search(tmp_path / "v4", answer=False), None),
                         (_search_folder(tmp_path / "v3", "val_psnr"), 3)):  # before the sampled columns
        exp = load_experiment(root)
        assert exp.finalists is None and exp.pareto is None and exp.importances is None
        assert schema is None or exp.schema == schema
        page = render(render_dashboard(root, tmp_path / f"{root.name}.html"), tmp_path / f"{root.name}.png")
        _assert_rendered(page, SEARCH_FIGURES | {"fig-importance"})  # fANOVA's on the journal instead
        assert not ANSWER_FIGURES & set(page.figures) and "Answer:" not in page.text
        for note in ("no finalists.json", "no pareto.json", "no importances.json"):
            assert note in page.text, note
        assert ("the parallel coordinates show the mask schedule only" in page.text) == (schema == 3)
    # Schema 3's lr is the learning rate at the row's step, not a sampled value: no lr axis.
    labels = [d.label for d in _panels(tmp_path / "v3")["parallel"].figure.data[0].dimensions]
    assert labels == ["scheduler", "mask_end", "mask_start", "mask_ramp", "held-out PSNR (dB)"]


def test_schema_4_tables_are_read_whatever_this_checkout_writes(tmp_path):
    for schema in (b"3", b"4"):
        root = tmp_path / schema.decode()
        _write(search_table(), root / "results.parquet", schema)
        assert load_experiment(root).schema == int(schema)
    with pytest.raises(ResultsError, match="column 'depth' holds .* expected whole numbers"):
        load_experiment(_write(search_table().assign(depth=2.5), tmp_path / "bad" / "results.parquet", b"4"))


# ------------------------------------------------------------------ real runs (session fixtures of conftest)
def test_ablation_dashboard_renders_every_panel_with_data(ablation_run, tmp_path):
    proc, experiment = ablation_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (experiment / "dashboard.html").read_text()
    # Self-contained, works offline: no script, stylesheet or image is fetched from anywhere.
    assert not re.findall(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", html)
    page = render(experiment / "dashboard.html", tmp_path / "ablation.png")
    _assert_rendered(page, ABLATION_FIGURES)
    # Pictures: 4 originals, then a masked input and a reconstruction per variant and image, all decoded.
    assert len(page.images) == 4 + 2 * 2 * 4 and all(i["naturalWidth"] > 0 for i in page.images)
    for variant in ("lmd_cosine", "pixel_mae"):
        assert variant in page.text
    assert "target" in page.text and "speedup" in page.text.lower() and "no references.json" not in page.text
    assert "no-model fill" in page.text and "random-encoder probe" in page.text  # legends: SVG text counts
    # Each variant's schedule drawn from its config (21 points over the 20 steps), not only the recorded ratios (2
    # evaluations; lmd_cosine also logs step 10, its first evaluation being earlier at equal FLOPs).
    assert sorted(page.figures["fig-schedules"]["trace_points"]) == [2, 3, 21, 21]


def test_search_dashboard_renders_the_study_panels(search_run, tmp_path):
    proc, experiment = search_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = render(experiment / "dashboard.html", tmp_path / "search.png")
    written = {f"fig-{key}" for key, file in (("finalists", FINALISTS_FILE), ("effects", IMPORTANCES_FILE),
                                              ("pareto", PARETO_FILE)) if (experiment / file).is_file()}
    _assert_rendered(page, SEARCH_FIGURES | written)
    assert ("fig-importance" in page.figures) != ("fig-effects" in page.figures)  # the search's or fANOVA's
    if (experiment / FINALISTS_FILE).is_file():
        assert json.loads((experiment / FINALISTS_FILE).read_text())["answer"] in page.text
    assert "Reconstructions" in page.text and page.images and all(i["naturalWidth"] > 0 for i in page.images)
    assert "fig-time-to-target" not in page.figures  # a search has no pixel-MAE baseline
    assert max(page.figures["fig-history"]["trace_points"]) == 4  # the objective of every completed trial
    # One schedule line per trial (one point a step: equal-FLOP trials differ in steps) besides the 2 recorded circles.
    assert sorted(page.figures["fig-schedules"]["trace_points"])[:4] == [2] * 4
    assert len([n for n in page.figures["fig-schedules"]["trace_points"] if n > 2]) == 4
    metric = json.loads((experiment / "args.json").read_text()).get("metric", "val_psnr")
    assert {"val_probe_acc": "held-out linear-probe accuracy", "val_psnr": "held-out PSNR (dB)"}[metric] in page.text
    # each scheduler's best-trial references (references.json) drawn as lines, and the caption says whose they are
    assert "no-model fill" in page.text and "random-encoder probe" in page.text  # legends: SVG text counts
    assert "A search's references are each scheduler's" in page.text


def test_cli_writes_a_page_to_out_and_reads_results_only(ablation_run, tmp_path):
    _, experiment = ablation_run
    before = {p: p.stat().st_mtime_ns for p in experiment.rglob("*") if p.is_file()}
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "dashboard.py"), str(experiment / "results.parquet"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1_000_000  # plotly.js is inside
    assert {p: p.stat().st_mtime_ns for p in experiment.rglob("*") if p.is_file()} == before
