"""Read an experiment's results for the dashboard: the tidy table, references, budget, pictures and Optuna study.

Reads files only (results.parquet, references.json, summary.json, pictures.parquet, optuna.journal,
args.json); nothing is re-run, and nothing here imports torch. A table that lacks a required
column, or was written by an unknown schema, is refused with a message naming the file and what
is missing; columns added by later schemas are optional, and the page says what an older file
cannot show.
"""

from __future__ import annotations

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
)
from lmd.io import read_json_object

RESULTS_FILE = "results.parquet"
JOURNAL_FILE = "optuna.journal"
SUMMARY_FILE = "summary.json"
# lmd.experiments.pictures.PICTURES_FILE, spelt out: that module imports torch, which the dashboard must not need.
PICTURES_FILE = "pictures.parquet"
# What every panel needs; schema 1 (before workers and the config columns) already had all of it.
REQUIRED_COLUMNS = ID_COLUMNS + ["loss", "mask_ratio", "val_masked_mse_fixed", "val_psnr"]
PICTURE_COLUMNS = ["variant", "trial_id", "seed", "kind", "index", "png"]
TEXT_COLUMNS = ("trial_id", "variant", "scheduler", "projector", "preset")  # every other column is a number
INTEGER_COLUMNS = ("seed", "step")
REFERENCE_NAMES = ("fill", "ceiling", "raw_probe", "random_probe")
# args.json fields the page reads, and their JSON types.
ARG_TYPES: dict[str, type | tuple[type, ...]] = {"name": str, "target_metric": str, "metric": str, "variants": list,
                                                 "samples": int}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    table = _read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)} (results schema {schema}; "
                           f"this dashboard needs {', '.join(REQUIRED_COLUMNS)})")
    check_column_types(table, path)
    return table, schema


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a torn or foreign file
        raise ResultsError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0] if str(err) else err!r})"
                           ) from None


def _is_text(column: pd.Series) -> bool:
    values = column.dropna()
    return values.empty or bool(values.map(lambda v: isinstance(v, str)).all())


def _is_number(column: pd.Series) -> bool:
    return column.isna().all() or (pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column))


def check_column_types(table: pd.DataFrame, path: Path) -> None:
    """Text where the schema has text, numbers elsewhere, whole numbers for seed and step: else one line naming
    the column (a mistyped column would otherwise end deep in pandas)."""
    for column in table.columns:
        values = table[column]
        if column in TEXT_COLUMNS:
            ok, expected = _is_text(values), "text"
        elif column in INTEGER_COLUMNS:
            ok = _is_number(values) and bool((values.dropna() % 1 == 0).all())
            expected = "whole numbers"
        else:
            ok, expected = _is_number(values), "numbers"
        if not ok:
            raise ResultsError(f"{path}: column {column!r} holds {values.dtype} values, expected {expected}")


def read_pictures(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    pictures = _read_parquet(path)
    missing = [c for c in PICTURE_COLUMNS if c not in pictures.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in ("variant", "trial_id", "kind"):
        if not _is_text(pictures[column]):
            raise ResultsError(f"{path}: column {column!r} holds {pictures[column].dtype} values, expected text")
    for column in ("seed", "index"):
        if not pd.api.types.is_integer_dtype(pictures[column]):
            raise ResultsError(f"{path}: column {column!r} holds {pictures[column].dtype} values, expected integers")
    if not pictures["png"].map(lambda v: isinstance(v, bytes) and v.startswith(PNG_MAGIC)).all():
        raise ResultsError(f"{path}: column 'png' holds something other than PNG images")
    return pictures


def read_study(path: Path, name: str) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        storage = JournalStorage(JournalFileBackend(str(path)))
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if not names:
            raise ResultsError(f"{path}: the Optuna journal holds no study")
        study = optuna.load_study(study_name=name if name in names else names[0], storage=storage)
        study.trials  # noqa: B018 - read every trial now, so a torn journal fails here, by name
    except ResultsError:
        raise
    except Exception as err:  # noqa: BLE001 - Optuna's journal replay raises anything on a foreign or torn file
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ResultsError(f"{path}: not a readable Optuna journal ({detail})") from None
    return study


def read_args(path: Path) -> dict[str, Any]:
    """args.json ({} when absent), with the fields the page reads checked for their types."""
    if not path.is_file():
        return {}
    args = read_json_object(path, "the experiment's flags", ResultsError)
    for key, kind in ARG_TYPES.items():
        if key in args and (not isinstance(args[key], kind) or isinstance(args[key], bool)):
            raise ResultsError(f"{path}: {key}={args[key]!r}: expected a JSON {_json_type(kind)}")
    return args


def _json_type(kind: type | tuple[type, ...]) -> str:
    return {str: "string", list: "list", int: "integer"}.get(kind, str(kind))  # type: ignore[call-overload]


def read_references(path: Path) -> list[dict[str, Any]]:
    """references.json's records ([] when absent: an experiment from before references), each checked."""
    if not path.is_file():
        return []
    records = read_json_object(path, "the experiment's references", ResultsError).get("references")
    if not isinstance(records, list):
        raise ResultsError(f"{path}: expected {{'references': [...]}}")
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and r.get("reference") in REFERENCE_NAMES and isinstance(r.get("variant"), str)
              and isinstance(r.get("metric"), str)
              and all(isinstance(r.get(k), int | float) or r.get(k) is None for k in ("mean", "ci95", "n")))
        if not ok:
            raise ResultsError(f"{path}: references[{i}] is not a reference record ({{reference: one of "
                               f"{', '.join(REFERENCE_NAMES)}, variant, metric, mean, ci95, n}})")
    return records


def read_budget(path: Path) -> dict[str, Any] | None:
    """summary.json's "budget" record; None for an older summary (a list of rows) or none at all."""
    if not path.is_file():
        return None
    try:
        payload = read_json_object(path, "the experiment's summary", ResultsError)
    except ResultsError:
        if isinstance(_json_or_none(path), list):  # an older summary: a list of rows
            return None
        raise
    budget = payload.get("budget")
    if not (isinstance(budget, dict) and isinstance(budget.get("variants"), dict)):
        return None
    if not isinstance(budget.get("budget"), int | float):
        raise ResultsError(f"{path}: budget.budget={budget.get('budget')!r}: expected a number")
    for variant, record in budget["variants"].items():
        if not isinstance(record, dict) or not all(isinstance(record.get(k), int | float) or record.get(k) is None
                                                   for k in ("steps", "samples", "train_tflops")):
            raise ResultsError(f"{path}: budget.variants.{variant}: expected numbers steps, samples, train_tflops")
    return budget


def _json_or_none(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    args = read_args(root / "args.json")
    journal = root / JOURNAL_FILE
    study = read_study(journal, args.get("name", root.name)) if journal.is_file() else None
    kind = experiment_kind(table, args, study)
    if kind == "search" and study is None:
        notes.append(f"no {JOURNAL_FILE} next to the results: the Optuna study panels are not shown.")
    references, budget = read_references(root / REFERENCES_FILE), None  # a search's: per scheduler's best trial
    if kind == "ablation":
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
