"""Tune results -> one tidy table (Parquet); the summary built on it lives in lmd.experiments.summary.

Table contract (docs/DESIGN.md, "Contracts"): one row per trial x report with trial_id, variant, seed, step,
samples_seen, train_flops, wall_seconds, device_seconds and the metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from lmd.io import atomic_path

RESULTS_FILE = "results.parquet"  # the experiment's tidy table (this module)
ARGS_FILE = "args.json"  # the flags the experiment was started with (lmd.experiments.driver)
REFERENCES_FILE = "references.json"  # the experiment's reference records (lmd.experiments.references)
# 2: + workers and the trial's config columns; 3: + train_flops, val_probe_acc, patch_size, tokens;
# 4: + depth, decoder_depth, peak_lr (what a search samples; `lr` is the step's scheduled rate) and
# encoder_gflops (its second objective)
SCHEMA_VERSION = 4
SCHEMA_KEY = b"lmd_results_schema"  # Parquet schema metadata: which version wrote the file
ID_COLUMNS = ["trial_id", "variant", "seed", "step", "samples_seen", "wall_seconds", "device_seconds"]
METRIC_COLUMNS = ["loss", "mask_ratio", "lr", "val_masked_mse", "val_masked_mse_fixed", "val_psnr"]
# Schema 3: cumulative training FLOPs (the deterministic compute axis) and the linear probe's accuracy.
COMPUTE_COLUMNS = ["train_flops", "val_probe_acc"]
# Data-parallel workers of the trial and the nodes they ran on (1, 1: the engine ran in the trial's process),
# and what the trial trained.
PLACEMENT_COLUMNS = ["workers", "num_nodes"]
CONFIG_COLUMNS = ["scheduler", "mask_start", "mask_end", "mask_ramp", "projector", "preset", "total_steps",
                  "patch_size", "tokens", "depth", "decoder_depth", "peak_lr", "encoder_gflops"]
COLUMNS = ID_COLUMNS + METRIC_COLUMNS + COMPUTE_COLUMNS + PLACEMENT_COLUMNS + CONFIG_COLUMNS


def trial_id_of(result: Any) -> str:
    """A Tune result's trial folder name (unique in its experiment): the table's trial_id."""
    return result.path.rstrip("/").split("/")[-1]


def reported_rows(result: Any) -> pd.DataFrame | None:
    """Every complete row one Tune trial reported: the lines of its `result.json` (JSON lines that Tune appends),
    skipping a line a kill left torn mid-write (it costs that line, never the trial's table); Ray's own
    `metrics_dataframe` only where the trial folder has no such file (a URI storage)."""
    path = Path(result.path) / "result.json" if result.path and "://" not in str(result.path) else None
    if path is None or not path.is_file():
        return result.metrics_dataframe
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn (a kill during Tune's write) or not JSON: not a row
        if isinstance(row, dict):
            rows.append({k: v for k, v in row.items() if not isinstance(v, dict | list)})  # config: not a column
    return pd.DataFrame(rows) if rows else None


def tidy_table(results: Any, devices_per_trial: float) -> pd.DataFrame:
    """Every reported row of every trial of a `ResultGrid`."""
    frames = []
    for result in results:
        df = reported_rows(result)
        if df is None or df.empty:
            continue
        df = df.copy()
        df["trial_id"] = trial_id_of(result) if result.path else str(len(frames))
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    for column in METRIC_COLUMNS + COMPUTE_COLUMNS + CONFIG_COLUMNS:
        if column not in table:
            table[column] = float("nan")
    for column in PLACEMENT_COLUMNS:  # absent or NaN for rows of in-process trials: one worker on one node
        table[column] = table[column].fillna(1).astype("int64") if column in table else 1
    # Each row's own trial's devices (its TrialSpec's placement, which a resumed experiment keeps), else the
    # experiment's flags (rows of trials that predate the "devices" tag).
    devices = table["devices"].astype(float) if "devices" in table else pd.Series(float("nan"), index=table.index)
    table["device_seconds"] = table["wall_seconds"] * devices.fillna(devices_per_trial)
    # A trial resumed after a driver crash may report a step again (from its last checkpoint): keep the newest.
    table = table.drop_duplicates(["trial_id", "step"], keep="last")
    table = table[COLUMNS]
    table = table.sort_values(["variant", "seed", "step"], ignore_index=True)
    return table


class ShrinkingResults(RuntimeError):
    """A results table would replace one that holds trials or rows it lacks: refused, the old one is kept."""


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Atomically, with the schema version in the Parquet metadata (the dashboard checks it).

    Never replaces a table with one that lost rows or trials (a resume whose trials' files could not be read
    would otherwise write an empty "final" table over the real one): ShrinkingResults, and the file is kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file():
        try:
            old = pq.read_table(path, columns=["trial_id"]).column("trial_id").to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException):
            old = None  # not a readable results table: nothing it holds can be lost by replacing it
        if old is not None:
            lost = sorted(set(old) - set(table["trial_id"]))
            if lost or len(table) < len(old):
                raise ShrinkingResults(
                    f"{path}: kept as it is; the new table would hold {len(table)} rows of "
                    f"{table['trial_id'].nunique()} trials where it holds {len(old)} rows of {len(set(old))}"
                    + (f" (missing {', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''})" if lost else "")
                    + ": some trials' result files could not be read")

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), SCHEMA_KEY: str(SCHEMA_VERSION).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def final_rows(table: pd.DataFrame, metric: str = "val_psnr") -> pd.DataFrame:
    """The last row of every trial that recorded `metric` (its last evaluation)."""
    return table.dropna(subset=[metric]).sort_values("step").groupby("trial_id").tail(1)


def stopped_short(row: Any) -> bool:
    """Whether a trial's last row (a dict or Series with step and total_steps) ends before its budget: failed, or
    stopped by an early-stopping scheduler. A row without total_steps (older tables) counts as finished."""
    total = row.get("total_steps")
    return total is not None and not (isinstance(total, float) and math.isnan(total)) and row.get("step", 0) < total


def complete_trials(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The rows of trials that trained to their budget's end (last step == total_steps), and the ids of those
    that did not (failed, stopped or still running). A trial cut short would otherwise count as "final" with
    less compute than its variant's budget. Trials without a total_steps value (older tables) are kept."""
    if table.empty or "total_steps" not in table:
        return table, []
    last = table.groupby("trial_id").agg(step=("step", "max"), total=("total_steps", "max"))
    short = last.index[last["step"] < last["total"].fillna(-math.inf)].tolist()  # NaN total: kept
    return table[~table["trial_id"].isin(short)], sorted(map(str, short))


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


def read_references(path: Path) -> list[dict[str, Any]]:
    """The experiment's reference records ([] when the file is absent, e.g. an older experiment)."""
    if not path.is_file():
        return []
    payload = json.loads(path.read_text())
    records = payload.get("references") if isinstance(payload, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected {{'references': [...]}}")
    return records


def reference_columns(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per variant: fill_psnr, ceiling_psnr, raw_probe_acc, random_probe_acc (+ _ci95)."""
    names = {"fill": "fill_psnr", "ceiling": "ceiling_psnr", "raw_probe": "raw_probe_acc",
             "random_probe": "random_probe_acc"}
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["variant"], {"variant": r["variant"]})
        row[names[r["reference"]]] = r["mean"]
        row[names[r["reference"]] + "_ci95"] = r["ci95"]
    return pd.DataFrame(list(rows.values()))
