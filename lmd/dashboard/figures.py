"""Plotly figures of an experiment's results table and summary (one function per panel; each returns a go.Figure).

Conventions: one colour per variant across every panel; bands and error bars are 95% intervals
over seeds (the ablation's unit of replication); x axes say which clock they use. References (the
no-model fill, the projector ceiling, the probes on raw inputs and on a random encoder) and the
target are horizontal-line traces named after what they are, so a reader (and a test) finds them.
Times and speedups are positive: their intervals come from lmd.experiments.summary on the log
scale and are drawn as asymmetric error bars that never cross zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lmd.experiments.results import interval, reference_columns
from lmd.experiments.summary import BASELINE

LAYOUT = {"template": "plotly_white", "height": 420, "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
          "legend": {"orientation": "h", "y": -0.18}}
GREY = "#888888"
TARGET_COLOR = "#000000"  # black long-dash-dot: no variant's colour or dash pattern
# x columns of the curves: axis title and the factor that puts the column in those units.
X_AXES = {"train_flops": ("training TFLOP (transformer forward + backward)", 1e-12),
          "samples_seen": ("samples seen", 1.0),
          "wall_seconds": ("training wall-clock seconds (evaluation excluded)", 1.0)}
# y columns of the curves: subplot title and axis title.
CURVE_METRICS = {"val_psnr": ("held-out PSNR, decoded (ratio 0.75)", "PSNR (dB)"),
                 "val_masked_mse_fixed": ("masked MSE, ratio 0.75 (own space)", "masked MSE"),
                 "val_probe_acc": ("held-out linear-probe accuracy", "probe accuracy")}
# A ceiling this far above the best curve (pixel space's fp16 rounding: ~90 dB) would flatten every curve:
# it is listed in the legend as off scale (click to draw) instead.
CEILING_HEADROOM_DB = 15.0
# Time-to-target and speedup axes of lmd.experiments.summary: legend name and unit.
TIME_AXES = {"tflops": ("FLOPs", "TFLOP"), "samples": ("samples", "samples"), "seconds": ("wall seconds", "seconds")}
CLAIM = 3.0  # the paper's speedup claim against pixel MAE


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


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------- curves
def _mean_band(group: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Per step: mean x, mean y and the 95% half-width of y over the group's trials."""
    by_step = group.groupby("step")
    return pd.DataFrame({"x": by_step[x].mean(), "y": by_step[y].mean(),
                         "hw": by_step[y].apply(lambda v: interval(v)[1]), "n": by_step[y].count()}).reset_index()


def curve_metrics(table: pd.DataFrame) -> list[str]:
    """PSNR and masked MSE always; probe accuracy when the column holds data."""
    probe = "val_probe_acc" in table and bool(table["val_probe_acc"].notna().any())
    return ["val_psnr", "val_masked_mse_fixed"] + (["val_probe_acc"] if probe else [])


def _line(fig: go.Figure, col: int, span: tuple[float, float], y: float, name: str, color: str, dash: str,
          half: float = 0.0, visible: bool | str = True, width: float = 1.5) -> None:
    """A named horizontal reference across the panel's x span, with its 95% band when it has one."""
    x0, x1 = span
    if half > 0 and visible is True:
        fig.add_trace(go.Scatter(x=[x0, x1, x1, x0], y=[y + half, y + half, y - half, y - half], fill="toself",
                                 mode="lines", line={"width": 0}, fillcolor=_rgba(color, 0.12), hoverinfo="skip",
                                 name=f"{name} 95%", legendgroup=name, showlegend=False), row=1, col=col)
    fig.add_trace(go.Scatter(x=[x0, x1], y=[y, y], mode="lines", name=name, legendgroup=name, visible=visible,
                             line={"color": color, "dash": dash, "width": width},
                             hovertemplate=f"{name}<extra></extra>"), row=1, col=col)


def _distinct(refs: pd.DataFrame, column: str) -> list[tuple[float, float, list[str]]]:
    """(value, its 95% half-width, the variants it applies to) per distinct reference value."""
    if column not in refs:
        return []
    groups: dict[float, tuple[float, float, list[str]]] = {}
    for r in refs.dropna(subset=[column]).to_dict("records"):
        half = r.get(f"{column}_ci95", 0.0)
        key = round(float(r[column]), 6)
        groups.setdefault(key, (float(r[column]), 0.0 if _nan(half) else float(half), []))[2].append(r["variant"])
    return sorted(groups.values())


# (references column, metric panel, legend label, line dash): the no-model lines each panel shows.
REFERENCE_LINES = [
    ("fill_psnr", "val_psnr", "no-model fill {value:.2f} dB", "dash"),
    ("ceiling_psnr", "val_psnr", "projector ceiling {value:.2f} dB", "dot"),
    ("raw_probe_acc", "val_probe_acc", "raw-input probe {value:.3f}", "dash"),
    ("random_probe_acc", "val_probe_acc", "random-encoder probe {value:.3f} ± {half:.3f}", "dot"),
]


def _references(fig: go.Figure, metrics: list[str], spans: dict[str, tuple[float, float]], top_psnr: float,
                refs: pd.DataFrame, colors: dict[str, str]) -> None:
    """Fill and ceiling on the PSNR panel, raw-input and random-encoder probes on the probe panel."""
    def color(variants: list[str]) -> str:  # a variant's own colour when the line is only its own
        return colors.get(variants[0], GREY) if len(variants) == 1 else GREY

    for column, metric, label, dash in REFERENCE_LINES:
        if metric not in spans:
            continue
        col, span = metrics.index(metric) + 1, spans[metric]
        for value, half, variants in _distinct(refs, column):
            name = label.format(value=value, half=half) + f" ({', '.join(variants)})"
            off = column == "ceiling_psnr" and not value <= top_psnr + CEILING_HEADROOM_DB  # kept out of scale
            _line(fig, col, span, value, name + (", off scale" if off else ""), color(variants), dash,
                  visible="legendonly" if off else True, half=half if column == "random_probe_acc" else 0.0)


def probe_range(table: pd.DataFrame, refs: pd.DataFrame, target: float = math.nan) -> list[float]:
    """The probe panel's y range: every recorded accuracy, reference and the target, with a margin, within
    [0, 1]. Variants differ by 0.01-0.06 in accuracy, which a fixed 0-1 axis flattens; seed bands (two
    seeds' can pass 1) are clipped at the edge rather than setting it."""
    values = [*table["val_probe_acc"].dropna(), target]
    for column in ("raw_probe_acc", "random_probe_acc"):
        if column in refs:
            half = refs.get(f"{column}_ci95", pd.Series(0.0, index=refs.index)).fillna(0.0)
            values += [*(refs[column] - half), *(refs[column] + half)]
    values = [v for v in values if not math.isnan(v)]
    low, high = min(values), max(values)
    margin = 0.02 + 0.1 * (high - low)
    return [max(0.0, low - margin), min(1.0, high + margin)]


def curves_figure(table: pd.DataFrame, x: str, per_trial: bool = False, references: list[dict[str, Any]] | None = None,
                  target: float = float("nan"), target_metric: str = "") -> go.Figure:
    """Held-out PSNR, fixed-ratio masked MSE and (when recorded) probe accuracy against `x`.

    Ablations: mean over seeds per variant with a 95% band, the references as horizontal lines and
    the target on its metric's panel. Searches (`per_trial`): one line per trial, coloured by
    scheduler, since every trial has its own hyperparameters.
    """
    label, scale = X_AXES[x]
    metrics = curve_metrics(table)
    colors = variant_colors(table["variant"].astype(str).unique().tolist())
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[CURVE_METRICS[m][0] for m in metrics])
    shown: set[str] = set()
    spans: dict[str, tuple[float, float]] = {}
    top_psnr = -math.inf  # the highest PSNR drawn (band included): ceilings far above it are not drawn
    for col, y in enumerate(metrics, start=1):
        evals = table.dropna(subset=[y, x])
        if evals.empty:
            continue
        spans[y] = (float(evals[x].min()) * scale, float(evals[x].max()) * scale)
        for variant, group in evals.groupby("variant"):
            variant, color = str(variant), colors[str(variant)]
            if per_trial:
                for trial_id, trial in group.groupby("trial_id"):
                    trial = trial.sort_values("step")
                    fig.add_trace(go.Scatter(x=trial[x] * scale, y=trial[y], mode="lines+markers", name=variant,
                                             legendgroup=variant, showlegend=variant not in shown,
                                             line={"color": color}, hovertext=str(trial_id)), row=1, col=col)
                    shown.add(variant)
                top_psnr = max(top_psnr, float(group[y].max())) if y == "val_psnr" else top_psnr
                continue
            band = _mean_band(group, x, y)
            band["x"] *= scale
            upper, lower = band["y"] + band["hw"].fillna(0), band["y"] - band["hw"].fillna(0)
            if band["hw"].notna().any():
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
            top_psnr = max(top_psnr, float(upper.max())) if y == "val_psnr" else top_psnr
        fig.update_yaxes(title_text=CURVE_METRICS[y][1], type="log" if y == "val_masked_mse_fixed" else None,
                         row=1, col=col)
    refs = reference_columns(references or [])
    if not refs.empty:
        _references(fig, metrics, spans, top_psnr, refs[refs["variant"].isin(shown)], colors)
    if "val_probe_acc" in spans:
        fig.update_yaxes(range=probe_range(table, refs[refs["variant"].isin(shown)] if not refs.empty else refs,
                                           target if target_metric == "val_probe_acc" else math.nan),
                         row=1, col=metrics.index("val_probe_acc") + 1)
    if target_metric in spans and not math.isnan(target):
        _line(fig, metrics.index(target_metric) + 1, spans[target_metric], target,
              f"target {target:.4g} ({BASELINE}'s worst final)", TARGET_COLOR, "longdashdot", width=2.5)
    fig.update_xaxes(title_text=label)
    fig.update_layout(**{**LAYOUT, "height": 480 if refs.empty else 540})
    return fig


# ---------------------------------------------------------------- time-to-target, speedup
def asymmetric_errors(centre: pd.Series, lo: pd.Series, hi: pd.Series) -> dict[str, Any]:
    """Plotly error_y for [lo, hi] around centre; no bar where the interval is unknown, never below zero."""
    plus = [None if _nan(c) or _nan(h) else max(h - c, 0.0) for c, h in zip(centre, hi, strict=True)]
    minus = [None if _nan(c) or _nan(v) else min(max(c - v, 0.0), c) for c, v in zip(centre, lo, strict=True)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


def time_axis(summary: pd.DataFrame) -> str:
    """The headline time-to-target axis: training FLOPs when the table had them, else samples seen."""
    return "tflops" if "tflops_to_target" in summary else "samples"


def _mark_never(fig: go.Figure, summary: pd.DataFrame, column: str, y: float) -> None:
    """Say so where a variant has no value (it never reached the target), which also keeps its place on the axis."""
    never = summary.loc[summary[column].isna(), "variant"].tolist() if column in summary else []
    if never:
        label = "never reached the target"
        fig.add_trace(go.Scatter(x=never, y=[y] * len(never), mode="text", text=[label] * len(never),
                                 textposition="top center", name=label, showlegend=False, hoverinfo="skip"))


def _reached_ticks(summary: pd.DataFrame) -> dict[str, Any]:
    """Category axis labelled with how many seeds reached the target."""
    return {"tickvals": summary["variant"].tolist(),
            "ticktext": [f"{v}<br>reached {r}" for v, r in zip(summary["variant"], summary["reached_target"],
                                                                  strict=True)]}


def time_to_target_figure(summary: pd.DataFrame) -> go.Figure:
    """Bars: compute (TFLOP, else samples) each variant spent to first reach the target; geometric means over the
    seeds that reached it with their 95% interval (none drawn where fewer than two seeds reached it)."""
    axis = time_axis(summary)
    name, unit = TIME_AXES[axis]
    s, a = summary, summary.attrs
    colors = variant_colors(s["variant"].tolist())
    fig = go.Figure(go.Bar(x=s["variant"], y=s[f"{axis}_to_target"], marker_color=[colors[v] for v in s["variant"]],
                           error_y=asymmetric_errors(s[f"{axis}_to_target"], s[f"{axis}_to_target_lo"],
                                                     s[f"{axis}_to_target_hi"]),
                           name=f"{unit} to target", showlegend=False))
    _mark_never(fig, s, f"{axis}_to_target", 0.0)
    fig.update_layout(**LAYOUT, yaxis_title=f"{unit} to target (geometric mean, 95% CI)", xaxis=_reached_ticks(s),
                      title=f"{name} to reach {a.get('target_metric', '')} = {a.get('target', float('nan')):.4g}")
    return fig


def speedup_figure(summary: pd.DataFrame) -> go.Figure:
    """Baseline's time / the variant's time on each axis (FLOPs first), log scale, with 1x and the claimed 3x."""
    s = summary
    fig = go.Figure()
    symbols = {"tflops": "diamond", "samples": "circle", "seconds": "square"}
    for axis, (name, _) in TIME_AXES.items():
        if f"speedup_{axis}" not in s:
            continue
        fig.add_trace(go.Scatter(x=s["variant"], y=s[f"speedup_{axis}"], mode="markers", name=f"speedup in {name}",
                                 marker={"symbol": symbols[axis], "size": 13 if axis == "tflops" else 9},
                                 error_y=asymmetric_errors(s[f"speedup_{axis}"], s[f"speedup_{axis}_lo"],
                                                           s[f"speedup_{axis}_hi"]),
                                 hovertemplate="%{x}: %{y:.2f}x<extra>" + name + "</extra>"))
    # Shape labels, not add_hline's annotations: on a log axis an annotation's y is read as log10 (3 -> 1000).
    fig.add_hline(y=1.0, name="1x", line_dash="dot", line_color="grey",
                  label={"text": f"1x: as fast as {BASELINE}", "textposition": "end", "yanchor": "top"})
    fig.add_hline(y=CLAIM, name=f"{CLAIM:g}x", line_dash="dash", line_color="#d62728",
                  label={"text": f"{CLAIM:g}x: the paper's claim", "textposition": "end", "yanchor": "bottom"})
    _mark_never(fig, s, f"speedup_{time_axis(s)}", math.sqrt(CLAIM))  # between 1x and the claim
    # An explicit range that holds every interval, 1x and the claim (with room for their labels), and ratio ticks.
    values = [v for c in s.columns if c.startswith("speedup_") for v in s[c] if not _nan(v) and v > 0] + [1.0, CLAIM]
    low, high = math.log10(min(values)) - 0.15, math.log10(max(values)) + 0.2
    ticks = [t for t in (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 100) if low <= math.log10(t) <= high]
    fig.update_layout(**LAYOUT, scattermode="group",
                      yaxis={"type": "log", "title": f"x {BASELINE} (log scale)", "range": [low, high],
                             "tickvals": ticks, "ticktext": [f"{t:g}x" for t in ticks]}, xaxis=_reached_ticks(s))
    return fig


# ---------------------------------------------------------------- final quality
def _pm(mean: Any, hw: Any, fmt: str) -> str:
    if _nan(mean):
        return "—"
    return f"{mean:{fmt}}" + ("" if _nan(hw) or hw == 0 else f" ± {hw:{fmt}}")


VERDICT_COLORS = {"yes": "#e3f4e3", "no": "#fbe3e3"}


def quality_table_figure(summary: pd.DataFrame) -> go.Figure:
    """Per variant: final quality next to its references, and what it spent."""
    s = summary
    get = lambda c: s[c] if c in s else pd.Series([float("nan")] * len(s))  # noqa: E731 - older tables lack some
    verdict = lambda c: s[c].fillna("n/a").tolist() if c in s else ["n/a"] * len(s)  # noqa: E731
    columns = {
        "variant": s["variant"].tolist(), "seeds": s["seeds"].tolist(),
        "PSNR dB (95% CI)": [_pm(m, h, ".2f") for m, h in zip(s["psnr"], s["psnr_ci95"], strict=True)],
        "fill dB": [_pm(m, None, ".2f") for m in get("fill_psnr")],
        "ceiling dB": [_pm(m, None, ".2f") for m in get("ceiling_psnr")],
        "beats fill": verdict("beats_fill"),
        "masked MSE (95% CI)": [_pm(m, h, ".4f") for m, h in zip(s["masked_mse"], s["masked_mse_ci95"], strict=True)],
        "probe acc (95% CI)": [_pm(m, h, ".3f") for m, h in zip(get("probe_acc"), get("probe_acc_ci95"), strict=True)],
        "random-encoder probe": [_pm(m, h, ".3f") for m, h in zip(get("random_probe_acc"),
                                                                  get("random_probe_acc_ci95"), strict=True)],
        "raw-input probe": [_pm(m, None, ".3f") for m in get("raw_probe_acc")],
        "beats random": verdict("beats_random_probe"), "beats raw": verdict("beats_raw_probe"),
        "TFLOP spent": [_pm(m, None, ".3f") for m in get("train_tflops")],
        "steps": [_pm(m, None, ".0f") for m in s["steps"]], "reached target": s["reached_target"].tolist(),
    }
    fills = [[VERDICT_COLORS.get(v, "white") for v in values] if name.startswith("beats") else ["white"] * len(s)
             for name, values in columns.items()]
    fig = go.Figure(go.Table(columnwidth=[2.2] + [1] * (len(columns) - 1),
                             header={"values": list(columns), "fill_color": "#e8eef7", "align": "left"},
                             cells={"values": list(columns.values()), "align": "left", "height": 40,
                                    "fill_color": fills}))
    # Cells wrap to two lines ("11.21 ± 1.01"); rows are sized for that so none is cut off.
    fig.update_layout(template="plotly_white", height=90 + 46 * len(s), margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig
