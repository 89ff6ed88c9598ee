"""Dashboards of real experiment results, rendered in headless Chromium; bad and old results files."""

from __future__ import annotations

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
from lmd.dashboard.search_figures import importance_figure, param_groups
from lmd.experiments.pictures import representative_trials
from lmd.experiments.results import CONFIG_COLUMNS, PLACEMENT_COLUMNS, SCHEMA_KEY
from tests.browser import render

REPO = Path(__file__).resolve().parent.parent
ABLATION_FIGURES = {"fig-curves-samples", "fig-curves-wall", "fig-quality", "fig-time-to-target", "fig-schedules",
                    "fig-cost"}
SEARCH_FIGURES = {"fig-curves-samples", "fig-curves-wall", "fig-schedules", "fig-history", "fig-importance",
                  "fig-parallel", "fig-slice", "fig-cost"}


def _assert_rendered(page, expected: set[str]) -> None:
    assert page.errors == []
    assert expected <= set(page.figures), sorted(expected - set(page.figures))
    for fid in expected:
        fig = page.figures[fid]
        assert fig["traces"] > 0 and fig["points"] > 0, (fid, fig)  # drawn with data, not an empty div
        assert fig["width"] > 100 and fig["height"] > 100, (fid, fig)
    assert not page.screenshot_is_blank()


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
    assert "target" in page.text and "speedup" in page.text
    # Each variant's schedule drawn from its config (21 points over the 20 steps), not only the 2 recorded ratios.
    assert sorted(page.figures["fig-schedules"]["trace_points"]) == [2, 2, 21, 21]


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


def test_cli_writes_a_page_to_out_and_reads_results_only(ablation_run, tmp_path):
    _, experiment = ablation_run
    before = {p: p.stat().st_mtime_ns for p in experiment.rglob("*") if p.is_file()}
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "dashboard.py"), str(experiment / "results.parquet"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1_000_000  # plotly.js is inside
    assert {p: p.stat().st_mtime_ns for p in experiment.rglob("*") if p.is_file()} == before


def _write(table: pd.DataFrame, path: Path, schema: bytes | None) -> Path:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({SCHEMA_KEY: schema} if schema is not None else {})
    pq.write_table(arrow, path)
    return path


def _results(ablation_run) -> pd.DataFrame:
    return pd.read_parquet(ablation_run[1] / "results.parquet")


def test_missing_columns_are_named(ablation_run, tmp_path):
    path = _write(_results(ablation_run).drop(columns=["val_psnr", "seed"]), tmp_path / "results.parquet", b"2")
    with pytest.raises(ResultsError, match=r"results.parquet: missing column\(s\) seed, val_psnr"):
        load_experiment(path)
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "dashboard.py"), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing column(s) seed, val_psnr" in proc.stderr


def test_newer_schema_and_non_parquet_files_are_refused(ablation_run, tmp_path):
    with pytest.raises(ResultsError, match="schema 99, newer than"):
        load_experiment(_write(_results(ablation_run), tmp_path / "results.parquet", b"99"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.parquet").write_text("not parquet")
    with pytest.raises(ResultsError, match="junk/results.parquet: not a readable Parquet file"):
        load_experiment(tmp_path / "junk")
    with pytest.raises(ResultsError, match="no such results file"):
        load_experiment(tmp_path / "nowhere")


def test_older_schema_renders_with_a_note(ablation_run, tmp_path):
    # Schema 1 (the first release) wrote no version and had no workers or config columns.
    old = _results(ablation_run).drop(columns=PLACEMENT_COLUMNS + CONFIG_COLUMNS)
    _write(old, tmp_path / "results.parquet", None)
    page_path = render_dashboard(tmp_path)
    page = render(page_path, tmp_path / "old.png")
    _assert_rendered(page, ABLATION_FIGURES)
    assert "results schema 1" in page.text and "reconstructions are not shown" in page.text


def test_empty_results_get_a_page_that_says_so(ablation_run, tmp_path):
    _write(_results(ablation_run).iloc[:0], tmp_path / "results.parquet", b"2")
    page = render(render_dashboard(tmp_path), tmp_path / "empty.png")
    assert page.errors == [] and page.figures == {}
    assert "no result rows yet" in page.text


def test_representative_trial_is_the_median_seed():
    rows = [{"trial_id": f"t{i}", "variant": "v", "step": 10, "val_psnr": psnr} for i, psnr in
            enumerate([14.0, 12.0, 13.0])]
    table = pd.DataFrame(rows)
    assert representative_trials(table) == {"v": "t2"}
    assert representative_trials(table, pick="best") == {"v": "t0"}


def test_a_search_table_without_its_journal_is_still_read_as_a_search(search_run, tmp_path):
    table = pd.read_parquet(search_run[1] / "results.parquet")
    _write(table, tmp_path / "results.parquet", b"2")
    exp = load_experiment(tmp_path)
    assert exp.kind == "search" and exp.study is None
    assert any("optuna.journal" in note for note in exp.notes)


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
