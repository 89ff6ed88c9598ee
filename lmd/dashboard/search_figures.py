"""Figures of a search: its trials from the results table, its records (pareto.json, importances.json) and its
Optuna study (read from its journal; nothing is re-run).

From the table: the objective against training FLOPs per trial, with the trials ASHA stopped early
marked as stopped (their last value is at a smaller budget, so they are left out of everything that
compares finished trials), and the parallel coordinates of the sampled values (read from the table,
so they need no journal). From the records: each parameter's effect on the objective beside the
finalists' seed noise, and the Pareto front of the objective against encoder inference GFLOP.

Conditional parameters (mask_start and mask_ramp do not exist for the constant schedule) are
handled explicitly: Optuna's importance evaluators only use parameters present in every trial, so
importances are computed for the always-present parameters over all trials, and for each
conditional group over the trials in which it exists (the figure says over how many).
The objective is named after the search's `--metric` (args.json), not assumed to be PSNR. A search run with
--objectives has a two-objective study; its journal panels show the first objective (the metric),
the second (encoder GFLOP) being the Pareto panel's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lmd.dashboard.figures import GREY, LAYOUT, variant_colors
from lmd.experiments.results import final_rows

OBJECTIVES = {"val_probe_acc": "held-out linear-probe accuracy", "val_psnr": "held-out PSNR (dB)"}
LEGACY_METRIC = "val_psnr"  # what a search maximised before it recorded --metric in args.json
# What a search samples, as the results table's columns, in the parallel coordinates' order (the objective last).
# The results table's columns of what a search samples (`peak_lr`: the sampled learning rate; `lr` is the step's).
SAMPLED = ("scheduler", "mask_end", "mask_start", "mask_ramp", "depth", "decoder_depth", "peak_lr")
SECOND_OBJECTIVES = {"encoder_gflops": "encoder GFLOP per image (inference, all patches visible)"}
FRONT_COLOR, NOISE_COLOR = "#1f77b4", "#d62728"


def objective_label(metric: str) -> str:
    """Axis label of a search's objective (the column name itself for a metric this code does not know)."""
    return OBJECTIVES.get(metric, metric)


def objective(trial: Any) -> float:
    """A trial's objective: its value, or the first of its values in a two-objective study (Optuna's `value`
    raises there)."""
    return trial.values[0]


def _target(study: Any) -> Any:
    """Optuna's `target` for the plots: None for one objective, the first for several (which need one)."""
    return objective if len(study.directions) > 1 else None


def completed_trials(study: Any) -> list[Any]:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
            and t.values is not None]


def history_figure(study: Any, label: str) -> go.Figure:
    from optuna.visualization import plot_optimization_history

    fig = plot_optimization_history(study, target=_target(study), target_name=label)
    fig.update_layout(**LAYOUT, title=None)
    return fig


def parallel_figure(study: Any, label: str) -> go.Figure:
    from optuna.visualization import plot_parallel_coordinate

    fig = plot_parallel_coordinate(study, target=_target(study), target_name=label)
    fig.update_layout(**{**LAYOUT, "height": 460}, title=None)
    return fig


def _importances(trials: list[Any], params: list[str], study: Any) -> dict[str, float]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sub = optuna.create_study(directions=study.directions)
    sub.add_trials(trials)
    return get_param_importances(sub, params=params, evaluator=FanovaImportanceEvaluator(seed=0),
                                 target=_target(study))


def param_groups(trials: list[Any]) -> list[tuple[list[str], list[Any]]]:
    """[(params, trials having all of them)]: the always-present params first, then each conditional set."""
    every = set.intersection(*(set(t.params) for t in trials))
    groups = [(sorted(every), trials)]
    conditional: dict[frozenset[str], list[Any]] = {}
    for t in trials:
        extra = frozenset(set(t.params) - every)
        if extra:
            conditional.setdefault(extra, []).append(t)
    for extra, having in sorted(conditional.items(), key=lambda kv: sorted(kv[0])):
        groups.append((sorted(extra), having))
    return groups


def importance_figure(study: Any) -> go.Figure:
    """fANOVA importances, one bar series per parameter group.

    The first series covers every trial and its always-present parameters; each conditional series
    is a separate fit over only the trials where those parameters exist, with all the parameters
    those trials share (each series sums to 1 on its own, so compare bars within a series).
    """
    trials = completed_trials(study)
    fig = go.Figure()
    notes = []
    for params, having in param_groups(trials):
        conditional = having is not trials
        shared = sorted(set.intersection(*(set(t.params) for t in having))) if conditional else params
        label = (f"all {len(having)} trials" if not conditional else
                 f"the {len(having)} trials with {', '.join(params)}")
        if len(having) < 2 or len({objective(t) for t in having}) < 2:
            notes.append(f"{label}: too few distinct trials to estimate")
            continue
        try:
            result = _importances(having, shared, study)
        except (RuntimeError, ValueError) as err:
            notes.append(f"{label}: not estimable ({err})")
            continue
        fig.add_trace(go.Bar(x=list(result.values()), y=list(result), orientation="h", name=f"over {label}"))
    if notes:
        fig.add_annotation(text="; ".join(notes), xref="paper", yref="paper", x=0, y=-0.25, showarrow=False)
    rows = len({name for trace in fig.data for name in trace.y})
    fig.update_layout(**{**LAYOUT, "height": 160 + 34 * max(rows, 1)}, barmode="group",
                      xaxis_title="fANOVA importance (each series sums to 1)", yaxis={"autorange": "reversed"})
    return fig


def slice_figure(study: Any, label: str) -> go.Figure:
    """Final mask ratio x scheduler: each trial's objective against its final ratio, one colour per scheduler."""
    trials = completed_trials(study)
    schedulers = sorted({str(t.params.get("scheduler")) for t in trials})
    colors = variant_colors(schedulers)
    fig = go.Figure()
    for scheduler in schedulers:
        mine = [t for t in trials if str(t.params.get("scheduler")) == scheduler]
        fig.add_trace(go.Scatter(
            x=[t.params.get("mask_end") for t in mine], y=[objective(t) for t in mine], mode="markers", name=scheduler,
            marker={"color": colors[scheduler], "size": 11, "line": {"width": 1, "color": "white"}},
            hovertext=[f"trial {t.number}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in t.params.items()) for t in mine]))
    fig.update_layout(**LAYOUT, xaxis_title="final mask ratio (mask_end)", yaxis_title=label)
    return fig


# ---------------------------------------------------------------- from the results table
def last_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each trial's last row, with `stopped`: it ended before its total_steps (ASHA stopped it, or it failed). A
    trial without total_steps (older tables, or a column the loader filled with NA) counts as finished."""
    last = table.sort_values("step").groupby("trial_id").tail(1).copy()
    total = pd.to_numeric(last["total_steps"], errors="coerce") if "total_steps" in last else np.nan
    last["stopped"] = (last["step"] < total).fillna(False).astype(bool) if "total_steps" in last else False
    return last


def finished_finals(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The final evaluation of every trial that trained to its budget's end: what the search compares."""
    last = last_rows(table)
    return final_rows(table[table["trial_id"].isin(last.loc[~last["stopped"], "trial_id"])], metric)


def objective_flops_figure(table: pd.DataFrame, metric: str, label: str, budget_tflops: float | None = None
                           ) -> go.Figure:
    """The objective of every trial against its training TFLOP, one line per trial coloured by scheduler.

    ASHA's rungs are in training FLOPs, so this is the axis on which it stopped trials: a stopped
    trial's line is dashed, named as stopped in the legend and hover, and its last evaluation carries
    an X (the value ASHA stopped it on, at a smaller budget than the finished trials' ends).
    """
    evals = table.dropna(subset=[metric, "train_flops"])
    last = last_rows(table).set_index("trial_id")
    colors = variant_colors(sorted(evals["variant"].astype(str).unique()))
    fig = go.Figure()
    shown: set[str] = set()
    stops: list[dict[str, Any]] = []
    for trial_id, trial in evals.groupby("trial_id", sort=True):
        trial = trial.sort_values("step")
        scheduler, end = str(trial["variant"].iloc[0]), last.loc[trial_id]
        stopped = bool(end["stopped"])
        about = (f"{trial_id} ({scheduler}): stopped early at step {int(end['step'])} of {int(end['total_steps'])}"
                 if stopped else f"{trial_id} ({scheduler})")
        x, y = trial["train_flops"] / 1e12, trial[metric]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", legendgroup=scheduler,
                                 name=f"{scheduler} · {trial_id}, stopped early" if stopped else scheduler,
                                 showlegend=stopped or scheduler not in shown, hovertext=about,
                                 hovertemplate="%{hovertext}<br>%{x:.4g} TFLOP: %{y:.4g}<extra></extra>",
                                 line={"color": colors[scheduler], "dash": "dash" if stopped else "solid"},
                                 marker={"size": 5}, opacity=0.7 if stopped else 1.0))
        if not stopped:
            shown.add(scheduler)
        else:
            stops.append({"x": float(x.iloc[-1]), "y": float(y.iloc[-1]), "about": about, "color": colors[scheduler]})
    if stops:
        fig.add_trace(go.Scatter(x=[s["x"] for s in stops], y=[s["y"] for s in stops], mode="markers",
                                 name=f"stopped early by ASHA ({len(stops)})", hovertext=[s["about"] for s in stops],
                                 hovertemplate="%{hovertext}<extra></extra>",
                                 marker={"symbol": "x", "size": 13, "color": [s["color"] for s in stops],
                                         "line": {"width": 1.5, "color": "black"}}))
    if budget_tflops is not None:
        fig.add_vline(x=budget_tflops, name="budget", line_dash="dot", line_color=GREY,
                      annotation_text=f"budget {budget_tflops:g} TFLOP", annotation_position="top left")
    fig.update_layout(**LAYOUT, xaxis_title="training TFLOP (transformer forward + backward)", yaxis_title=label)
    return fig


def sampled_columns(table: pd.DataFrame) -> list[str]:
    """The sampled values the table holds (tables before results schema 4 hold neither depths nor peak_lr)."""
    return [c for c in SAMPLED if c in table and table[c].notna().any()]


def _dimension(name: str, values: pd.Series) -> dict[str, Any]:
    """One parcoords axis: categories as integer codes with their names, depths with whole ticks, lr on log10."""
    if name == "scheduler":
        levels = sorted(values.dropna().astype(str).unique())
        return {"label": name, "values": [levels.index(str(v)) for v in values], "tickvals": list(range(len(levels))),
                "ticktext": levels, "range": [0, max(len(levels) - 1, 1)]}
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    if name in ("depth", "decoder_depth"):
        ticks = sorted(numbers.dropna().unique())
        return {"label": name, "values": numbers, "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}
    if name == "peak_lr":
        logs = np.log10(numbers)
        ticks = np.linspace(logs.min(), logs.max(), 4) if logs.max() > logs.min() else [logs.min()]
        return {"label": "lr (log scale)", "values": logs, "tickvals": list(ticks),
                "ticktext": [f"{10 ** t:.2g}" for t in ticks]}
    return {"label": name, "values": numbers}


def sampled_parallel_figure(table: pd.DataFrame, metric: str, label: str) -> go.Figure | None:
    """Parallel coordinates of the sampled values and the objective, one line per trial that finished its budget,
    coloured by the objective; None when the table holds no sampled values (results schema 1)."""
    columns = sampled_columns(table)
    final = finished_finals(table, metric) if metric in table else table.iloc[:0]
    if not columns or final.empty:
        return None
    dims = [_dimension(c, final[c]) for c in columns] + [{"label": label, "values": final[metric].astype(float)}]
    line = {"color": final[metric].astype(float), "colorscale": "Viridis", "showscale": True,
            "colorbar": {"title": {"text": "objective"}}}
    fig = go.Figure(go.Parcoords(dimensions=dims, line=line, labelangle=-20))
    fig.update_layout(**{**LAYOUT, "height": 460, "margin": {"l": 70, "r": 40, "t": 90, "b": 40}})
    return fig


# ---------------------------------------------------------------- from the search's records
def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def effects_figure(importances: dict[str, Any], label: str) -> go.Figure:
    """Each parameter's effect (the spread of the objective's mean across its levels, in the objective's units) with
    the finalists' seed noise as a line: an effect below it moves the objective less than a change of seed does.
    Optuna's (normalised, unitless) importance is written on each bar, since it cannot share the axis."""
    rows = [(name, _number(v.get("effect")), _number(v.get("importance")))
            for name, v in importances["importances"].items()]
    drawn = sorted((r for r in rows if r[1] is not None), key=lambda r: -r[1])
    spread = _number(importances.get("seed_spread"))
    colors = [FRONT_COLOR if spread is None or effect >= spread else "#b0b0b0" for _, effect, _ in drawn]
    text = [f"importance {imp:.2f}" if imp is not None else "importance n/a" for *_, imp in drawn]
    fig = go.Figure(go.Bar(x=[r[0] for r in drawn], y=[r[1] for r in drawn], marker_color=colors, text=text,
                           textposition="outside", name="effect (spread of the mean across levels)",
                           hovertemplate="%{x}: effect %{y:.4g}<br>%{text}<extra></extra>"))
    if spread is not None:
        fig.add_hline(y=spread, name="seed noise", line_dash="dash", line_color=NOISE_COLOR, line_width=2,
                      label={"text": f"seed noise {spread:.3g} (finalists' median 95% half-width)",
                             "textposition": "end", "yanchor": "bottom"})
    missing = [name for name, effect, _ in rows if effect is None]
    if missing:
        fig.add_annotation(text=f"no effect estimated (too few levels): {', '.join(missing)}", xref="paper",
                           yref="paper", x=0, y=1.08, showarrow=False, xanchor="left")
    top = max([r[1] for r in drawn] + [spread or 0.0, 1e-12])
    fig.update_layout(**LAYOUT, showlegend=False, yaxis={"title": f"effect on {label}", "range": [0, 1.3 * top]},
                      xaxis_title=f"sampled parameter ({importances['evaluator']} importance over "
                                  f"{importances.get('trials', '?')} trials on each bar)")
    return fig


def _axis_title(objective: dict[str, str], metric: str, label: str) -> str:
    name = label if objective["name"] == metric else SECOND_OBJECTIVES.get(objective["name"], objective["name"])
    return f"{name} ({'higher' if objective['mode'] == 'max' else 'lower'} is better)"


def _params_text(point: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (point.get("params") or {}).items())
    return f"{point['trial_id']}: {params}" if params else point["trial_id"]


def pareto_figure(pareto: dict[str, Any], metric: str, label: str) -> go.Figure:
    """The objective against the second objective (encoder GFLOP per image) for the finished trials: the
    non-dominated ones joined as a staircase and highlighted, the dominated ones faded."""
    objectives = pareto["objectives"]
    y_obj = next((o for o in objectives if o["name"] == metric), objectives[0])
    x_obj = next(o for o in objectives if o is not y_obj)
    front = sorted(pareto["front"], key=lambda p: p[x_obj["name"]])
    others = pareto["others"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p[x_obj["name"]] for p in others], y=[p[y_obj["name"]] for p in others],
                             mode="markers", name=f"dominated trials ({len(others)})", opacity=0.35,
                             marker={"color": GREY, "size": 9}, hovertext=[_params_text(p) for p in others],
                             hovertemplate="%{hovertext}<br>%{x:.4g}, %{y:.4g}<extra>dominated</extra>"))
    # A point dominates towards worse x: to the right of it when x is minimised, so the staircase steps across first.
    shape = "hv" if x_obj["mode"] == "min" else "vh"
    fig.add_trace(go.Scatter(x=[p[x_obj["name"]] for p in front], y=[p[y_obj["name"]] for p in front],
                             mode="lines+markers", name=f"Pareto front ({len(front)} trials)",
                             line={"color": FRONT_COLOR, "width": 2.5, "shape": shape},
                             marker={"color": FRONT_COLOR, "size": 13, "line": {"width": 1.5, "color": "white"}},
                             hovertext=[_params_text(p) for p in front],
                             hovertemplate="%{hovertext}<br>%{x:.4g}, %{y:.4g}<extra>front</extra>"))
    fig.update_layout(**LAYOUT, xaxis_title=_axis_title(x_obj, metric, label),
                      yaxis_title=_axis_title(y_obj, metric, label))
    return fig
