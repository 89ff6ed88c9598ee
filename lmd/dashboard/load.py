"""Read an experiment's results for the dashboard: the tidy table, its pictures and its Optuna study.

Reads files only (results.parquet, pictures.parquet, optuna.journal, args.json); nothing is re-run.
A table that lacks a required column, or was written by an unknown schema, is refused with a
message naming the file and what is missing; columns added by later schemas are optional, and
the page says what an older file cannot show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmd.config import SCHEDULERS
from lmd.experiments.pictures import PICTURES_FILE
from lmd.experiments.results import CONFIG_COLUMNS, ID_COLUMNS, PLACEMENT_COLUMNS, SCHEMA_KEY, SCHEMA_VERSION

RESULTS_FILE = "results.parquet"
JOURNAL_FILE = "optuna.journal"
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


def load_experiment(path: str | Path) -> Experiment:
    """`path`: an experiment folder or its results.parquet."""
    path = Path(path)
    root = path.parent if path.suffix == ".parquet" else path
    table_path = path if path.suffix == ".parquet" else root / RESULTS_FILE
    table, schema = read_table(table_path)
    notes = []
    optional_missing = [c for c in PLACEMENT_COLUMNS + CONFIG_COLUMNS if c not in table.columns]
    for column in optional_missing:
        table[column] = pd.NA
    if schema < SCHEMA_VERSION:
        notes.append(f"{table_path.name} uses results schema {schema} (this code writes {SCHEMA_VERSION}): it has no "
                     "per-trial config columns, so schedules are drawn from the recorded mask ratios only.")
    elif optional_missing:
        notes.append(f"{table_path.name} lacks column(s) {', '.join(optional_missing)}: schedules are drawn from the "
                     "recorded mask ratios only.")
    args_path = root / "args.json"
    args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    journal = root / JOURNAL_FILE
    study = read_study(journal, args.get("name", root.name)) if journal.is_file() else None
    kind = experiment_kind(table, args, study)
    if kind == "search" and study is None:
        notes.append(f"no {JOURNAL_FILE} next to the results: the Optuna study panels are not shown.")
    pictures = read_pictures(root / PICTURES_FILE)
    if pictures is None:
        notes.append(f"no {PICTURES_FILE} next to the results: reconstructions are not shown.")
    return Experiment(name=root.name, root=root, table=table, schema=schema, args=args, pictures=pictures,
                      study=study, kind=kind, notes=notes)


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
