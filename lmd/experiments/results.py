"""Tune results -> one tidy table (Parquet) -> the ablation summary.

Table contract (shared/DESIGN.md): one row per trial x report with trial_id, variant, seed, step,
samples_seen, wall_seconds, device_seconds and the metrics. Summary per variant: mean and 95%
t-interval over seeds of the final PSNR and masked MSE, time-to-target (training seconds until the
held-out PSNR first reaches the pixel-MAE baseline's mean final PSNR), speedup against pixel MAE
and device-hours.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

SCHEMA_VERSION = 2  # 2: + workers and the trial's config columns
SCHEMA_KEY = b"lmd_results_schema"  # Parquet schema metadata: which version wrote the file
ID_COLUMNS = ["trial_id", "variant", "seed", "step", "samples_seen", "wall_seconds", "device_seconds"]
METRIC_COLUMNS = ["loss", "mask_ratio", "lr", "val_masked_mse", "val_masked_mse_fixed", "val_psnr"]
# Data-parallel workers of the trial and the nodes they ran on (1, 1: the engine ran in the trial's process),
# and what the trial trained.
PLACEMENT_COLUMNS = ["workers", "num_nodes"]
CONFIG_COLUMNS = ["scheduler", "mask_start", "mask_end", "mask_ramp", "projector", "preset", "total_steps"]
COLUMNS = ID_COLUMNS + METRIC_COLUMNS + PLACEMENT_COLUMNS + CONFIG_COLUMNS


def trial_id_of(result: Any) -> str:
    """A Tune result's trial folder name (unique in its experiment): the table's trial_id."""
    return result.path.rstrip("/").split("/")[-1]


def tidy_table(results: Any, devices_per_trial: float) -> pd.DataFrame:
    """Every reported row of every trial of a `ResultGrid`."""
    frames = []
    for result in results:
        df = result.metrics_dataframe
        if df is None or df.empty:
            continue
        df = df.copy()
        df["trial_id"] = trial_id_of(result) if result.path else str(len(frames))
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    for column in METRIC_COLUMNS + CONFIG_COLUMNS:
        if column not in table:
            table[column] = float("nan")
    for column in PLACEMENT_COLUMNS:  # absent or NaN for rows of in-process trials: one worker on one node
        table[column] = table[column].fillna(1).astype("int64") if column in table else 1
    table["device_seconds"] = table["wall_seconds"] * devices_per_trial
    # A trial resumed after a driver crash may report a step again (from its last checkpoint): keep the newest.
    table = table.drop_duplicates(["trial_id", "step"], keep="last")
    table = table[COLUMNS]
    table = table.sort_values(["variant", "seed", "step"], ignore_index=True)
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Atomically, with the schema version in the Parquet metadata (the dashboard checks it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), SCHEMA_KEY: str(SCHEMA_VERSION).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(arrow, tmp)
    tmp.replace(path)


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The last evaluated row of every trial."""
    return table.dropna(subset=["val_psnr"]).sort_values("step").groupby("trial_id").tail(1)


def interval(values: pd.Series) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan half-width for a single value)."""
    values = values.dropna()
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    if n == 1:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def time_to_target(trial: pd.DataFrame, target: float) -> float:
    """Training seconds until the trial's held-out PSNR first reaches `target` (nan if never)."""
    reached = trial[trial["val_psnr"] >= target]
    return float(reached["wall_seconds"].iloc[0]) if len(reached) else float("nan")


def speedup_half_width(base: pd.Series | None, variant: pd.Series) -> float:
    """95% half-width of mean(base) / mean(variant) over the seeds that reached the target.

    Delta method on the ratio of two independent means (relative standard errors add in quadrature),
    with Welch-Satterthwaite degrees of freedom; nan when either side has fewer than two seeds.
    """
    if base is None:
        return float("nan")
    b, v = base.dropna(), variant.dropna()
    if len(b) < 2 or len(v) < 2:
        return float("nan")
    rb = b.std(ddof=1) / math.sqrt(len(b)) / b.mean()
    rv = v.std(ddof=1) / math.sqrt(len(v)) / v.mean()
    if rb == 0 and rv == 0:
        return 0.0
    df = (rb**2 + rv**2) ** 2 / (rb**4 / (len(b) - 1) + rv**4 / (len(v) - 1))
    return float(stats.t.ppf(0.975, df) * (b.mean() / v.mean()) * math.hypot(rb, rv))


def summarize(table: pd.DataFrame, baseline: str = "pixel_mae") -> pd.DataFrame:
    final = final_rows(table)
    target = float(final.loc[final["variant"] == baseline, "val_psnr"].mean()) if baseline in set(
        final["variant"]) else float("nan")
    rows, ttts = [], {}
    for variant, group in final.groupby("variant"):
        ttt = pd.Series([time_to_target(table[table["trial_id"] == t].sort_values("step"), target)
                         for t in group["trial_id"]])
        ttts[variant] = ttt
        psnr_mean, psnr_ci = interval(group["val_psnr"])
        mse_mean, mse_ci = interval(group["val_masked_mse_fixed"])
        ttt_mean, ttt_ci = interval(ttt)
        rows.append({"variant": variant, "seeds": len(group), "psnr": psnr_mean, "psnr_ci95": psnr_ci,
                     "masked_mse": mse_mean, "masked_mse_ci95": mse_ci, "time_to_target_s": ttt_mean,
                     "time_to_target_ci95": ttt_ci, "reached_target": f"{int(ttt.notna().sum())}/{len(ttt)}",
                     "device_hours": float(group["device_seconds"].sum()) / 3600})
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    base_ttt = summary.loc[summary["variant"] == baseline, "time_to_target_s"]
    summary["speedup_vs_pixel_mae"] = (float(base_ttt.iloc[0]) / summary["time_to_target_s"]
                                       if len(base_ttt) else float("nan"))
    summary["speedup_ci95"] = [0.0 if v == baseline else speedup_half_width(ttts.get(baseline), ttts[v])
                               for v in summary["variant"]]
    summary.attrs["target_psnr"] = target
    return summary.sort_values("variant", ignore_index=True)


def format_summary(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "no finished trials with evaluations"
    lines = [f"target PSNR (pixel MAE's mean final): {summary.attrs.get('target_psnr', float('nan')):.2f} dB",
             f"{'variant':<16}{'seeds':>6}{'PSNR dB (95% CI)':>20}{'masked MSE (95% CI)':>24}"
             f"{'time-to-target s':>18}{'reached':>9}{'speedup':>9}{'device-h':>10}"]
    for r in summary.itertuples():
        lines.append(f"{r.variant:<16}{r.seeds:>6}{f'{r.psnr:.2f} ± {r.psnr_ci95:.2f}':>20}"
                     f"{f'{r.masked_mse:.4f} ± {r.masked_mse_ci95:.4f}':>24}{r.time_to_target_s:>18.1f}"
                     f"{r.reached_target:>9}{r.speedup_vs_pixel_mae:>8.2f}x{r.device_hours:>10.4f}")
    lines.append(f"total device-hours: {summary['device_hours'].sum():.4f}")
    return "\n".join(lines)
