"""Plotly figures of an experiment's results table (one function per panel; each returns a go.Figure).

Conventions: one colour per variant across every panel; bands and error bars are 95% t-intervals
over seeds (the ablation's unit of replication); x axes say which clock they use.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lmd.config import MaskConfig
from lmd.experiments.results import interval
from lmd.masking import mask_ratio

BASELINE = "pixel_mae"
LAYOUT = {"template": "plotly_white", "height": 420, "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
          "legend": {"orientation": "h", "y": -0.18}}


def variant_colors(variants: list[str]) -> dict[str, str]:
    """Stable colours by sorted name; the pixel-MAE baseline is always dark grey."""
    palette = [c for c in qualitative.D3 if c != "#7F7F7F"] + qualitative.Plotly
    colors = {v: palette[i % len(palette)] for i, v in enumerate(sorted(v for v in variants if v != BASELINE))}
    if BASELINE in variants:
        colors[BASELINE] = "#404040"
    return colors


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# ---------------------------------------------------------------- curves
def _mean_band(group: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Per step: mean x, mean y and the 95% half-width of y over the group's trials."""
    by_step = group.groupby("step")
    return pd.DataFrame({"x": by_step[x].mean(), "y": by_step[y].mean(),
                         "hw": by_step[y].apply(lambda v: interval(v)[1]), "n": by_step[y].count()}).reset_index()


def curves_figure(table: pd.DataFrame, x: str, per_trial: bool = False) -> go.Figure:
    """Held-out PSNR and fixed-ratio masked MSE against `x` (samples_seen or wall_seconds).

    Ablations: mean over seeds per variant with a 95% band. Searches (`per_trial`): one line per
    trial, coloured by scheduler, since every trial has its own hyperparameters.
    """
    evals = table.dropna(subset=["val_psnr"])
    colors = variant_colors(evals["variant"].astype(str).unique().tolist())
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "held-out PSNR of decoded reconstructions (dB, ratio 0.75)",
        "masked MSE at ratio 0.75 (each variant's own space)"))
    shown: set[str] = set()
    for col, y in ((1, "val_psnr"), (2, "val_masked_mse_fixed")):
        for variant, group in evals.groupby("variant"):
            variant, color = str(variant), colors[str(variant)]
            if per_trial:
                for trial_id, trial in group.groupby("trial_id"):
                    trial = trial.sort_values("step")
                    fig.add_trace(go.Scatter(x=trial[x], y=trial[y], mode="lines+markers", name=variant,
                                             legendgroup=variant, showlegend=variant not in shown,
                                             line={"color": color}, hovertext=str(trial_id)), row=1, col=col)
                    shown.add(variant)
                continue
            band = _mean_band(group, x, y)
            if band["hw"].notna().any():
                upper, lower = band["y"] + band["hw"].fillna(0), band["y"] - band["hw"].fillna(0)
                fig.add_trace(go.Scatter(x=pd.concat([band["x"], band["x"][::-1]]),
                                         y=pd.concat([upper, lower[::-1]]), fill="toself", mode="lines",
                                         fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                                         legendgroup=variant, showlegend=False, name=f"{variant} 95%"),
                              row=1, col=col)
            fig.add_trace(go.Scatter(x=band["x"], y=band["y"], mode="lines+markers", name=variant,
                                     legendgroup=variant, showlegend=variant not in shown, line={"color": color},
                                     customdata=np.stack([band["hw"], band["n"]], axis=-1),
                                     hovertemplate="%{y:.4g} ± %{customdata[0]:.2g} (n=%{customdata[1]})"),
                          row=1, col=col)
            shown.add(variant)
    label = {"samples_seen": "samples seen", "wall_seconds": "training wall-clock seconds (evaluation excluded)"}[x]
    fig.update_xaxes(title_text=label)
    fig.update_yaxes(title_text="PSNR (dB)", row=1, col=1)
    fig.update_yaxes(title_text="masked MSE", type="log", row=1, col=2)
    fig.update_layout(**LAYOUT)
    return fig


# ---------------------------------------------------------------- time-to-target, final quality
def time_to_target_figure(summary: pd.DataFrame) -> go.Figure:
    """Bars: training seconds to reach pixel MAE's final PSNR, and the speedup against pixel MAE.

    Error bars are 95% intervals (lmd.experiments.results); none is drawn where fewer than two seeds
    reached the target, rather than a zero-width bar that would look exact.
    """
    colors = variant_colors(summary["variant"].tolist())
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"time-to-target (s) — target {summary.attrs.get('target_psnr', float('nan')):.2f} dB",
        "speedup against pixel MAE (x)"))
    bar_colors = [colors[v] for v in summary["variant"]]
    labels = [f"reached {r}" for r in summary["reached_target"]]
    fig.add_trace(go.Bar(x=summary["variant"], y=summary["time_to_target_s"], marker_color=bar_colors,
                         error_y={"type": "data", "array": summary["time_to_target_ci95"]},
                         text=labels, textposition="outside", name="time-to-target", showlegend=False),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=summary["variant"], y=summary["speedup_vs_pixel_mae"], marker_color=bar_colors,
                         error_y={"type": "data", "array": summary["speedup_ci95"]}, name="speedup",
                         showlegend=False), row=1, col=2)
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=1, col=2)
    never = summary.loc[summary["time_to_target_s"].isna(), "variant"].tolist()
    if never:
        fig.add_annotation(text=f"never reached the target within the budget: {', '.join(never)}",
                           xref="paper", yref="paper", x=0, y=-0.22, showarrow=False, align="left")
    fig.update_yaxes(title_text="seconds", row=1, col=1)
    fig.update_yaxes(title_text="x pixel MAE", row=1, col=2)
    fig.update_layout(**LAYOUT)
    return fig


def _pm(mean: float, hw: float, fmt: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:{fmt}}" + ("" if hw is None or math.isnan(hw) else f" ± {hw:{fmt}}")


def quality_table_figure(summary: pd.DataFrame) -> go.Figure:
    s = summary
    columns = {
        "variant": s["variant"].tolist(),
        "seeds": s["seeds"].tolist(),
        "final PSNR dB (95% CI)": [_pm(m, h, ".2f") for m, h in zip(s["psnr"], s["psnr_ci95"], strict=True)],
        "masked MSE (95% CI)": [_pm(m, h, ".4f") for m, h in zip(s["masked_mse"], s["masked_mse_ci95"],
                                                                   strict=True)],
        "time-to-target s": [_pm(m, h, ".1f") for m, h in zip(s["time_to_target_s"], s["time_to_target_ci95"],
                                                               strict=True)],
        "reached": s["reached_target"].tolist(),
        "speedup": [_pm(m, h, ".2f") + ("" if math.isnan(m) else "x") for m, h in
                    zip(s["speedup_vs_pixel_mae"], s["speedup_ci95"], strict=True)],
        "device-hours": [f"{v:.4f}" for v in s["device_hours"]],
    }
    fig = go.Figure(go.Table(header={"values": list(columns), "fill_color": "#e8eef7", "align": "left"},
                             cells={"values": list(columns.values()), "align": "left", "height": 26}))
    fig.update_layout(template="plotly_white", height=90 + 28 * len(s), margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


# ---------------------------------------------------------------- schedules
def schedule_figure(table: pd.DataFrame, per_trial: bool = False) -> go.Figure:
    """Each variant's (or, for searches, each trial's) mask-ratio schedule over training, drawn from its
    config columns, with the ratios recorded in the results as circles."""
    colors = variant_colors(table["variant"].astype(str).unique().tolist())
    fig = go.Figure()
    has_config = bool(table["scheduler"].notna().any())
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
        fig.add_trace(go.Scatter(x=recorded["step"], y=recorded["mask_ratio"], mode="markers",
                                 name=f"{name} (recorded)", legendgroup=str(key), showlegend=not has_config,
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
