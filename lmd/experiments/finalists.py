"""The search's answer: finalists re-run with fresh seeds, against the paper's configuration, with intervals.

A search picks its best configurations as the maxima of many one-seed trials on the held-out half it
selects on (`data.heldout="select"`), so their search values are optimistic. The answer comes from
a second phase: the top `--finalists` configurations and the paper's own (cosine 0.15 -> 0.75 over
2/3 of training, the preset's depths, the default learning rate) are re-run with `--seeds` fresh
seeds at the same budget and scored on the other half (`"confirm"`), which nothing was selected on.
Per configuration: the mean and 95% t-interval of the objective, the probe and PSNR over seeds, next
to the no-model references computed on that half; and, against the paper's configuration, the
Welch 95% interval of the difference of means: "better" when it lies above 0, "worse" below,
"not separable" when it spans 0.

Also here, on plain tables (no torch, no Ray): the Pareto front of a two-objective search
(objective against encoder inference FLOPs) and each parameter's effect on the objective, in the
objective's units, to read beside the finalists' seed spread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lmd.experiments.results import final_rows, interval, reference_columns, stopped_short
from lmd.experiments.summary import beats

FINALISTS_FILE = "finalists.json"  # the answer (this module's `finalists_record`)
FINALISTS_PLAN_FILE = "finalists_plan.json"  # which configurations the finalist phase runs (kept for --resume)
FINALISTS_RESULTS_FILE = "finalists.parquet"  # the finalist phase's tidy table
FINALISTS_RUN = "finalists"  # the finalist phase's Tune run, inside the experiment folder
PARETO_FILE = "pareto.json"
IMPORTANCES_FILE = "importances.json"
PAPER = "paper_default"  # the paper's configuration among the finalists
# Fresh seeds: the search's trials all train with seed 0; finalists with FINALIST_SEED0, FINALIST_SEED0 + 1, ...
FINALIST_SEED0 = 1000
# What a search samples (Optuna's names) -> the results table's column (`lr` there is the step's scheduled rate).
PARAMS = {"scheduler": "scheduler", "mask_start": "mask_start", "mask_end": "mask_end", "mask_ramp": "mask_ramp",
          "depth": "depth", "decoder_depth": "decoder_depth", "lr": "peak_lr"}
ENCODER_COST = "encoder_gflops"  # the second objective: encoder inference GFLOP per image (lower is better)
VERDICTS = ("better", "worse", "not separable")
# (metric, its reference column, the name a sentence uses): what a finalist must beat to have learnt something.
JUDGED = (("val_psnr", "fill_psnr", "the no-model fill"),
          ("val_probe_acc", "random_probe_acc", "a random encoder of its geometry"),
          ("val_probe_acc", "raw_probe_acc", "the probe on raw inputs"))


@dataclass(frozen=True)
class Finalist:
    """One configuration of the finalist phase: a search trial's, or the paper's."""

    name: str  # "finalist_1", ..., or PAPER: the finalist trials' variant
    rank: int | None  # its place in the search (1 = best), None for the paper's configuration
    source_trial: str | None  # the search trial whose configuration it re-runs
    search_value: float | None  # that trial's objective on the selection half (one seed: optimistic)
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "source_trial": self.source_trial,
                "search_value": self.search_value, "params": self.params}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Finalist:
        return cls(name=str(raw["name"]), rank=raw["rank"], source_trial=raw["source_trial"],
                   search_value=raw["search_value"], params=dict(raw["params"]))


def params_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values from its results row (a constant schedule has no start and no ramp)."""
    out: dict[str, Any] = {}
    for name, column in PARAMS.items():
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if name in ("mask_start", "mask_ramp") and row.get("scheduler") == "constant":
            continue
        out[name] = int(value) if name in ("depth", "decoder_depth") else (
            value if isinstance(value, str) else float(value))
    return out


def finished_finals(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The last evaluation of every trial that trained to the end of its budget (a trial an early stop cut short has
    a value at a smaller budget, not a final one)."""
    final = final_rows(table, metric)
    return final[[not stopped_short(row) for row in final.to_dict("records")]]


def choose_finalists(table: pd.DataFrame, metric: str, k: int) -> list[Finalist]:
    """The `k` best distinct configurations by final `metric` (higher is better), among the search trials that
    trained to the end of their budget (a trial stopped early has a value at a smaller budget)."""
    final = finished_finals(table, metric)
    final = final.sort_values([metric, "trial_id"], ascending=[False, True])
    chosen: list[Finalist] = []
    seen: set[str] = set()
    for row in final.to_dict("records"):
        params = params_of(row)
        key = repr(sorted(params.items()))
        if key in seen:
            continue
        seen.add(key)
        chosen.append(Finalist(f"finalist_{len(chosen) + 1}", len(chosen) + 1, str(row["trial_id"]),
                               float(row[metric]), params))
        if len(chosen) == k:
            break
    return chosen


def finalist_seeds(count: int) -> list[int]:
    """Fresh seeds for the finalist phase (never a search trial's seed, 0)."""
    return [FINALIST_SEED0 + i for i in range(count)]


def difference(mine: Sequence[float], paper: Sequence[float]) -> tuple[float, float, float]:
    """Mean difference mine - paper and its 95% Welch t-interval (nan bounds with fewer than 2 values a side)."""
    a, b = np.asarray(mine, float), np.asarray(paper, float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) == 0 or len(b) == 0:
        return (math.nan,) * 3
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    return diff, diff - half, diff + half


def verdict(lo: float, hi: float) -> str:
    """'better' when the interval of the difference lies above 0, 'worse' below, else 'not separable'."""
    if math.isnan(lo) or math.isnan(hi):
        return "not separable"
    return "better" if lo > 0 else "worse" if hi < 0 else "not separable"


def _stats(values: pd.Series) -> dict[str, Any]:
    mean, half = interval(values)
    return {"mean": mean, "ci95": half, "values": [float(v) for v in values.dropna()]}


def finalists_record(table: pd.DataFrame, finalists: Sequence[Finalist], metric: str, seeds: Sequence[int],
                     references: list[dict[str, Any]], budget: Mapping[str, Any]) -> dict[str, Any]:
    """finalists.json: per configuration its seeds' objective, probe and PSNR with intervals, its references and
    which it beats, its difference to the paper's configuration with a verdict, and the answer in one sentence."""
    final = finished_finals(table, metric)
    refs = reference_columns(references).set_index("variant") if references else pd.DataFrame()
    paper_values = final.loc[final["variant"] == PAPER, metric]
    rows = []
    for f in finalists:
        mine = final[final["variant"] == f.name]
        ref = refs.loc[f.name].to_dict() if f.name in refs.index else {}
        ref = {k: float(v) for k, v in ref.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        row: dict[str, Any] = {**f.to_dict(), "n": int(len(mine)), "trial_ids": sorted(map(str, mine["trial_id"])),
                               "encoder_gflops": float(mine[ENCODER_COST].iloc[0]) if len(mine) else math.nan,
                               "train_tflops": float(mine["train_flops"].mean()) / 1e12 if len(mine) else math.nan}
        for column in ("val_psnr", "val_probe_acc"):
            row[column] = _stats(mine[column]) if column in mine else _stats(pd.Series(dtype=float))
        row["references"] = ref
        row["beats"] = {}
        for column, reference, _ in JUDGED:
            if reference in ref and not math.isnan(row[column]["mean"]):
                row["beats"][reference] = beats(row[column]["mean"], row[column]["ci95"], ref[reference],
                                                ref.get(f"{reference}_ci95", 0.0))
        if f.name == PAPER:
            row["vs_paper"] = None
        else:
            diff, lo, hi = difference(mine[metric], paper_values)
            row["vs_paper"] = {"metric": metric, "diff": diff, "lo": lo, "hi": hi, "verdict": verdict(lo, hi)}
        rows.append(row)
    record = {"metric": metric, "heldout": "confirm", "seeds": list(seeds), "budget": dict(budget), "paper": PAPER,
              "finalists": rows}
    record["answer"] = answer(record)
    return record


def _describe(params: Mapping[str, Any]) -> str:
    text = f"{params.get('scheduler')}"
    if "mask_start" in params:
        text += f" {params['mask_start']:.2f}->{params['mask_end']:.2f} over {params['mask_ramp']:.2f}"
    else:
        text += f" {params.get('mask_end', math.nan):.2f}"
    return (text + f", depth {params.get('depth')}/{params.get('decoder_depth')}, lr {params.get('lr', math.nan):.2g}")


def _unit(metric: str) -> str:
    return " dB" if metric == "val_psnr" else ""


def answer(record: Mapping[str, Any]) -> str:
    """The search's answer in one sentence: the best finalist on the confirmation half against the paper's
    configuration, with the interval of the difference, and first, when it is so, that it beats no reference."""
    metric = record["metric"]
    rows = [r for r in record["finalists"] if r["name"] != record["paper"] and r["n"] > 0]
    if not rows:
        return "no finalist finished its budget: the search has no answer"
    best = max(rows, key=lambda r: r[metric]["mean"])
    vs = best["vs_paper"]
    fmt = ".2f" if metric == "val_psnr" else ".3f"
    said = {"better": "beats", "worse": "is worse than", "not separable": "is not separable from"}[vs["verdict"]]
    bounds = "" if math.isnan(vs["lo"]) else f" [{vs['lo']:+{fmt}}, {vs['hi']:+{fmt}}]"
    sentence = (f"{best['name']} ({_describe(best['params'])}) {said} the paper's configuration on {metric}: "
                f"{vs['diff']:+{fmt}}{_unit(metric)}{bounds} over {best['n']} fresh seeds on held-out items the "
                "search did not select on")
    missed = [name for column, reference, name in JUDGED
              if column == metric and best["beats"].get(reference) == "no"]
    if missed:
        sentence = f"the search's best configuration does not beat {', '.join(missed)}; " + sentence
    for other in sorted({column for column, _, _ in JUDGED} - {metric}):  # the other measure, said too
        names = [name for column, reference, name in JUDGED if column == other and best["beats"].get(reference) == "no"]
        if names:
            sentence += f"; on {other} it does not beat {', '.join(names)}"
    return sentence


def format_finalists(record: Mapping[str, Any]) -> str:
    """The finalists as printed: the answer first, then one line per configuration."""
    metric = record["metric"]
    fmt = ".2f" if metric == "val_psnr" else ".3f"
    lines = [f"answer: {record['answer']}",
             f"finalists: {len(record['seeds'])} fresh seeds each ({', '.join(map(str, record['seeds']))}), the "
             f"full budget, scored on the held-out half the search did not select on (mean ± 95% CI):",
             f"{'configuration':<16}{'search':>8}{'PSNR dB':>16}{'fill':>7}{'ceiling':>8}"
             f"{'probe':>16}{'random enc':>18}"
             f"  {'vs paper (' + metric + ')':<36}params"]
    for r in record["finalists"]:
        ref, vs = r["references"], r["vs_paper"]
        search = "-" if r["search_value"] is None else format(r["search_value"], fmt)
        versus = "(the reference)" if vs is None else (
            f"{vs['diff']:+{fmt}} [{vs['lo']:+{fmt}}, {vs['hi']:+{fmt}}] {vs['verdict']}"
            if not math.isnan(vs["lo"]) else f"{vs['diff']:+{fmt}} {vs['verdict']}")
        lines.append(f"{r['name']:<16}{search:>8}{_pm(r['val_psnr'], '.2f'):>16}{_num(ref, 'fill_psnr', '.2f'):>7}"
                     f"{_num(ref, 'ceiling_psnr', '.2f'):>8}"
                     f"{_pm(r['val_probe_acc'], '.3f'):>16}"
                     f"{_num(ref, 'random_probe_acc', '.3f') + ' ± ' + _num(ref, 'random_probe_acc_ci95', '.3f'):>18}"
                     f"  {versus:<36}{_describe(r['params'])}")
    return "\n".join(lines)


def _pm(stat: Mapping[str, Any], fmt: str) -> str:
    mean, half = stat["mean"], stat["ci95"]
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:{fmt}}" if half is None or math.isnan(half) else f"{mean:{fmt}} ± {half:{fmt}}"


def _num(ref: Mapping[str, Any], key: str, fmt: str) -> str:
    value = ref.get(key)
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def pareto_front(points: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.Series:
    """Which rows of `points` are non-dominated for `objectives` ((column, "max"|"min"), ...): a row is dominated
    when another is at least as good on every objective and strictly better on one."""
    signs = np.array([1.0 if mode == "max" else -1.0 for _, mode in objectives])
    values = points[[column for column, _ in objectives]].to_numpy(float) * signs  # higher is better on every axis
    front = []
    for i, row in enumerate(values):
        others = np.delete(values, i, axis=0)
        dominated = bool(np.any(np.all(others >= row, axis=1) & np.any(others > row, axis=1)))
        front.append(not dominated and not np.isnan(row).any())
    return pd.Series(front, index=points.index)


def pareto_record(table: pd.DataFrame, metric: str) -> dict[str, Any]:
    """pareto.json: the search trials that finished their budget, split into the front and the dominated."""
    final = finished_finals(table, metric)
    objectives = [(metric, "max"), (ENCODER_COST, "min")]
    on_front = pareto_front(final, objectives) if len(final) else pd.Series(dtype=bool)
    points = [{"trial_id": str(r["trial_id"]), "params": params_of(r), metric: float(r[metric]),
               ENCODER_COST: float(r[ENCODER_COST])} for r in final.to_dict("records")]
    front = [p for p, keep in zip(points, on_front, strict=True) if keep]
    return {"objectives": [{"name": n, "mode": m} for n, m in objectives],
            "front": sorted(front, key=lambda p: p[ENCODER_COST]),
            "others": [p for p, keep in zip(points, on_front, strict=True) if not keep]}


def format_pareto(record: Mapping[str, Any]) -> str:
    metric = record["objectives"][0]["name"]
    lines = [f"Pareto front ({metric} up, encoder GFLOP per image down): {len(record['front'])} of "
             f"{len(record['front']) + len(record['others'])} finished trials"]
    lines += [f"  {p[ENCODER_COST]:.4f} GFLOP  {metric} {p[metric]:.3f}  {_describe(p['params'])}  ({p['trial_id']})"
              for p in record["front"]]
    return "\n".join(lines)


def parameter_effects(table: pd.DataFrame, metric: str) -> dict[str, float]:
    """Per sampled parameter, the spread (max - min) of the mean final `metric` across its levels, in the metric's
    units, over the search trials that finished their budget: categories and integers level by value, continuous
    parameters by terciles. Comparable with the finalists' seed spread, unlike a normalised importance."""
    final = finished_finals(table, metric)
    effects = {}
    for name, col in PARAMS.items():
        if col not in final or final[col].isna().all():
            continue
        column = final[col]
        if name in ("scheduler", "depth", "decoder_depth"):
            levels = column
        else:
            present = column.dropna()
            if present.nunique() < 3:
                continue
            levels = pd.qcut(column, 3, duplicates="drop")
        means = final[metric].groupby(levels, observed=True).mean()
        if len(means) >= 2:
            effects[name] = float(means.max() - means.min())
    return effects


def importances_record(importances: Mapping[str, float], effects: Mapping[str, float], metric: str, trials: int,
                       evaluator: str, seed_spread: float | None) -> dict[str, Any]:
    """importances.json: Optuna's normalised importance and the effect in the metric's units, per parameter, and
    the finalists' seed spread (median 95% half-width) to read them against."""
    names = sorted(set(importances) | set(effects), key=lambda n: -importances.get(n, 0.0))
    return {"evaluator": evaluator, "objective": metric, "trials": trials,
            "importances": {n: {"importance": importances.get(n), "effect": effects.get(n)} for n in names},
            "seed_spread": seed_spread}


def seed_spread(record: Mapping[str, Any]) -> float | None:
    """The median half-width of the finalists' 95% seed interval on the objective (None without any)."""
    halves = [r[record["metric"]]["ci95"] for r in record["finalists"]]
    halves = [h for h in halves if h is not None and not math.isnan(h)]
    return float(np.median(halves)) if halves else None


def format_importances(record: Mapping[str, Any]) -> str:
    spread = record["seed_spread"]
    noise = "unknown" if spread is None else f"{spread:.3f}"
    lines = [f"parameter importances ({record['evaluator']}, {record['trials']} finished trials) and effects on "
             f"{record['objective']} (spread of its mean across the parameter's levels), beside the finalists' seed "
             f"noise (median 95% half-width {noise}):"]
    for name, v in record["importances"].items():
        effect = v["effect"]
        below = "" if spread is None or effect is None else ("  (below seed noise)" if effect < spread else "")
        lines.append(f"  {name:<14} importance {_or_dash(v['importance'], '.2f'):>5}   effect "
                     f"{_or_dash(effect, '.3f'):>7}{below}")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float as None: the files stay strict JSON (NaN is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _or_dash(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)
