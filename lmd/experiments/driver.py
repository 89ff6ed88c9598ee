"""What tune/ablation.py and tune/search.py do the same way around their `tune.Tuner`.

The scripts show their experiment (flags, the variants table or the Optuna space, the Tuner);
this module is the rest, in the order a run goes through it:

1. `usage_errors`: bad input (a flag, the data, a refused start) ends in one `<prog>: error:`
   line with exit code 2, never a traceback.
2. `check_start`: a new experiment needs a free folder; a resumed one must be restorable, of this
   layout (trials carry a `TrialSpec`) and defined by the same flags as in its args.json.
3. `fit`: connect Ray (a wrong --address is one line, exit 1) and check that it holds one trial's
   CPUs and GPUs (a local Ray that cannot is refused; a cluster that cannot yet is warned about,
   as its autoscaler may add nodes); take the experiment's lock (`.<name>.lock` beside it: a second
   driver of the same experiment is refused naming the first one's pid); only then create the
   experiment folder with args.json and the experiment's own records, so a failed start leaves
   nothing that would block a rerun; restore the Tuner (--resume) or build it; fit.
4. `write_results`, `finish`: the results table, reconstruction pictures, the dashboard, and
   failed trials reported (exit 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lmd.config import COMPILE_MODES, LOADERS, ConfigError, TrainConfig, check_name
from lmd.entry import (
    EXIT_PREEMPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    ClusterUnreachable,
    NotEnoughResources,
    check_cluster_resources,
    fail,
    init_ray,
    local_ray,
)
from lmd.experiments.results import ARGS_FILE, RESULTS_FILE, ShrinkingResults, tidy_table, write_table
from lmd.experiments.trial import TRIAL_DRIVER_CPUS, Placement, check_placement, run_trial, trial_resources
from lmd.io import read_json_object, shown_uri, storage_uri, write_json_atomic
from lmd.locks import Lock, LockedError, check_free, hold

# args.json's "layout": 2 = every trial's Tune config holds a TrialSpec under "trial". Experiments of
# an older layout stay readable (analysis/dashboard.py) but are not resumed.
LAYOUT = 2
_HELD_LOCKS: list[Lock] = []  # the experiment lock, held until this driver process exits


class RefusedStart(ConfigError):
    """This run cannot start on that experiment folder (the message says why and what to do)."""


@dataclass(frozen=True)
class ExperimentSpec:
    """Where an experiment lives and how its trials are placed: the flags both scripts share."""

    prog: str  # "ablation" or "search": names its errors
    name: str
    storage: str  # a path, or a URI Tune writes to (s3://...)
    address: str | None  # a Ray cluster, or None: a local Ray
    resume: bool
    workers_per_trial: int
    cpus_per_trial: float
    gpus_per_trial: float

    @classmethod
    def from_flags(cls, prog: str, args: argparse.Namespace) -> ExperimentSpec:
        """The flags `add_shared_flags` defines for where the experiment lives and runs, as both scripts read them."""
        return cls(prog=prog, name=args.name, storage=args.storage, address=args.address, resume=args.resume,
                   workers_per_trial=args.workers_per_trial, cpus_per_trial=args.cpus_per_trial,
                   gpus_per_trial=args.gpus_per_trial)

    @property
    def storage_path(self) -> str:
        return storage_uri(self.storage)

    @property
    def path(self) -> str:
        """The experiment as Tune addresses it (a path or a URI)."""
        return f"{self.storage_path}/{self.name}"

    @property
    def folder(self) -> Path:
        """The experiment folder where args.json, the results table, summary and dashboard are written."""
        return Path(self.path)

    @property
    def devices_per_trial(self) -> float:
        """What a trial's wall second costs in device seconds: its GPUs, else its CPUs."""
        return self.gpus_per_trial or self.cpus_per_trial

    def placement(self) -> Placement:
        return Placement(workers=self.workers_per_trial, cpus=self.cpus_per_trial, gpus=self.gpus_per_trial,
                         train_storage=f"{self.path}/train")

    @property
    def lock_path(self) -> Path:
        """`<storage>/.<name>.lock`: beside the folder, so taking it creates nothing a rerun would trip on."""
        return Path(self.storage_path) / f".{self.name}.lock"

    def validate(self, batch_size: int) -> ExperimentSpec:
        check_name(self.name, "--name")
        if not self.name:
            raise ConfigError("--name='': an experiment needs a name")
        if "://" in self.storage:  # refused, not faked: these files would land in a local folder named "s3:"
            raise ConfigError(f"--storage={shown_uri(self.storage)}: the experiment's own files (args.json, results, "
                              "summary, pictures, dashboard) are written with local file operations, so --storage must "
                              "be a path (on a cluster: a shared mount every node sees, e.g. NFS or mountpoint-s3)")
        check_placement(self.placement(), batch_size)
        if self.gpus_per_trial > 0 and local_ray(self.address):
            import torch  # what a local Ray will find; a cluster's GPUs are checked once connected (`fit`)

            if torch.cuda.device_count() < self.gpus_per_trial:
                raise ConfigError(f"--gpus-per-trial={self.gpus_per_trial:g}: this machine has "
                                  f"{torch.cuda.device_count()} GPU(s) visible, and no --address names a cluster")
        return self


class DefaultsHelp(argparse.HelpFormatter):
    """--help shows every flag's default that says something, unless its help already names it."""

    @staticmethod
    def _default_text(action: argparse.Action) -> str | None:
        default = action.default
        if not action.option_strings or default is None or default is False or default in ("", argparse.SUPPRESS):
            return None  # positional, or a default that says nothing (0 says something)
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return "default: " + shown.replace("%", "%%")  # help strings are %-formatted by argparse

    def _format_action(self, action: argparse.Action) -> str:
        default = self._default_text(action)
        if not action.help and default:  # argparse prints nothing for a flag without help: make it some
            action = copy.copy(action)
            action.help = default
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", self._default_text(action)
        return f"{text} ({default})" if default and "default" not in text else text


def add_shared_flags(p: argparse.ArgumentParser, name: str) -> None:
    """The flags both experiment scripts take, defined once: what every trial shares and where it runs."""
    data = p.add_argument_group("what every trial shares: the transformer and the data")
    data.add_argument("--preset", default="mini_p1")
    data.add_argument("--dataset", default="fashion-mnist")
    data.add_argument("--projector", default="", help="latent trials' projector (default: the dataset's shipped one)")
    data.add_argument("--resolution", type=int, default=32)
    data.add_argument("--batch-size", type=int, default=128)
    data.add_argument("--num-train", type=int, default=20000)
    data.add_argument("--num-val", type=int, default=1000, help="held-out items (PSNR decodes the first 32 of them)")
    data.add_argument("--num-probe", type=int, default=1000, help="labelled training items the linear probe is fit on")
    data.add_argument("--loader", default="auto", choices=LOADERS,
                      help="auto (default): each trial holds a store that fits in memory and streams a larger one "
                           "through Ray Data; ray or memory force one")
    data.add_argument("--compile", action="store_true", help="torch.compile every trial's model")
    data.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                      help="with --compile (reduce-overhead: CUDA graphs on GPU trials)")
    where = p.add_argument_group("where it runs")
    where.add_argument("--address", help="Ray cluster address (default: local Ray)")
    where.add_argument("--gpus-per-trial", type=float, default=0.0)
    where.add_argument("--cpus-per-trial", type=float, default=1.0)
    where.add_argument("--workers-per-trial", type=int, default=1,
                       help="data-parallel Ray Train workers per trial (>1: each trial fits a TorchTrainer; "
                            "the trial's CPUs/GPUs are split over its workers)")
    where.add_argument("--storage", default="runs/tune",
                       help="experiment storage (the search needs a filesystem path: its Optuna journal lives there)")
    where.add_argument("--name", default=name)
    where.add_argument("--resume", action="store_true", help="continue an interrupted experiment of this --name")


@contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """Bad input ends in one `<prog>: error: ...` line and exit code 2: ConfigError, StoreError,
    ProjectorError, ImageSourceError, RefusedStart and unreadable JSON are all ValueErrors. An
    experiment another driver is running (LockedError) is one line too, exit code 1."""
    try:
        yield
    except ValueError as err:
        fail(str(err), EXIT_USAGE, prog)
    except LockedError as err:
        fail(str(err), EXIT_RUNTIME, prog)


def read_args(folder: Path) -> dict[str, Any]:
    """The flags an experiment was started with ({} when it has no args.json)."""
    path = folder / ARGS_FILE
    return read_json_object(path, "the experiment's flags", RefusedStart) if path.is_file() else {}


def check_start(exp: ExperimentSpec, flags: Mapping[str, Any], defining: Sequence[str]) -> None:
    """Refuse (RefusedStart, one line) a start that would overwrite, or resume something else.

    `flags`: this run's flags by name; `defining`: those a resumed experiment must share with the
    one it continues (the rest only place or name it).
    """
    from ray import tune

    folder = exp.folder
    check_free(exp.lock_path, f"experiment {folder}")  # another driver runs it now: LockedError, exit 1
    if not exp.resume:
        if folder.exists():
            raise RefusedStart(f"{folder} already holds an experiment: pass --resume to continue it, or choose "
                               "another --name")
        return
    if not tune.Tuner.can_restore(exp.path):
        if folder.exists():
            raise RefusedStart(f"{folder}: no experiment to resume (it stopped before Tune saved its state); remove "
                               "the folder to start again")
        raise RefusedStart(f"{folder}: no experiment to resume")
    saved = read_args(folder)
    if saved.get("layout") != LAYOUT:
        raise RefusedStart(f"{folder}: started by an older tune/{exp.prog}.py (its trials are not TrialSpecs), so it "
                           "cannot be resumed: choose another --name (analysis/dashboard.py still reads its results)")
    changed = [f"--{k.replace('_', '-')}: was {saved.get(k)!r}, now {flags.get(k)!r}" for k in defining
               if k in saved and saved[k] != flags.get(k)]
    if changed:
        raise RefusedStart(f"{folder}: --resume with different arguments ({'; '.join(changed)}); rerun with the "
                           "original ones or choose another --name")


def build_stores(configs: Iterable[TrainConfig], metric: str, metric_flag: str, workers: int = 1) -> None:
    """Build (or reuse) each store once, here, not in every trial; refuse a probe metric on unlabelled data,
    and a streamed store whose lanes the batch or a trial's `workers` cannot split (before any trial starts)."""
    from lmd.data.latents import check_stream_split, probe_set, resolve_loader, resolve_store
    from lmd.data.store import read_manifest

    first = {}  # one config per projector: the store depends on the data and the projector only
    for cfg in configs:
        first.setdefault(cfg.data.projector, cfg)
    for projector in sorted(first):
        cfg = first[projector]
        root, _ = resolve_store(cfg)
        if resolve_loader(cfg.data.loader, read_manifest(root / "train"), cfg.data.memory_limit_mb) == "ray":
            check_stream_split(cfg, workers, "--workers-per-trial")
        if metric == "val_probe_acc" and probe_set(root, cfg.data.num_probe) is None:
            raise ConfigError(f"{metric_flag} val_probe_acc: the {cfg.data.dataset!r} store {root} is unlabelled or "
                              "--num-probe is 0; use a labelled dataset (fashion-mnist, mnist, class subfolders) or "
                              f"{metric_flag} val_psnr")


@contextmanager
def experiment_session(exp: ExperimentSpec, flags: Mapping[str, Any],
                       records: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ray connected and the experiment's folder ready, for one or more Tuner runs (`run_tuner`).

    Connects Ray, checks it holds one trial, takes the experiment's lock and only then creates the
    experiment folder with args.json (`flags` and the layout) and `records` (file name -> JSON payload).
    Ray is shut down when the block ends; the lock is held until this process exits.
    """
    import ray

    try:
        check_free(exp.lock_path, f"experiment {exp.folder}")  # refused before Ray starts, if it can be
        init_ray(exp.address, log_to_driver=False)
        # A multi-worker trial holds its driver's sliver of a CPU beside its workers' CPUs: both must fit, or its
        # Train workers wait for ever for a CPU the driver holds.
        driver = TRIAL_DRIVER_CPUS if exp.workers_per_trial > 1 else 0.0
        need = {"CPU": (f"--cpus-per-trial={exp.cpus_per_trial:g}" + (" (+ the trial's driver)" if driver else ""),
                        exp.cpus_per_trial + driver),
                "GPU": (f"--gpus-per-trial={exp.gpus_per_trial:g}", exp.gpus_per_trial)}
        warning = check_cluster_resources(need, exp.address, "one trial")
        if warning:
            print(f"{exp.prog}: warning: {warning}", file=sys.stderr, flush=True)
        _HELD_LOCKS.append(hold(exp.lock_path, f"experiment {exp.folder}"))
        if not exp.resume and exp.folder.exists():  # a driver of the same name that finished while this one planned
            raise RefusedStart(f"{exp.folder} already holds an experiment: pass --resume to continue it, or choose "
                               "another --name")
    except ClusterUnreachable as err:
        ray.shutdown()
        fail(str(err), EXIT_RUNTIME, exp.prog)
    except LockedError as err:
        ray.shutdown()
        fail(str(err), EXIT_RUNTIME, exp.prog)
    except (NotEnoughResources, RefusedStart) as err:
        ray.shutdown()
        fail(str(err), EXIT_USAGE, exp.prog)
    # Only now, with everything that can fail on bad input behind us, does the experiment folder appear.
    exp.folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(exp.folder / ARGS_FILE, {**flags, "layout": LAYOUT})
    for name, payload in (records or {}).items():
        write_json_atomic(exp.folder / name, payload)
    try:
        yield
    finally:
        ray.shutdown()


def run_tuner(storage_path: str, name: str, new_tuner: Callable[[Any], Any], prog: str) -> Any:
    """Tune's ResultGrid of the Tuner run `<storage_path>/<name>`: restored when Tune saved its state there (finished
    trials are not rerun, unfinished ones continue from their last checkpoint), else built by `new_tuner(trainable)`,
    where trainable is `run_trial` with each trial's own resources. Needs `experiment_session`.

    An interrupted run (Ctrl-C: Tune saves its state and returns with trials unfinished) ends here with the
    preempted exit code and nothing final written: its results would look final and be partial."""
    from ray import tune

    trainable = tune.with_resources(run_trial, trial_resources)
    path = f"{storage_path}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = new_tuner(trainable)
    results = tuner.fit()
    unfinished = unfinished_trials(Path(path))
    if unfinished:
        fail(f"interrupted with {unfinished} of {len(results)} trials unfinished; nothing final was written: continue "
             "with --resume", EXIT_PREEMPTED, prog)
    return results


def unfinished_trials(run: Path) -> int:
    """Trials that Tune's last saved state of `run` has neither finished nor failed. Read from the file because
    after a Ctrl-C Tune saves that state, then marks every trial it stops TERMINATED in memory: the ResultGrid
    would count an interrupted trial as finished."""
    # The newest by the start time in its name: a restored run writes a file of its own, and may touch the old one.
    states = sorted(run.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
        status = [json.loads(entry[0]).get("status") for entry in trials]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0  # unreadable: no claim either way (the tables' own checks still hold)
    return sum(s not in ("TERMINATED", "ERROR") for s in status)


def fit(exp: ExperimentSpec, new_tuner: Callable[[Any], Any], flags: Mapping[str, Any],
        records: Mapping[str, Any] | None = None) -> Any:
    """Run the experiment's one Tuner (`experiment_session`, then `run_tuner`) and return Tune's ResultGrid."""
    with experiment_session(exp, flags, records):
        return run_tuner(exp.storage_path, exp.name, new_tuner, exp.prog)


def write_results(results: Any, exp: ExperimentSpec) -> pd.DataFrame:
    """Every reported row of every trial -> <experiment>/results.parquet; returns the table."""
    table = tidy_table(results, devices_per_trial=exp.devices_per_trial)
    path = exp.folder / RESULTS_FILE
    try:
        write_table(table, path)
    except ShrinkingResults as err:
        fail(str(err), EXIT_RUNTIME, exp.prog)
    print(f"results: {path} ({len(table)} rows, {table['trial_id'].nunique()} trials)", flush=True)
    return table


def finish(results: Any, table: pd.DataFrame, exp: ExperimentSpec, pick: str, metric: str = "val_psnr") -> int:
    """Pictures (`pick`: each variant's median or best trial by `metric`), the dashboard, and the exit code: 1 if a
    trial failed."""
    from lmd.dashboard.page import render_after_experiment
    from lmd.experiments.pictures import write_pictures

    write_pictures(results, table, exp.folder, pick=pick, metric=metric)
    render_after_experiment(exp.folder)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        print(f"{exp.prog}: {len(errors)} trial(s) failed: {str(errors[0]).splitlines()[0]}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0
