"""Figures of a search's Optuna study (read from its journal; nothing is re-run).

Conditional parameters (mask_start and mask_ramp do not exist for the constant schedule) are
handled explicitly: Optuna's importance evaluators only use parameters present in every trial, so
importances are computed for the always-present parameters over all trials, and for each
conditional group over the trials in which it exists (the figure says over how many).
The objective is named after the search's `--metric` (args.json), not assumed to be PSNR.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from lmd.dashboard.figures import LAYOUT, variant_colors

OBJECTIVES = {"val_probe_acc": "held-out linear-probe accuracy", "val_psnr": "held-out PSNR (dB)"}
LEGACY_METRIC = "val_psnr"  # what a search maximised before it recorded --metric in args.json


def objective_label(metric: str) -> str:
    """Axis label of a search's objective (the column name itself for a metric this code does not know)."""
    return OBJECTIVES.get(metric, metric)


def completed_trials(study: Any) -> list[Any]:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
            and t.value is not None]


def history_figure(study: Any, label: str) -> go.Figure:
    from optuna.visualization import plot_optimization_history

    fig = plot_optimization_history(study, target_name=label)
    fig.update_layout(**LAYOUT, title=None)
    return fig


def parallel_figure(study: Any, label: str) -> go.Figure:
    from optuna.visualization import plot_parallel_coordinate

    fig = plot_parallel_coordinate(study, target_name=label)
    fig.update_layout(**{**LAYOUT, "height": 460}, title=None)
    return fig


def _importances(trials: list[Any], params: list[str], direction: Any) -> dict[str, float]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sub = optuna.create_study(direction=direction)
    sub.add_trials(trials)
    return get_param_importances(sub, params=params, evaluator=FanovaImportanceEvaluator(seed=0))


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
        if len(having) < 2 or len({t.value for t in having}) < 2:
            notes.append(f"{label}: too few distinct trials to estimate")
            continue
        try:
            result = _importances(having, shared, study.direction)
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
            x=[t.params.get("mask_end") for t in mine], y=[t.value for t in mine], mode="markers", name=scheduler,
            marker={"color": colors[scheduler], "size": 11, "line": {"width": 1, "color": "white"}},
            hovertext=[f"trial {t.number}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in t.params.items()) for t in mine]))
    fig.update_layout(**LAYOUT, xaxis_title="final mask ratio (mask_end)", yaxis_title=label)
    return fig
