"""Read an experiment's results for the dashboard: the tidy table, references, budget, pictures and Optuna study,
and a search's answer (finalists.json, pareto.json, importances.json).

Reads files only (results.parquet, references.json, summary.json, pictures.parquet, optuna.journal,
args.json and a search's JSON records); nothing is re-run, and nothing here imports torch. A table
that lacks a required column, or was written by an unknown schema, is refused with a message
naming the file and what is missing; columns added by later schemas are optional, and the page
says what an older file cannot show. The search's JSON records are checked field by field when
present (a malformed one is refused naming the file and the field) and None when absent (a search
from before them: its panels are not drawn, and a note says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmd.config import SCHEDULERS
from lmd.experiments.finalists import FINALISTS_FILE, IMPORTANCES_FILE, PARETO_FILE, VERDICTS
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
# lmd.experiments.finalists' file names, spelt out: the dashboard reads what the search wrote, whatever that module
# (which imports scipy's statistics and the search's writers) becomes.
# Schema 4 (+ depth, decoder_depth, the sampled lr and encoder_gflops) is read whatever this checkout writes: the
# dashboard must open a newer search's table while the writer's SCHEMA_VERSION is still 3.
READS_SCHEMA = max(SCHEMA_VERSION, 4)
SUMMARY_FILE = "summary.json"
# lmd.experiments.pictures.PICTURES_FILE, spelt out: that module imports torch, which the dashboard must not need.
PICTURES_FILE = "pictures.parquet"
# What every panel needs; schema 1 (before workers and the config columns) already had all of it.
REQUIRED_COLUMNS = ID_COLUMNS + ["loss", "mask_ratio", "val_masked_mse_fixed", "val_psnr"]
PICTURE_COLUMNS = ["variant", "trial_id", "seed", "kind", "index", "png"]
TEXT_COLUMNS = ("trial_id", "variant", "scheduler", "projector", "preset")  # every other column is a number
INTEGER_COLUMNS = ("seed", "step", "depth", "decoder_depth")
REFERENCE_NAMES = ("fill", "ceiling", "raw_probe", "random_probe")
# args.json fields the page reads, and their JSON types.
ARG_TYPES: dict[str, type | tuple[type, ...]] = {"name": str, "target_metric": str, "metric": str, "variants": list,
                                                 "samples": int, "budget_by": str, "budget": (int, float),
                                                 "objectives": bool}
NUMBER = (int, float)
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
    finalists: dict[str, Any] | None = None  # finalists.json (searches with a finalist phase)
    pareto: dict[str, Any] | None = None  # pareto.json (searches run with --objectives)
    importances: dict[str, Any] | None = None  # importances.json (searches)

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
    if schema > READS_SCHEMA:
        raise ResultsError(f"{path}: written by results schema {schema}, newer than this lmd-ray reads "
                           f"({READS_SCHEMA}); upgrade lmd-ray")
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
        if key in args:
            _check(path, key, args[key], kind)
    return args


def _json_type(kind: type | tuple[type, ...]) -> str:
    return {str: "string", list: "list", int: "integer", bool: "boolean", dict: "object",
            NUMBER: "number"}.get(kind, str(kind))  # type: ignore[call-overload]


def _check(path: Path, name: str, value: Any, kind: type | tuple[type, ...], nullable: bool = False) -> Any:
    """`value` when it has the JSON type `kind` (JSON's true/false is no number), else ResultsError naming the file
    and the field (`name`, its path in the file: finalists[1].val_psnr.ci95)."""
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        null = " or null" if nullable else ""
        raise ResultsError(f"{path}: {name}={value!r}: expected a JSON {_json_type(kind)}{null}")
    return value


def _fields(path: Path, record: Any, where: str, spec: dict[str, tuple[Any, bool, bool]]) -> dict[str, Any]:
    """`record` (an object) with each key of `spec` (key: JSON type, null allowed, required) checked; a missing
    required key is named like a mistyped one."""
    _check(path, where or "the file", record, dict)
    for key, (kind, nullable, required) in spec.items():
        name = f"{where}.{key}" if where else key
        if key in record:
            _check(path, name, record[key], kind, nullable)
        elif required:
            raise ResultsError(f"{path}: {name} missing")
    return record


def _one_of(path: Path, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ResultsError(f"{path}: {name}={value!r}: expected one of {', '.join(allowed)}")


def _each(path: Path, where: str, values: Any, kind: Any, nullable: bool = False) -> None:
    """Every item of a list, or every value of an object, of the JSON type `kind`."""
    for key, value in (values.items() if isinstance(values, dict) else enumerate(values or [])):
        _check(path, f"{where}.{key}" if isinstance(values, dict) else f"{where}[{key}]", value, kind, nullable)


REQ, OPT = (False, True), (False, False)  # (null allowed, required): a required value / an optional one
FINALISTS_FIELDS = {"metric": (str, *REQ), "heldout": (str, *OPT), "answer": (str, *REQ), "seeds": (list, *REQ),
                    "budget": (dict, True, False), "paper": (str, *REQ), "finalists": (list, *REQ)}
FINALIST_FIELDS = {"name": (str, *REQ), "rank": (int, True, True), "params": (dict, *REQ), "n": (int, *REQ),
                   "search_value": (NUMBER, True, False), "encoder_gflops": (NUMBER, True, False),
                   "train_tflops": (NUMBER, True, False), "trial_ids": (list, *OPT),
                   "references": (dict, True, False), "beats": (dict, True, False), "vs_paper": (dict, True, True)}
SEED_FIELDS = {"mean": (NUMBER, True, True), "ci95": (NUMBER, True, True), "values": (list, *OPT)}
VERSUS_FIELDS = {"metric": (str, *OPT), "diff": (NUMBER, True, True), "lo": (NUMBER, True, True),
                 "hi": (NUMBER, True, True), "verdict": (str, *REQ)}


def read_finalists(path: Path) -> dict[str, Any] | None:
    """finalists.json (None when absent): each configuration's seeds on the held-out split, its references and its
    verdict against the paper's configuration, and the answer in one sentence."""
    if not path.is_file():
        return None
    record = _fields(path, read_json_object(path, "the search's finalists", ResultsError), "", FINALISTS_FIELDS)
    metric = record["metric"]
    _each(path, "seeds", record["seeds"], int)
    if record.get("budget"):
        _fields(path, record["budget"], "budget", {"budget_by": (str, *REQ), "budget": (NUMBER, *REQ),
                                                   "unit": (str, *OPT)})
    if not record["finalists"]:
        raise ResultsError(f"{path}: finalists is empty (expected the finalists and the paper's configuration)")
    for i, row in enumerate(record["finalists"]):
        where = f"finalists[{i}]"
        _fields(path, row, where, {**FINALIST_FIELDS, metric: (dict, *REQ)})
        for key in {metric, "val_psnr", "val_probe_acc"} & set(row):
            if row[key] is not None or key == metric:
                _fields(path, row[key], f"{where}.{key}", SEED_FIELDS)
                _each(path, f"{where}.{key}.values", row[key].get("values"), NUMBER)
        _each(path, f"{where}.references", row.get("references") or {}, NUMBER, nullable=True)
        _each(path, f"{where}.beats", row.get("beats") or {}, str)
        if row["vs_paper"] is not None:
            _fields(path, row["vs_paper"], f"{where}.vs_paper", VERSUS_FIELDS)
            _one_of(path, f"{where}.vs_paper.verdict", row["vs_paper"]["verdict"], VERDICTS)
    if record["paper"] not in [row["name"] for row in record["finalists"]]:
        raise ResultsError(f"{path}: paper={record['paper']!r}: no configuration in finalists has that name")
    return record


def read_pareto(path: Path) -> dict[str, Any] | None:
    """pareto.json (None when absent: a search without --objectives): the non-dominated finished trials and the
    others, on two objectives."""
    if not path.is_file():
        return None
    record = _fields(path, read_json_object(path, "the search's Pareto front", ResultsError), "",
                     {"objectives": (list, *REQ), "front": (list, *REQ), "others": (list, *REQ)})
    if len(record["objectives"]) != 2:
        raise ResultsError(f"{path}: objectives holds {len(record['objectives'])} entries, expected two")
    for i, objective in enumerate(record["objectives"]):
        _fields(path, objective, f"objectives[{i}]", {"name": (str, *REQ), "mode": (str, *REQ)})
        _one_of(path, f"objectives[{i}].mode", objective["mode"], ("max", "min"))
    point = {"trial_id": (str, *REQ), "params": (dict, *OPT)} | {o["name"]: (NUMBER, *REQ)
                                                                 for o in record["objectives"]}
    for part in ("front", "others"):
        for i, p in enumerate(record[part]):
            _fields(path, p, f"{part}[{i}]", point)
    return record


def read_importances(path: Path) -> dict[str, Any] | None:
    """importances.json (None when absent): per parameter Optuna's importance and its effect in the objective's
    units, and the finalists' seed spread to read the effects against."""
    if not path.is_file():
        return None
    record = _fields(path, read_json_object(path, "the search's parameter importances", ResultsError), "",
                     {"evaluator": (str, *REQ), "objective": (str, *REQ), "trials": (int, *OPT),
                      "seed_spread": (NUMBER, True, False), "importances": (dict, *REQ)})
    for name, value in record["importances"].items():
        _fields(path, value, f"importances.{name}", {"importance": (NUMBER, True, True),
                                                     "effect": (NUMBER, True, True)})
    return record


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
    answer: dict[str, Any] = {}
    if kind == "search":
        answer = {"finalists": read_finalists(root / FINALISTS_FILE), "pareto": read_pareto(root / PARETO_FILE),
                  "importances": read_importances(root / IMPORTANCES_FILE)}
        notes += search_notes(table, answer, args)
    pictures = read_pictures(root / PICTURES_FILE)
    if pictures is None:
        notes.append(f"no {PICTURES_FILE} next to the results: reconstructions are not shown.")
    return Experiment(name=root.name, root=root, table=table, schema=schema, args=args, pictures=pictures,
                      study=study, kind=kind, notes=notes, references=references, budget=budget, **answer)


def search_notes(table: pd.DataFrame, answer: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """What a search from before the finalist phase (or without --objectives) cannot show."""
    notes = []
    if answer["finalists"] is None:
        notes.append(f"no {FINALISTS_FILE} next to the results (a search from before the finalist phase, or one "
                     "run without finalists): the answer, the finalists' seed intervals and their verdicts against "
                     "the paper's configuration are not shown.")
    if answer["pareto"] is None:
        why = "the search ran with --objectives, but it is missing" if args.get("objectives") else \
            "a search run without --objectives"
        notes.append(f"no {PARETO_FILE} ({why}): the Pareto front of the objective against encoder GFLOP per "
                     "image is not drawn.")
    if answer["importances"] is None:
        notes.append(f"no {IMPORTANCES_FILE} next to the results: parameter effects are not drawn beside the "
                     "seed noise (the importances shown, if any, are fANOVA's on the journal).")
    if "depth" not in table or not table["depth"].notna().any():
        notes.append("the results table has no depth, decoder_depth, sampled lr or encoder_gflops columns (results "
                     "schema 4): the parallel coordinates show the mask schedule only.")
    return notes


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
