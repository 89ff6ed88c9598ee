"""One self-contained HTML page per experiment: Plotly's JS inlined once, every figure a <div>.

An ablation's page answers its question in order: curves against training FLOPs (the equal-compute
axis), samples and wall seconds next to the references; final quality against the references with
the verdicts of lmd.experiments.summary; time-to-target and speedup against pixel MAE at 1x and the
claimed 3x; and the budget each variant was given. A search's page names its own objective
(args.json's "metric"). The page works offline (no CDN, no MathJax), so it can be mailed or opened
on a cluster head node. Each panel has a stable element id (`fig-...`), which the browser tests
look for.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from lmd.dashboard import figures, finalists, search_figures, spend
from lmd.dashboard.load import Experiment, ResultsError, load_experiment
from lmd.experiments.summary import TARGET_METRICS, no_target, summarize, verdicts
from lmd.io import replaces_only, write_text_atomic

log = logging.getLogger(__name__)

DASHBOARD_FILE = "dashboard.html"
HTML_MAGIC = b"<!DOCTYPE html>"  # how every page this module writes starts: the only kind it may replace
CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 16px 24px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 6px 0; }
.caption { color: #555; font-size: 0.92em; margin: 0.2em 0 0.6em; }
.empty { font-size: 1.2em; padding: 24px; background: #f4f4f4; border-radius: 6px; }
table.pictures { border-collapse: collapse; } table.pictures td, table.pictures th { padding: 4px; text-align: center;
  font-size: 0.85em; font-weight: normal; } table.pictures th.row { text-align: right; color: #444; }
table.pictures img { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
ul.verdicts { margin: 0.4em 0 0; padding-left: 1.2em; } ul.verdicts li { margin: 0.15em 0; }
.answer { font-size: 1.2em; background: #eef5ff; border-left: 5px solid #1f77b4; padding: 10px 14px; margin: 12px 0; }
table.finalists { border-collapse: collapse; font-size: 0.88em; margin-top: 6px; }
table.finalists th, table.finalists td { border-bottom: 1px solid #e4e4e4; padding: 4px 8px; text-align: left; }
table.finalists th { background: #e8eef7; font-weight: 600; }
"""


@dataclass
class Panel:
    key: str  # element id: fig-<key>
    title: str
    caption: str
    figure: go.Figure | None = None
    html: str | None = None  # a non-Plotly panel (the pictures)
    after: str = ""  # HTML under the figure (the verdicts under the quality table)


def _figure_div(panel: Panel) -> str:
    return panel.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{panel.key}",
                                include_mathjax=False, config={"displaylogo": False, "responsive": True})


def _pictures_html(pictures: pd.DataFrame) -> str:
    def img(row: pd.Series) -> str:  # row: one picture, indexed by its image index
        data = base64.b64encode(row["png"]).decode()
        return f'<img alt="{html.escape(row["kind"])} {int(row.name)}" src="data:image/png;base64,{data}">'

    indices = sorted(pictures["index"].unique())
    first = pictures[pictures["variant"] == pictures["variant"].iloc[0]]
    lines = ['<table class="pictures">', "<tr><th></th>" + "".join(f"<th>held-out image {i}</th>" for i in indices)
             + "</tr>"]
    originals = first[first["kind"] == "original"].set_index("index")
    lines.append('<tr><th class="row">original</th>' + "".join(
        f"<td>{img(originals.loc[i]) if i in originals.index else ''}</td>" for i in indices) + "</tr>")
    for variant, group in pictures.groupby("variant", sort=True):
        meta = group.iloc[0]
        for kind in ("masked", "reconstruction"):
            rows = group[group["kind"] == kind].set_index("index")
            label = (f"{html.escape(str(variant))}<br>masked input (ratio {meta.get('mask_ratio', float('nan')):.2f})"
                     if kind == "masked" else f"{html.escape(str(variant))}<br>reconstruction")
            cells = []
            for i in indices:
                if i not in rows.index:
                    cells.append("<td></td>")
                    continue
                psnr = rows.loc[i].get("psnr")
                tip = f"<br>{psnr:.1f} dB" if kind == "reconstruction" and pd.notna(psnr) else ""
                cells.append(f"<td>{img(rows.loc[i])}{tip}</td>")
            lines.append(f'<tr><th class="row">{label}</th>{"".join(cells)}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def curve_panels(exp: Experiment, summary: pd.DataFrame | None) -> list[Panel]:
    """Validation curves against training FLOPs (when recorded: the headline axis), samples seen and wall seconds."""
    search = exp.kind == "search"
    a = summary.attrs if summary is not None else {}
    what = ("Held-out PSNR of decoded reconstructions (comparable across latent and pixel variants), masked MSE at "
            "the fixed ratio 0.75" + (" and the linear-probe accuracy of the frozen encoder" if exp.has_probe else "")
            + ("; one line per trial." if search else "; mean over seeds with a 95% t-band."))
    if exp.references:
        what += (" Dashed: the no-model fill (every masked patch the mean colour of the image's visible pixels, at "
                 "the variant's patch grid); dotted: the projector ceiling (decoding unmasked latents: no model on "
                 f"them does better). A ceiling more than {figures.CEILING_HEADROOM_DB:g} dB above the highest curve "
                 "(pixel space's fp16 rounding, ~90 dB) is listed in the legend as off scale and drawn only when "
                 "clicked.")
        if exp.has_probe:
            what += (" Probe panel: the probe on raw inputs (dashed) and on a randomly initialised encoder (dotted, "
                     "95% band over seeds).")
        if search:
            inits = max((r["n"] for r in exp.references if r["reference"] == "random_probe"), default=0)
            what += (" A search's references are each scheduler's, computed for the geometry (depths) of its best "
                     f"trial; its random-encoder band is over {inits} initialisations.")
    if not math.isnan(a.get("target", float("nan"))):
        what += (f" Thick black dash-dot: the target ({a['target_metric']} = {a['target']:.4g}, {a['baseline']}'s "
                 "worst final value over seeds: a level each of its seeds reaches).")
    kwargs = {"per_trial": search, "references": exp.references, "target": a.get("target", float("nan")),
              "target_metric": a.get("target_metric", "")}
    panels = []
    if exp.has_flops:
        panels.append(Panel("curves-flops", "Validation curves against training FLOPs",
                            f"{what} Training FLOPs are counted, not timed, so this axis is the same on any machine: "
                            "the one the ablation's budget and speed claim are on.",
                            figures.curves_figure(exp.table, "train_flops", **kwargs)))
    panels += [
        Panel("curves-samples", "Validation curves against samples seen", what,
              figures.curves_figure(exp.table, "samples_seen", **kwargs)),
        Panel("curves-wall", "Validation curves against training time",
              "The same curves on the training clock (evaluation time excluded): measured, so it depends on the "
              "machine and on what else ran beside the trial.",
              figures.curves_figure(exp.table, "wall_seconds", **kwargs)),
    ]
    return panels


def _verdicts_html(summary: pd.DataFrame) -> str:
    items = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts(summary))
    return f"<ul class='verdicts' id='verdicts'>{items}</ul>" if items else ""


def budget_caption(rows: pd.DataFrame, budget: dict[str, Any] | None) -> str:
    """What each trial was given, whether that is equal in FLOPs, and the projector's one-time cost."""
    tflops = rows["tflops"].dropna()
    if budget is None:
        text = ("summary.json holds no budget record (an experiment from before results schema 3): steps, samples "
                "and TFLOP are the trials' last rows.")
    else:
        text = f"Each trial's budget: {float(budget['budget']):g} {budget.get('unit', '')} (--budget-by " \
               f"{budget.get('budget_by', '?')})."
    if len(tflops):
        gap = spend.spread(tflops)
        equal = budget is not None and budget.get("budget_by") == "flops"
        text += (f" TFLOP per trial: {tflops.min():.4g} to {tflops.max():.4g}, {gap:.1%} apart"
                 + (" (equal in FLOPs up to whole steps)." if equal else
                    ": budgets not set in FLOPs differ in compute, so compare variants on the FLOPs curves."))
    else:
        text += " The table has no train_flops column: compute per trial is unknown."
    if budget is not None:
        for name, gflop in (budget.get("projector_encode_gflop_per_image") or {}).items():
            text += f" One-time latent encoding with {name}: {gflop:.4g} GFLOP per image, not in the budget."
        if budget.get("note"):
            text += f" ({budget['note']}.)"
    return html.escape(text)


def summary_panels(exp: Experiment, summary: pd.DataFrame) -> list[Panel]:
    """The ablation's answer: final quality against references, time-to-target, speedup, and the budget."""
    a = summary.attrs
    axis = figures.time_axis(summary)
    unit = figures.TIME_AXES[axis][1]
    rows = spend.budget_rows(exp.table, exp.budget)
    quality = ("Per variant over seeds at the end of its budget: final held-out PSNR, masked MSE and linear-probe "
               "accuracy (mean ± 95% t-interval) next to its references. A variant 'beats' a reference when its "
               "interval lies entirely above the reference's; n/a where either is missing.")
    no_baseline = math.isnan(a["target"])  # nothing to measure against: no time-to-target or speedup panels
    if no_baseline:
        quality += f" {no_target(a)[0].upper()}{no_target(a)[1:]}."
    first = Panel("quality", "Final quality against the references", quality, figures.quality_table_figure(summary),
                  after=_verdicts_html(summary))
    last = Panel("budget", "Budget per trial", budget_caption(rows, exp.budget), spend.budget_figure(rows, exp.budget))
    if no_baseline:
        return [first, last]
    return [
        first,
        Panel("time-to-target", f"{unit} to target",
              f"{unit} each variant spent until a trial's {a['target_metric']} first reached the target "
              f"{a['target']:.4g} ({a['baseline']}'s worst final over seeds), interpolated between evaluations. Bars: "
              "geometric mean over the seeds that reached it; error bars: its 95% interval (t on the log scale, so "
              "asymmetric and never below zero), none where fewer than two seeds reached it.",
              figures.time_to_target_figure(summary)),
        Panel("speedup", f"Speedup against {a['baseline']}",
              f"{a['baseline']}'s geometric-mean time-to-target / the variant's, on training FLOPs (large diamonds: "
              "deterministic, the headline), samples seen and wall seconds, with 95% intervals (Welch t on the log "
              f"times). Dotted: 1x; dashed red: {figures.CLAIM:g}x, the paper's claim, which the FLOPs interval "
              "must lie above to support it.", figures.speedup_figure(summary)),
        last,
    ]


def study_panels(exp: Experiment, parallel: bool = True) -> list[Panel]:
    """A search's Optuna study, on its own objective (args.json's metric). Its importances only when the search
    wrote none of its own (importances.json), its parallel coordinates only when `parallel` (the table's cannot
    be drawn): two panels that show the same thing twice would disagree in their details."""
    study = exp.study
    label = search_figures.objective_label(exp.args.get("metric", search_figures.LEGACY_METRIC))
    panels = [Panel("history", "Optimization history", f"Objective ({html.escape(label)}) of each completed trial "
                    "and the best so far.", search_figures.history_figure(study, label))]
    if exp.importances is None:
        panels.append(Panel("importance", "Parameter importances",
                            "fANOVA importances; conditional parameters (no start/ramp for a constant schedule) are "
                            "estimated over the trials where they exist.", search_figures.importance_figure(study)))
    if parallel:
        panels.append(Panel("parallel", "Parallel coordinates", "Every completed trial's parameters and objective "
                            "(from the Optuna journal: the results table holds no sampled values).",
                            search_figures.parallel_figure(study, label)))
    panels.append(Panel("slice", "Final mask ratio × scheduler", f"Each trial's {html.escape(label)} against its "
                        "final mask ratio, one colour per scheduler.", search_figures.slice_figure(study, label)))
    return panels


def answer_panels(exp: Experiment, metric: str) -> list[Panel]:
    """The search's answer and the trials behind it, each drawn when its file or columns exist."""
    label = search_figures.objective_label(metric)
    panels = []
    if exp.finalists is not None:
        own = search_figures.objective_label(exp.finalists["metric"])
        panels.append(Panel("finalists", "The answer: finalists against the paper's configuration",
                            finalists.finalists_caption(exp.finalists, own),
                            finalists.finalists_figure(exp.finalists, own),
                            after=finalists.finalists_table_html(exp.finalists, own)))
    if exp.has_flops and metric in exp.table and exp.table[metric].notna().any():
        last = search_figures.last_rows(exp.table)
        budget = exp.args.get("budget") if exp.args.get("budget_by") == "flops" else None
        panels.append(Panel(
            "objective-flops", f"{label} against training FLOPs, per trial",
            html.escape("One line per trial, coloured by scheduler, on the clock of the search's early stopping: "
                        "ASHA's rungs are in training FLOPs" + (" (dotted: each trial's budget). " if budget else ". ")
                        + f"{int(last['stopped'].sum())} of {len(last)} trials were stopped early (dashed, an X at the "
                        "evaluation they were stopped after, named in the legend); their last values are at a "
                        "smaller budget, so the parallel coordinates, the Pareto front and the finalists leave "
                        "them out."),
            search_figures.objective_flops_figure(exp.table, metric, label, budget)))
    if exp.importances is not None:
        imp = exp.importances
        panels.append(Panel(
            "effects", "Parameter effects beside seed noise",
            html.escape(f"Bars: each sampled parameter's effect on {imp['objective']} (the spread, max − min, of "
                        "its mean across the parameter's levels, in the objective's units, over the trials that "
                        f"finished); text: its {imp['evaluator']} importance. Dashed line: the seed noise (the "
                        "median half-width of the finalists' 95% seed interval). A parameter whose effect is below "
                        "the line (grey bar) moves the objective less than a change of seed does: the search cannot "
                        "tell its levels apart." + ("" if imp.get("seed_spread") is not None else
                                                    " The seed noise is unknown (no finalists with two seeds), so "
                                                    "no line is drawn.")),
            search_figures.effects_figure(imp, search_figures.objective_label(imp["objective"]))))
    if exp.pareto is not None:
        panels.append(Panel(
            "pareto", "Pareto front: objective against encoder cost",
            html.escape("Each finished trial's objective against its second objective (encoder inference GFLOP per "
                        "image, all patches visible). Blue, joined: the Pareto front (no other trial is at least as "
                        "good on both and better on one); grey, faded: the dominated trials."),
            search_figures.pareto_figure(exp.pareto, metric, label)))
    parallel = search_figures.sampled_parallel_figure(exp.table, metric, label)
    if parallel is not None:
        columns = search_figures.sampled_columns(exp.table)
        panels.append(Panel("parallel", "Parallel coordinates of the sampled values",
                            html.escape(f"One line per trial that finished its budget (from the results table), "
                                        f"coloured by {label}: {', '.join(columns)} and the objective. Drag along "
                                        "an axis to select a range."), parallel))
    return panels


def build_panels(exp: Experiment) -> list[Panel]:
    table = exp.table
    search = exp.kind == "search"
    summary = None
    answer: list[Panel] = []
    if search:
        answer = answer_panels(exp, exp.args.get("metric", search_figures.LEGACY_METRIC))
    else:
        target_metric = exp.args.get("target_metric", "val_psnr")
        if target_metric not in TARGET_METRICS:
            raise ResultsError(f"{exp.root / 'args.json'}: target_metric {target_metric!r} is not one of "
                               f"{', '.join(TARGET_METRICS)}")
        summary = summarize(table, figures.BASELINE, target_metric, exp.references)
    if summary is not None and not summary.empty:  # an ablation's answer (verdicts, speed-up) before its curves
        answer = summary_panels(exp, summary)
    panels = answer + curve_panels(exp, summary)
    panels.append(Panel("schedules", "Mask-ratio schedules",
                        "The ratio of hidden patches over training for each variant (easy → hard); circles are the "
                        "ratios recorded in the results (each report records its last step's ratio).",
                        spend.schedule_figure(table, per_trial=search)))
    if exp.study is not None and search_figures.completed_trials(exp.study):
        panels += study_panels(exp, parallel=not any(p.key == "parallel" for p in answer))
    panels.append(Panel("cost", "Cost", "Device-hours: training wall-clock × devices (GPUs, or CPUs on a CPU run) "
                        "per trial, summed per variant.", spend.cost_figure(table)))
    if exp.pictures is not None and not exp.pictures.empty:
        trials = ", ".join(f"{v}: {t} (seed {s})" for v, t, s in
                           exp.pictures.groupby("variant")[["trial_id", "seed"]].first().itertuples())
        panels.append(Panel("pictures", "Reconstructions",
                            "Held-out images, the patches hidden from each variant, and its reconstruction decoded "
                            f"through its projector at its final checkpoint. Trials shown: {html.escape(trials)}.",
                            html=_pictures_html(exp.pictures)))
    return panels


def render_html(exp: Experiment) -> str:
    table = exp.table
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(exp.name)} — LMD-Ray "
            f"{exp.kind}</title><style>{CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>")
    body = [f"<h1>{html.escape(exp.name)}: LMD {exp.kind}</h1>",
            f"<p class='meta'>{len(table)} result rows, {table['trial_id'].nunique()} trials, "
            f"{table['variant'].nunique()} {'schedulers' if exp.kind == 'search' else 'variants'} · results schema "
            f"{exp.schema} · {html.escape(str(exp.root))} · rendered {stamp}</p>"]
    if exp.finalists is not None:  # the search's answer, before anything that qualifies it
        body.append(f"<p class='answer' id='search-answer'><b>Answer:</b> {html.escape(exp.finalists['answer'])}</p>")
    body += [f"<div class='note'>{html.escape(n)}</div>" for n in exp.notes]
    if table.empty:
        body.append(f"<div class='empty' id='empty-results'>This experiment has no result rows yet: "
                    f"{html.escape(str(exp.root))} holds an empty results table (no trial reported). Rerun it, or "
                    "resume it with --resume.</div>")
    else:
        for panel in build_panels(exp):
            content = panel.html if panel.html is not None else _figure_div(panel)
            if panel.html is not None:
                content = f"<div id='fig-{panel.key}'>{content}</div>"
            body.append(f"<section><h2>{html.escape(panel.title)}</h2><p class='caption'>{panel.caption}</p>"
                        f"{content}{panel.after}</section>")
    return head + "<body>" + "\n".join(body) + "</body></html>"


def render_after_experiment(experiment: Path) -> None:
    """Called by the experiment scripts: the results are already safe, so a rendering failure is reported, not
    raised (rerun `python analysis/dashboard.py` once it is fixed)."""
    try:
        print(f"dashboard: {render_dashboard(experiment)}")
    except Exception as err:  # noqa: BLE001
        log.exception("dashboard not rendered")
        print(f"dashboard: not rendered ({type(err).__name__}: {err}); the results are in {experiment}",
              file=sys.stderr)


def render_dashboard(results: str | Path, out: str | Path | None = None) -> Path:
    """Write the experiment's dashboard (default: <experiment>/dashboard.html); returns its path."""
    exp = load_experiment(results)
    path = Path(out) if out is not None else exp.root / DASHBOARD_FILE
    check_output(path, exp.root)
    html_text = render_html(exp)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, html_text)
    return path


def check_output(path: Path, experiment: Path) -> None:
    """An output never replaces an input: inside the experiment folder only its own dashboard.html may be written,
    and nowhere an existing file that is not an HTML page (ResultsError naming the path)."""
    target, root = path.expanduser().resolve(), experiment.resolve()
    if target.is_relative_to(root) and target != root / DASHBOARD_FILE:
        raise ResultsError(f"--out {path}: inside the experiment's own files ({experiment}); write the page elsewhere, "
                           f"or to {experiment / DASHBOARD_FILE}")
    try:
        replaces_only(target, HTML_MAGIC, "an HTML page")
    except FileExistsError as err:
        raise ResultsError(f"--out {path}: {str(err).split(': ', 1)[1]}") from None
