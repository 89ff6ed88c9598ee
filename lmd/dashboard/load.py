"""Read an experiment's results for the dashboard: the tidy table, references, budget, pictures and Optuna study.

Reads files only (results.parquet, references.json, summary.json, pictures.parquet, optuna.journal,
args.json); nothing is re-run, and nothing here imports torch. A table that lacks a required
column, or was written by an unknown schema, is refused with a message naming the file and what
is missing; columns added by later schemas are optional, and the page says what an older file
cannot show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmd.config import SCHEDULERS
from lmd.experiments.results import (
    CONFIG_COLUMNS,
    ID_COLUMNS,
    PLACEMENT_COLUMNS,
    REFERENCES_FILE,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    read_references,
)

RESULTS_FILE = "results.parquet"
JOURNAL_FILE = "optuna.journal"
SUMMARY_FILE = "summary.json"
# lmd.experiments.pictures.PICTURES_FILE, spelt out: that module imports torch, which the dashboard must not need.
PICTURES_FILE = "pictures.parquet"
# What every panel needs; schema 1 (before workers and the config columns) already had all of it.
REQUIRED_COLUMNS = ID_COLUMNS + ["loss", "mask_ratio", "val_masked_mse_fixed", "val_psnr"]
PICTURE_COLUMNS = ["variant", "trial_id", "seed", "kind", "index", "png"]


class ResultsError(ValueError):
    """Results that cannot be shown; the message names the file and the field."""


@dataclass
class Experiment:
    """Everything the dashboard shows, read from one experiment folder."""

    name: str
    root: Path
    table: pd.DataFrame
    schema: int
    kind: str  # "ablation" or "search"
    args: dict[str, Any] = field(default_factory=dict)
    pictures: pd.DataFrame | None = None
    study: Any = None  # optuna.Study, for searches
    notes: list[str] = field(default_factory=list)  # what this page cannot show, and why
    references: list[dict[str, Any]] = field(default_factory=list)  # references.json's records ([]: none)
    budget: dict[str, Any] | None = None  # summary.json's "budget" (ablations since results schema 3)

    @property
    def has_flops(self) -> bool:
        """Whether the table has the training-FLOPs axis (results schema 3)."""
        return "train_flops" in self.table and bool(self.table["train_flops"].notna().any())

    @property
    def has_probe(self) -> bool:
        """Whether any row holds a linear-probe accuracy (schema 3 on a labelled dataset)."""
        return "val_probe_acc" in self.table and bool(self.table["val_probe_acc"].notna().any())


def _schema_version(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a non-Parquet file
        raise ResultsError(f"{path}: not a readable Parquet file ({err})") from None
    raw = metadata.get(SCHEMA_KEY)
    if raw is None:
        return 1  # the first schema wrote no version
    try:
        return int(raw)
    except ValueError:
        raise ResultsError(f"{path}: schema version {raw!r} is not a number") from None


def read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """The results table, checked against the schema this code reads."""
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file (an experiment writes {RESULTS_FILE} when it ends)")
    schema = _schema_version(path)
    if schema > SCHEMA_VERSION:
        raise ResultsError(f"{path}: written by results schema {schema}, newer than this lmd-ray reads "
                           f"({SCHEMA_VERSION}); upgrade lmd-ray")
    table = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)} (results schema {schema}; "
                           f"this dashboard needs {', '.join(REQUIRED_COLUMNS)})")
    return table, schema


def read_pictures(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    pictures = pd.read_parquet(path)
    missing = [c for c in PICTURE_COLUMNS if c not in pictures.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}")
    return pictures


def read_study(path: Path, name: str) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise ResultsError(f"{path}: the Optuna journal holds no study")
    return optuna.load_study(study_name=name if name in names else names[0], storage=storage)


def read_budget(path: Path) -> dict[str, Any] | None:
    """summary.json's "budget" record; None for an older summary (a list of rows) or none at all."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err})") from None
    budget = payload.get("budget") if isinstance(payload, dict) else None
    return budget if isinstance(budget, dict) and isinstance(budget.get("variants"), dict) else None


def schema_notes(table: pd.DataFrame, name: str, schema: int) -> list[str]:
    """What an older (or partial) table cannot show. Config columns are filled with NA so the schedule panel
    can test for them; the compute columns are not, so a summary never times a trial on a missing axis."""
    config_missing = [c for c in PLACEMENT_COLUMNS + CONFIG_COLUMNS if c not in table.columns]
    for column in config_missing:
        table[column] = pd.NA
    lacks = []
    if {"scheduler", "mask_start", "mask_end", "mask_ramp", "total_steps"} & set(config_missing):
        lacks.append("no per-trial config columns, so schedules are drawn from the recorded mask ratios only")
    if "train_flops" not in table.columns:
        lacks.append("no train_flops column, so the curves against training FLOPs, the TFLOP budget and the FLOPs "
                     "time-to-target and speedups are not shown (time-to-target is in samples seen)")
    if "val_probe_acc" not in table.columns:
        lacks.append("no val_probe_acc column, so the linear-probe curves and columns are not shown")
    elif not table.empty and table["val_probe_acc"].isna().all():
        lacks.append("val_probe_acc is empty (an unlabelled dataset or --num-probe 0), so the linear-probe curves "
                     "are not shown")
    if not lacks:
        return []
    which = f"{name} uses results schema {schema} (this code writes {SCHEMA_VERSION})" if schema < SCHEMA_VERSION \
        else name
    return [f"{which}: {'; '.join(lacks)}."]


def load_experiment(path: str | Path) -> Experiment:
    """`path`: an experiment folder or its results.parquet."""
    path = Path(path)
    root = path.parent if path.suffix == ".parquet" else path
    table_path = path if path.suffix == ".parquet" else root / RESULTS_FILE
    table, schema = read_table(table_path)
    notes = schema_notes(table, table_path.name, schema)
    args_path = root / "args.json"
    args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    journal = root / JOURNAL_FILE
    study = read_study(journal, args.get("name", root.name)) if journal.is_file() else None
    kind = experiment_kind(table, args, study)
    if kind == "search" and study is None:
        notes.append(f"no {JOURNAL_FILE} next to the results: the Optuna study panels are not shown.")
    references, budget = [], None
    if kind == "ablation":
        try:
            references = read_references(root / REFERENCES_FILE)
        except (ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
            raise ResultsError(f"{root / REFERENCES_FILE}: unreadable ({err})") from None
        if not references:
            notes.append(f"no {REFERENCES_FILE} next to the results (an experiment from before references): the "
                         "no-model fill, projector ceiling and probe references are not drawn, and no variant is "
                         "judged against them.")
        budget = read_budget(root / SUMMARY_FILE)
    pictures = read_pictures(root / PICTURES_FILE)
    if pictures is None:
        notes.append(f"no {PICTURES_FILE} next to the results: reconstructions are not shown.")
    return Experiment(name=root.name, root=root, table=table, schema=schema, args=args, pictures=pictures,
                      study=study, kind=kind, notes=notes, references=references, budget=budget)


def experiment_kind(table: pd.DataFrame, args: dict[str, Any], study: Any) -> str:
    """A search (one trial per sampled config, variant = scheduler) or an ablation (named variants x seeds).

    Decided by the study or args.json when present, else by the variant names: a search's results
    read as an ablation would put seed intervals on trials that differ in their hyperparameters.
    """
    if study is not None or "samples" in args:
        return "search"
    if "variants" in args:
        return "ablation"
    variants = set(table["variant"].dropna().astype(str))
    return "search" if variants and variants <= set(SCHEDULERS) else "ablation"
