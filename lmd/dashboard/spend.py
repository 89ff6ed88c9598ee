"""Figures of what each trial was given, ran and cost: the budget per variant, the mask-ratio schedules
and device-hours. (The quality curves, time-to-target and speedups are in `figures`.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lmd.config import MaskConfig
from lmd.dashboard.figures import LAYOUT, variant_colors
from lmd.masking import mask_ratio


def budget_rows(table: pd.DataFrame, budget: dict[str, Any] | None) -> pd.DataFrame:
    """Per variant: steps, samples and TFLOP it was given (summary.json's budget, else the trials' last rows),
    and the TFLOP its trials actually spent (mean of their last rows; nan without train_flops)."""
    last = table.sort_values("step").groupby("trial_id").tail(1)
    spent = last.groupby("variant").agg(steps=("step", "mean"), samples=("samples_seen", "mean"))
    spent["spent_tflops"] = (last.groupby("variant")["train_flops"].mean() / 1e12 if "train_flops" in last
                             else float("nan"))
    if budget is None:
        rows = spent.assign(tflops=spent["spent_tflops"])
    else:
        given = pd.DataFrame.from_dict(budget["variants"], orient="index").reindex(
            columns=["steps", "samples", "train_tflops"])
        rows = given.rename(columns={"train_tflops": "tflops"}).astype(float)
        rows["spent_tflops"] = spent["spent_tflops"].reindex(rows.index)
    return rows.rename_axis("variant").reset_index().sort_values("variant", ignore_index=True)


def spread(values: pd.Series) -> float:
    """max / min - 1 of positive values (0: all equal; nan without data)."""
    v = values.dropna()
    return float(v.max() / v.min() - 1) if len(v) and v.min() > 0 else float("nan")


def budget_figure(rows: pd.DataFrame, budget: dict[str, Any] | None) -> go.Figure:
    """Bars per variant: TFLOP (when known), steps and samples per trial; the budget as a line on its own axis."""
    panels = [c for c in ("tflops", "steps", "samples") if rows[c].notna().any()]
    titles = {"tflops": "TFLOP per trial", "steps": "steps per trial", "samples": "samples per trial"}
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[titles[p] for p in panels])
    colors = variant_colors(rows["variant"].tolist())
    by = {"flops": "tflops", "steps": "steps"}.get((budget or {}).get("budget_by", ""))
    for col, panel in enumerate(panels, start=1):
        fig.add_trace(go.Bar(x=rows["variant"], y=rows[panel], marker_color=[colors[v] for v in rows["variant"]],
                             name=titles[panel], showlegend=False, texttemplate="%{y:.4~g}", textposition="outside"),
                      row=1, col=col)
        if panel == "tflops" and rows["spent_tflops"].notna().any():
            fig.add_trace(go.Scatter(x=rows["variant"], y=rows["spent_tflops"], mode="markers",
                                     name="TFLOP spent (trials' last rows)",
                                     marker={"symbol": "diamond", "color": "black", "size": 9}), row=1, col=col)
        if panel == by:
            fig.add_hline(y=float(budget["budget"]), name="budget", line_dash="dot", line_color="#d62728",
                          label={"text": f"budget {float(budget['budget']):g} {budget.get('unit', '')}",
                                 "textposition": "start", "yanchor": "top"}, row=1, col=col)
    fig.update_layout(**LAYOUT)
    return fig


# ---------------------------------------------------------------- schedules
def schedule_figure(table: pd.DataFrame, per_trial: bool = False) -> go.Figure:
    """Each variant's (or, for searches, each trial's) mask-ratio schedule over training, drawn from its
    config columns, with the ratios recorded in the results as circles."""
    colors = variant_colors(table["variant"].astype(str).unique().tolist())
    fig = go.Figure()
    has_config = bool(table["scheduler"].notna().any())  # drawn by the training code's own (torch-free) schedule
    for key, group in table.groupby("trial_id" if per_trial else "variant"):
        variant = str(group["variant"].iloc[0])
        color, name = colors[variant], (f"{variant} · {key}" if per_trial else variant)
        if has_config and group["scheduler"].notna().any():
            row = group.dropna(subset=["scheduler"]).iloc[0]
            cfg = MaskConfig(scheduler=str(row["scheduler"]), start=float(row["mask_start"]),
                             end=float(row["mask_end"]), ramp=float(row["mask_ramp"]))
            total = int(row["total_steps"])
            steps = np.linspace(0, total, min(total, 400) + 1).round().astype(int)
            fig.add_trace(go.Scatter(x=steps, y=[mask_ratio(int(s), total, cfg) for s in steps], mode="lines",
                                     name=f"{name} ({cfg.scheduler} {cfg.start:.2f}→{cfg.end:.2f}, "
                                          f"ramp {cfg.ramp:.2f})",
                                     legendgroup=str(key), line={"color": color}))
        recorded = group.groupby("step")["mask_ratio"].mean().reset_index()
        # A report at step s (steps done) records the ratio of the last step done, step index s - 1.
        fig.add_trace(go.Scatter(x=recorded["step"] - 1, y=recorded["mask_ratio"], mode="markers",
                                 name=f"{name} (recorded)", legendgroup=str(key), showlegend=not has_config,
                                 customdata=recorded["step"], hovertemplate="reported at step %{customdata}: "
                                 "ratio %{y:.3f}<extra></extra>",
                                 marker={"color": color, "size": 7, "symbol": "circle-open"}))
    fig.update_layout(**{**LAYOUT, "height": 380 + (20 * table["trial_id"].nunique() if per_trial else 0)},
                      xaxis_title="training step", yaxis_title="mask ratio (share of patches hidden)",
                      yaxis_range=[0, 1])
    return fig


# ---------------------------------------------------------------- cost
def cost_figure(table: pd.DataFrame) -> go.Figure:
    """Device-hours per variant (sum over its trials) and per trial (training clock x devices)."""
    final = table.sort_values("step").groupby("trial_id").tail(1)
    colors = variant_colors(final["variant"].astype(str).unique().tolist())
    per_variant = final.groupby("variant")["device_seconds"].sum() / 3600
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                        subplot_titles=("device-hours per variant", "device-hours per trial"))
    fig.add_trace(go.Bar(x=per_variant.index.astype(str), y=per_variant.values, showlegend=False,
                         marker_color=[colors[str(v)] for v in per_variant.index], name="per variant"), row=1, col=1)
    final = final.sort_values(["variant", "seed"])
    fig.add_trace(go.Bar(x=final["trial_id"].astype(str), y=final["device_seconds"] / 3600, showlegend=False,
                         marker_color=[colors[str(v)] for v in final["variant"]], name="per trial",
                         hovertext=[f"{v} seed {s}" for v, s in zip(final["variant"], final["seed"], strict=True)]),
                  row=1, col=2)
    fig.update_yaxes(title_text="device-hours")
    fig.update_xaxes(showticklabels=False, row=1, col=2)
    fig.update_layout(**LAYOUT)
    return fig
