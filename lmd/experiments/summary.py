"""The ablation's answer: per-variant final quality next to its references, and time-to-target at equal compute.

Per variant (over seeds): final held-out PSNR, masked MSE and linear-probe accuracy with 95%
t-intervals; the references of lmd.experiments.references (no-model fill, projector ceiling, probe
on raw inputs and on a random encoder) and whether the variant beats them (its interval entirely
above the reference's); and time-to-target on three axes: samples seen, training FLOPs (the
deterministic headline) and wall seconds. The target is the level of `target_metric` that every
seed of the baseline (pixel MAE) reaches within its budget: its worst final value over seeds. (Its
mean final would leave the seeds that end below their own mean short of the target by construction,
so every speed-up would be censored.) A trial's time-to-target is interpolated linearly between the
two evaluations that straddle it. Only trials that trained to their budget's end count; the others
(failed, stopped) are listed and left out.

Times and speedups are positive quantities, so their intervals are computed on the log scale
(geometric means; the speedup is the ratio of geometric means, with a Welch t-interval on the
difference of mean logs) and can never go below zero. Seeds that never reach the target are
counted (`reached`) and left out of the times. A seed that meets the target at its first evaluation
has only an upper bound on its time ("<= x"). Censoring makes a speed-up a one-sided bound, and the
verdicts claim only what that side supports (`speedup_claim`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lmd.experiments.results import complete_trials, final_rows, interval, reference_columns

BASELINE = "pixel_mae"  # the ablation's baseline variant (MAE as published): every target and speedup is against it
AXES = {"tflops": "train_flops", "samples": "samples_seen", "seconds": "wall_seconds"}
HIGHER_IS_BETTER = {"val_psnr": True, "val_probe_acc": True, "val_masked_mse_fixed": False}
# Targets must mean the same in every variant's space: masked MSE is in each variant's own space (latent
# vs pixel values, different patch sizes), so it is not one.
TARGET_METRICS = ("val_psnr", "val_probe_acc")


def crossing(trial: pd.DataFrame, metric: str, target: float, axis: str) -> float:
    """`axis` value where the trial's `metric` first reaches `target`, interpolated between evaluations
    (nan if it never does)."""
    evals = trial.dropna(subset=[metric]).sort_values("step")
    m, x = evals[metric].to_numpy(float), evals[axis].to_numpy(float)
    better = m >= target if HIGHER_IS_BETTER[metric] else m <= target
    if not better.any():
        return float("nan")
    k = int(np.argmax(better))
    if k == 0 or m[k] == m[k - 1]:
        return float(x[k])
    return float(x[k - 1] + (x[k] - x[k - 1]) * (target - m[k - 1]) / (m[k] - m[k - 1]))


def first_evaluation_reached(trial: pd.DataFrame, metric: str, target: float) -> bool:
    """True when the trial's first evaluation already meets the target: its crossing is only an upper bound."""
    evals = trial.dropna(subset=[metric]).sort_values("step")
    if evals.empty:
        return False
    first = float(evals[metric].iloc[0])
    return first >= target if HIGHER_IS_BETTER[metric] else first <= target


def target_level(final: pd.DataFrame, baseline: str, metric: str) -> float:
    """The target: the baseline's worst final `metric` over seeds, a level each of its seeds reaches within the
    budget (nan when the baseline or the metric is absent)."""
    if metric not in final:
        return float("nan")
    values = final.loc[final["variant"] == baseline, metric].dropna()
    if values.empty:
        return float("nan")
    return float(values.min() if HIGHER_IS_BETTER[metric] else values.max())


def bound_of(variant: dict[str, int], base: dict[str, int]) -> str:
    """Which way censoring biases a speedup (base time / variant time): "", "lower", "upper" or "both".

    A crossing at a first evaluation overstates that trial's time; a seed that never reached the target
    is left out, which drops the slowest times. So the reported speedup is a lower bound when the variant
    crossed at a first evaluation or baseline seeds never reached, an upper bound in the mirror cases.
    """
    lower = variant["first"] > 0 or base["missed"] > 0
    upper = variant["missed"] > 0 or base["first"] > 0
    return "both" if lower and upper else "lower" if lower else "upper" if upper else ""


def log_interval(values: pd.Series) -> tuple[float, float, float]:
    """Geometric mean and its 95% interval (t on the logs) of positive values; (nan,)*3 if none."""
    v = values.dropna()
    v = v[v > 0]
    if len(v) == 0:
        return (float("nan"),) * 3
    logs = np.log(v.to_numpy(float))
    centre = float(np.exp(logs.mean()))
    if len(v) < 2:
        return centre, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * logs.std(ddof=1) / math.sqrt(len(v))
    return centre, float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))


def speedup(base: pd.Series, variant: pd.Series) -> tuple[float, float, float]:
    """Ratio of geometric means base / variant and its 95% interval (Welch t on mean log differences)."""
    b, v = np.log(base.dropna().to_numpy(float)), np.log(variant.dropna().to_numpy(float))
    if len(b) == 0 or len(v) == 0:
        return (float("nan"),) * 3
    diff = b.mean() - v.mean()
    if len(b) < 2 or len(v) < 2:
        return float(np.exp(diff)), float("nan"), float("nan")
    sb, sv = b.var(ddof=1) / len(b), v.var(ddof=1) / len(v)
    if sb + sv == 0:
        return (float(np.exp(diff)),) * 3
    df = (sb + sv) ** 2 / (sb**2 / (len(b) - 1) + sv**2 / (len(v) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(sb + sv)
    return float(np.exp(diff)), float(np.exp(diff - half)), float(np.exp(diff + half))


def beats(mean: float, half: float, ref: float, ref_half: float, higher: bool = True) -> str:
    """'yes' when the variant's interval lies entirely beyond the reference's, 'no' otherwise, 'n/a' without data."""
    if any(isinstance(x, float) and math.isnan(x) for x in (mean, ref)):
        return "n/a"
    half = 0.0 if math.isnan(half) else half
    ref_half = 0.0 if math.isnan(ref_half) else ref_half
    return "yes" if (mean - half > ref + ref_half if higher else mean + half < ref - ref_half) else "no"


def summarize(table: pd.DataFrame, baseline: str = BASELINE, target_metric: str = "val_psnr",
              references: list[dict[str, Any]] | None = None, target: float | None = None) -> pd.DataFrame:
    """One row per variant; `attrs` hold the target, its metric and the baseline. `target` overrides the
    baseline's worst final (a fixed level, or another rule: benchmarks/target_null.py compares them)."""
    if target_metric not in TARGET_METRICS:
        raise ValueError(f"target metric {target_metric!r}: choose one of {', '.join(TARGET_METRICS)}")
    table, incomplete = complete_trials(table)
    final = final_rows(table)
    source = f"{baseline}'s worst final over seeds: a level each of its seeds reaches" if target is None else "given"
    if target is None:
        target = target_level(final, baseline, target_metric)
    rows, times, censored = [], {}, {}
    for variant, group in final.groupby("variant"):
        trials = [table[table["trial_id"] == t] for t in group["trial_id"]]
        times[variant] = {name: pd.Series([crossing(t, target_metric, target, col) for t in trials], dtype=float)
                          for name, col in AXES.items() if col in table}
        reached_any = next(iter(times[variant].values()), pd.Series(dtype=float))
        censored[variant] = {"first": sum(first_evaluation_reached(t, target_metric, target) for t in trials),
                             "missed": int(reached_any.isna().sum())}
        row: dict[str, Any] = {"variant": variant, "seeds": len(group), "steps": float(group["step"].mean()),
                               "samples": float(group["samples_seen"].mean()),
                               "device_hours": float(group["device_seconds"].sum()) / 3600}
        if "train_flops" in group:
            row["train_tflops"] = float(group["train_flops"].mean()) / 1e12
        for name, col in (("psnr", "val_psnr"), ("masked_mse", "val_masked_mse_fixed"), ("probe_acc", "val_probe_acc")):
            row[name], row[f"{name}_ci95"] = interval(group[col]) if col in group else (float("nan"),) * 2
        reached = next(iter(times[variant].values()), pd.Series(dtype=float))
        row["reached_target"] = f"{int(reached.notna().sum())}/{len(group)}"
        # What a reached seed can have spent: an interval's upper end beyond it is the t-interval's tail, not a time.
        spent = {"tflops": float(group["train_flops"].max()) if "train_flops" in group else math.inf,
                 "samples": float(group["samples_seen"].max()), "seconds": math.inf}
        for name, values in times[variant].items():
            scale = 1e12 if name == "tflops" else 1.0
            centre, lo, hi = log_interval(values)
            row[f"{name}_to_target"], row[f"{name}_to_target_lo"], row[f"{name}_to_target_hi"] = (
                centre / scale, lo / scale, min(hi, spent[name]) / scale)
        rows.append(row)
    summary = pd.DataFrame(rows)
    attrs = {"target": target, "target_metric": target_metric, "baseline": baseline, "incomplete": incomplete,
             "target_source": source}
    if summary.empty:
        summary.attrs.update(attrs)
        return summary
    for name in AXES:
        if name not in times.get(baseline, {}):
            continue
        cols = [f"speedup_{name}", f"speedup_{name}_lo", f"speedup_{name}_hi"]
        values = [(1.0, 1.0, 1.0) if v == baseline else speedup(times[baseline][name], times[v][name])
                  for v in summary["variant"]]
        summary[cols] = pd.DataFrame(values, columns=cols)
    if baseline in censored:
        summary["censoring"] = ["" if v == baseline else bound_of(censored[v], censored[baseline])
                                    for v in summary["variant"]]
        summary["first_eval_crossings"] = [censored[v]["first"] for v in summary["variant"]]
    refs = reference_columns(references or [])
    if not refs.empty:
        summary = summary.merge(refs, on="variant", how="left")
        verdicts = {"beats_fill": ("psnr", "fill_psnr"), "beats_raw_probe": ("probe_acc", "raw_probe_acc"),
                    "beats_random_probe": ("probe_acc", "random_probe_acc")}
        for verdict, (mine, ref) in verdicts.items():
            if ref in summary:
                summary[verdict] = [beats(r[mine], r[f"{mine}_ci95"], r[ref], r.get(f"{ref}_ci95", 0.0))
                                    for r in summary.to_dict("records")]
    summary = summary.sort_values("variant", ignore_index=True)
    summary.attrs.update(attrs)
    return summary


def _pm(mean: float, half: float, fmt: str) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:{fmt}}" if math.isnan(half) else f"{mean:{fmt}} ± {half:{fmt}}"


def _range(centre: float, lo: float, hi: float, fmt: str) -> str:
    if math.isnan(centre):
        return "-"
    return f"{centre:{fmt}}" if math.isnan(lo) else f"{centre:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _time(r: dict[str, Any], name: str, fmt: str) -> str:
    """A variant's time to the target on one axis: "<= x" when every seed that reached it did so at its first
    evaluation (only an upper bound is known, and an interval over identical bounds would mean nothing)."""
    centre = r.get(f"{name}_to_target", float("nan"))
    reached = int(str(r.get("reached_target", "0/0")).split("/")[0])
    if not math.isnan(centre) and reached and r.get("first_eval_crossings", 0) == reached:
        return f"<= {centre:{fmt}}"
    return _range(centre, r.get(f"{name}_to_target_lo", float("nan")), r.get(f"{name}_to_target_hi", float("nan")),
                  fmt)


def format_summary(summary: pd.DataFrame) -> str:
    """The printed answer: quality against references, then compute to the target, then verdicts."""
    incomplete = summary.attrs.get("incomplete", [])
    left_out = ([f"left out {len(incomplete)} trial(s) that stopped before the end of their budget: "
                 f"{', '.join(incomplete)}"] if incomplete else [])
    if summary.empty:
        return "\n".join(["no finished trials with evaluations"] + left_out)
    a = summary.attrs
    s = summary.to_dict("records")
    get = lambda r, k: r.get(k, float("nan"))  # noqa: E731 - older tables lack some columns
    lines = left_out + ["quality at the end of each variant's budget (mean ± 95% CI over seeds):",
             f"{'variant':<24}{'seeds':>6}{'PSNR dB':>16}{'fill dB':>9}{'ceiling':>9}{'> fill':>8}"
             f"{'probe acc':>17}{'random enc':>17}{'raw input':>11}{'> random':>10}"]
    for r in s:
        lines.append(f"{r['variant']:<24}{r['seeds']:>6}{_pm(r['psnr'], r['psnr_ci95'], '.2f'):>16}"
                     f"{get(r, 'fill_psnr'):>9.2f}{get(r, 'ceiling_psnr'):>9.2f}{r.get('beats_fill', 'n/a'):>8}"
                     f"{_pm(r['probe_acc'], r['probe_acc_ci95'], '.3f'):>17}"
                     f"{_pm(get(r, 'random_probe_acc'), get(r, 'random_probe_acc_ci95'), '.3f'):>17}"
                     f"{get(r, 'raw_probe_acc'):>11.3f}{r.get('beats_random_probe', 'n/a'):>10}")
    unit = {"val_psnr": " dB"}.get(a["target_metric"], "")
    if math.isnan(a["target"]):
        lines += ["", no_target(a)]
        return "\n".join(lines + [""] + verdicts(summary))
    lines += ["", f"time to the target {a['target_metric']} = {a['target']:.3f}{unit} ({a['target_source']}); "
              "geometric means [95% CI, capped at the budget] over the seeds that reached it (<= x: all of them at "
              "their first evaluation):",
              f"{'variant':<24}{'TFLOP spent':>12}{'reached':>9}{'TFLOP to target':>26}{'speedup (FLOPs)':>26}"
              f"{'speedup (samples)':>26}{'speedup (wall s)':>26}{'device-h':>10}"]
    for r in s:
        lines.append(f"{r['variant']:<24}{get(r, 'train_tflops'):>12.3f}{r['reached_target']:>9}"
                     f"{_time(r, 'tflops', '.3f'):>26}"
                     f"{_range(get(r, 'speedup_tflops'), get(r, 'speedup_tflops_lo'), get(r, 'speedup_tflops_hi'), '.2f'):>26}"  # noqa: E501
                     f"{_range(get(r, 'speedup_samples'), get(r, 'speedup_samples_lo'), get(r, 'speedup_samples_hi'), '.2f'):>26}"  # noqa: E501
                     f"{_range(get(r, 'speedup_seconds'), get(r, 'speedup_seconds_lo'), get(r, 'speedup_seconds_hi'), '.2f'):>26}"  # noqa: E501
                     f"{r['device_hours']:>10.4f}")
    lines.append(f"total device-hours: {summary['device_hours'].sum():.4f}")
    lines += [""] + verdicts(summary)
    return "\n".join(lines)


def no_target(attrs: dict[str, Any]) -> str:
    """Why a summary has no time-to-target: its baseline, against which every target is set, did not finish."""
    return (f"no time to target: the baseline {attrs['baseline']} has no finished trial with {attrs['target_metric']}"
            " here, and every target and speed-up is measured against it")


def verdicts(summary: pd.DataFrame) -> list[str]:
    """Plain sentences: which variants fail their references, and what the FLOPs speedups say about 3x."""
    out = []
    for r in summary.to_dict("records"):
        if r.get("beats_fill") == "no":
            out.append(f"{r['variant']}: held-out PSNR {r['psnr']:.2f} dB does not beat the no-model fill "
                       f"({r['fill_psnr']:.2f} dB) with non-overlapping intervals")
        if r.get("beats_random_probe") == "no":
            out.append(f"{r['variant']}: probe accuracy {r['probe_acc']:.3f} does not beat a random encoder's "
                       f"({r['random_probe_acc']:.3f})")
        if r.get("beats_raw_probe") == "no":
            out.append(f"{r['variant']}: probe accuracy {r['probe_acc']:.3f} does not beat the probe on raw inputs "
                       f"({r['raw_probe_acc']:.3f})")
        if r["variant"] != summary.attrs.get("baseline"):
            out += _target_not_learnt(r, summary.attrs)
        lo, hi = r.get("speedup_tflops_lo", float("nan")), r.get("speedup_tflops_hi", float("nan"))
        if r["variant"] != summary.attrs.get("baseline") and math.isnan(summary.attrs.get("target", math.nan)):
            continue  # format_summary says once why there is no target
        if r["variant"] != summary.attrs.get("baseline") and not math.isnan(lo):
            claim = speedup_claim(lo, hi, r.get("censoring", ""))
            out.append(f"{r['variant']}: FLOPs speedup {r['speedup_tflops']:.2f}x [{lo:.2f}, {hi:.2f}]: {claim}")
        elif r["variant"] != summary.attrs.get("baseline"):
            base = summary.attrs.get("baseline")
            base_reached = next((b["reached_target"] for b in summary.to_dict("records") if b["variant"] == base), "-")
            out.append(f"{r['variant']}: no FLOPs speedup interval: it needs >= 2 seeds reaching the target on both "
                       f"sides ({r['variant']} {r['reached_target']}, {base} {base_reached})")
    return out


# Why a speed-up is one-sided, by `bound_of`'s answer.
CENSORING_CAUSES = {
    "lower": "a lower bound: this variant met the target at a first evaluation, or baseline seeds never did",
    "upper": "an upper bound: seeds of this variant never met the target, or the baseline met it at a first "
             "evaluation",
    "both": "censored both ways (first-evaluation crossings and seeds that never met the target)"}


def speedup_claim(lo: float, hi: float, bound: str) -> str:
    """What a FLOPs speed-up interval [lo, hi] supports about 1x and 3x, given its censoring.

    A lower bound (the true speed-up may be larger) supports only "at least" claims; an upper bound only
    "below" claims; a two-sided censoring supports none.
    """
    if bound == "both":
        return f"no claim: {CENSORING_CAUSES['both']}"
    if bound == "lower":
        claim = ("above 3x" if lo > 3 else "at least 1x; 3x is not excluded" if lo >= 1 else
                 "no claim: its interval reaches below 1x and the true speed-up may be larger")
        return f"{claim} ({CENSORING_CAUSES['lower']})"
    if bound == "upper":
        claim = ("below 1x (slower than the baseline)" if hi < 1 else "below 3x; faster than 1x is not shown"
                 if hi < 3 else "no claim: its interval reaches above 3x and the true speed-up may be smaller")
        return f"{claim} ({CENSORING_CAUSES['upper']})"
    return ("below 1x (slower than the baseline)" if hi < 1 else "above 3x" if lo > 3 else
            "at least 1x but below 3x" if lo >= 1 and hi < 3 else
            "spans 1x (not separable from the baseline)" if lo < 1 <= hi else
            "above 1x, and 3x lies within its interval")


# target metric -> (the no-model reference a target must clear to show learning, its half-width, its name)
TARGET_REFERENCES = {"val_probe_acc": ("random_probe_acc", "random_probe_acc_ci95", "its random encoder's probe"),
                     "val_psnr": ("fill_psnr", "", "its no-model fill")}


def _target_not_learnt(row: dict[str, Any], attrs: dict[str, Any]) -> list[str]:
    """A sentence when the target lies within (or below) the variant's no-model reference: reaching it then
    shows where the variant's input space starts (raw latents probe better than raw pixels), not what it learnt,
    so its time-to-target says little."""
    target, metric = attrs.get("target", math.nan), attrs.get("target_metric", "")
    if metric not in TARGET_REFERENCES:
        return []
    column, half_column, name = TARGET_REFERENCES[metric]
    ref, half = row.get(column, math.nan), row.get(half_column, 0.0) if half_column else 0.0
    half = 0.0 if half is None or math.isnan(half) else half
    if ref is None or math.isnan(ref) or math.isnan(target) or target > ref + half:
        return []
    shown = f"{ref:.3f} ± {half:.3f}" if half else f"{ref:.3f}"
    return [f"{row['variant']}: the target {target:.3f} is within or below {name} ({shown}): reaching it does not "
            "show learning, so its time-to-target measures where its input space starts, not a speed-up"]
