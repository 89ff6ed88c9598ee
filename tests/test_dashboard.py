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
from pathlib import Path

import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmd.dashboard import ResultsError, load_experiment, render_dashboard
from lmd.dashboard import figures as F
from lmd.dashboard import spend as S
from lmd.dashboard.load import PICTURES_FILE
from lmd.dashboard.page import budget_caption, build_panels
from lmd.dashboard.search_figures import importance_figure, param_groups
from lmd.experiments.pictures import PICTURES_FILE as WRITTEN_PICTURES_FILE
from lmd.experiments.pictures import representative_trials
from lmd.experiments.results import COMPUTE_COLUMNS, CONFIG_COLUMNS, PLACEMENT_COLUMNS, SCHEMA_KEY, interval
from lmd.experiments.summary import crossing, summarize
from tests.browser import render

REPO = Path(__file__).resolve().parent.parent
ABLATION_FIGURES = {"fig-curves-flops", "fig-curves-samples", "fig-curves-wall", "fig-quality", "fig-time-to-target",
                    "fig-speedup", "fig-budget", "fig-schedules", "fig-cost"}
SEARCH_FIGURES = {"fig-curves-flops", "fig-curves-samples", "fig-curves-wall", "fig-schedules", "fig-history",
                  "fig-importance", "fig-parallel", "fig-slice", "fig-cost"}

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
    old = synthetic_table().drop(columns=PLACEMENT_COLUMNS + CONFIG_COLUMNS + COMPUTE_COLUMNS)
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
    assert [p.key for p in build_panels(exp)][:2] == ["curves-samples", "curves-wall"]


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
    """A search as tune/search.py leaves it: per-trial rows (variant = scheduler), args.json, an Optuna journal."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    table = synthetic_table()
    table["variant"] = table["scheduler"]
    _write(table, root / "results.parquet", b"3")
    (root / "args.json").write_text(json.dumps({"samples": 3, "name": "search", **({"metric": metric} if metric
                                                                                     else {})}))
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
    assert panels["parallel"].figure.layout.xaxis.ticktext[0] == label  # the objective's axis comes first
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
    _assert_rendered(page, SEARCH_FIGURES)
    assert "Reconstructions" in page.text and page.images and all(i["naturalWidth"] > 0 for i in page.images)
    assert "fig-time-to-target" not in page.figures  # a search has no pixel-MAE baseline
    assert max(page.figures["fig-history"]["trace_points"]) == 4  # the objective of every completed trial
    # One schedule line per trial (21 points over 20 steps) besides the recorded circles.
    assert sorted(page.figures["fig-schedules"]["trace_points"]).count(21) == 4
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
