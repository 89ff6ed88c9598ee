"""One self-contained HTML page per experiment: Plotly's JS inlined once, every figure a <div>.

The page works offline (no CDN, no MathJax), so it can be mailed or opened on a cluster head node.
Each panel has a stable element id (`fig-...`), which the browser tests look for.
"""

from __future__ import annotations

import base64
import html
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from lmd.dashboard import figures, search_figures
from lmd.dashboard.load import Experiment, load_experiment
from lmd.experiments.results import summarize

log = logging.getLogger(__name__)

DASHBOARD_FILE = "dashboard.html"
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
"""


@dataclass
class Panel:
    key: str  # element id: fig-<key>
    title: str
    caption: str
    figure: go.Figure | None = None
    html: str | None = None  # a non-Plotly panel (the pictures)


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


def build_panels(exp: Experiment) -> list[Panel]:
    table = exp.table
    search = exp.kind == "search"
    panels = [
        Panel("curves-samples", "Validation curves against samples seen",
              "Held-out PSNR of decoded reconstructions (comparable across latent and pixel variants) and masked "
              "MSE at the fixed ratio 0.75" + ("; one line per trial." if search else
                                               "; mean over seeds with a 95% t-band."),
              figures.curves_figure(table, "samples_seen", per_trial=search)),
        Panel("curves-wall", "Validation curves against training time",
              "The same curves on the training clock (evaluation time excluded): the axis the speed claim is about.",
              figures.curves_figure(table, "wall_seconds", per_trial=search)),
    ]
    if not search:
        summary = summarize(table, figures.BASELINE)
        if not summary.empty:
            panels += [
                Panel("quality", "Final quality",
                      f"Per variant over seeds: final held-out PSNR and masked MSE (95% CI), time to reach pixel "
                      f"MAE's mean final PSNR ({summary.attrs.get('target_psnr', float('nan')):.2f} dB), speedup "
                      "and device-hours.", figures.quality_table_figure(summary)),
                Panel("time-to-target", "Time-to-target and speedup against pixel MAE",
                      "Training seconds until a trial's held-out PSNR first reaches the target (mean over the "
                      "seeds that reached it, 95% CI); speedup = pixel MAE's time / the variant's.",
                      figures.time_to_target_figure(summary)),
            ]
    panels.append(Panel("schedules", "Mask-ratio schedules",
                        "The ratio of hidden patches over training for each variant (easy → hard); circles are the "
                        "ratios recorded in the results.", figures.schedule_figure(table, per_trial=search)))
    if exp.study is not None and search_figures.completed_trials(exp.study):
        study = exp.study
        panels += [
            Panel("history", "Optimization history", "Objective (held-out PSNR) of each completed trial and "
                  "the best so far.", search_figures.history_figure(study)),
            Panel("importance", "Parameter importances",
                  "fANOVA importances; conditional parameters (no start/ramp for a constant schedule) are "
                  "estimated over the trials where they exist.", search_figures.importance_figure(study)),
            Panel("parallel", "Parallel coordinates", "Every completed trial's parameters and objective.",
                  search_figures.parallel_figure(study)),
            Panel("slice", "Final mask ratio × scheduler", "Each trial's PSNR against its final mask ratio, one "
                  "colour per scheduler.", search_figures.slice_figure(study)),
        ]
    panels.append(Panel("cost", "Cost", "Device-hours: training wall-clock × devices (GPUs, or CPUs on a CPU run) "
                        "per trial, summed per variant.", figures.cost_figure(table)))
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
                        f"{content}</section>")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(exp), encoding="utf-8")
    tmp.replace(path)
    return path
