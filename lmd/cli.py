"""`lmd` command line: train, probe, precompute, projector-train, schedule, presets.

The `lmd train` and `lmd schedule` flags are not written here: they are read from the config
fields declared with `lmd.config.option`. Passed flags become dotted overrides handed to `build_config`,
which owns every check; any invalid input ends with one `lmd: error: ...` line (`lmd.entry.fail`) and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lmd.config import PRESETS, SECTIONS, ClusterConfig, ConfigError, TrainConfig
from lmd.config_build import build_config
from lmd.entry import EXIT_PREEMPTED, EXIT_RUNTIME, EXIT_USAGE, ClusterUnreachable, fail, init_ray, shutdown_ray
from lmd.options import Flag, cli_flags

# Flag -> the field it sets, read from the config classes' declarations: a flag is written once, there.
TRAIN_FLAGS: dict[str, Flag] = cli_flags(SECTIONS)
CLUSTER_FLAGS: dict[str, Flag] = cli_flags({"cluster": ClusterConfig})
SCHEDULE_FIELDS = ("mask.scheduler", "mask.start", "mask.end", "mask.ramp")  # what `lmd schedule` takes
SCHEDULE_FLAGS = {flag: f for flag, f in TRAIN_FLAGS.items() if f.dotted in SCHEDULE_FIELDS}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags in one line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}", EXIT_USAGE)


def _add_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, flags: dict[str, Flag]) -> None:
    """One argument per flag, stored under its dotted field; None (unset) unless the user passes it."""
    for flag, f in flags.items():
        if f.kind is bool:
            p.add_argument(flag, dest=f.dotted, action="store_true", default=None, help=f.help)
        else:
            p.add_argument(flag, dest=f.dotted, type=f.kind, help=f.help,
                           metavar=f.metavar or flag.removeprefix("--").replace("-", "_").upper())


def _passed(args: argparse.Namespace, flags: dict[str, Flag]) -> dict[str, Any]:
    """Dotted field -> value of the flags the user passed: only those override the lower layers."""
    return {f.dotted: getattr(args, f.dotted) for f in flags.values() if getattr(args, f.dotted, None) is not None}


def _cluster(args: argparse.Namespace) -> ClusterConfig | None:
    """The Ray Train placement the flags ask for; None without --workers (one process, no Ray Train)."""
    passed = {dotted.removeprefix("cluster."): value for dotted, value in _passed(args, CLUSTER_FLAGS).items()}
    return ClusterConfig(**passed) if "workers" in passed else None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmd", description="Latent Masking Diffusion on Ray")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train the masked latent transformer")
    t.add_argument("--config", metavar="FILE", help="YAML or JSON file with model/mask/optim/data/run sections "
                   "(on top of --preset; the flags below override it)")
    t.add_argument("--run-dir", metavar="DIR", help="where metrics and checkpoints go (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    for section, cls in SECTIONS.items():  # one group per section, named as in a --config file
        group = t.add_argument_group(section, (cls.__doc__ or "").splitlines()[0])
        _add_flags(group, {flag: f for flag, f in TRAIN_FLAGS.items() if f.dotted.startswith(f"{section}.")})
    r = t.add_argument_group("Ray Train (data-parallel; rerunning the same --name resumes it)")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    _add_flags(r, CLUSTER_FLAGS)

    s = sub.add_parser("schedule", help="print a mask-ratio schedule")
    _add_flags(s, SCHEDULE_FLAGS)
    s.add_argument("--total-steps", type=int, required=True)
    s.add_argument("--points", type=int, default=21, help="rows to print, evenly spaced (0 = every step)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pt = sub.add_parser("projector-train", help="train the project's own f8c4 projector on the bundled photos")
    pt.add_argument("--out", metavar="FILE", help="weights file (default: the package's bundled weights)")
    pt.add_argument("--steps", type=int, default=20_000)
    pt.add_argument("--batch-size", type=int, default=32)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--encoder-width", type=int, default=32)
    pt.add_argument("--decoder-width", type=int, default=64)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this long (0 = no limit)")
    pt.add_argument("--eval-crops", type=int, default=256, help="held-out crops per resolution for the PSNR")
    pt.add_argument("--no-augment", action="store_true", help="crops and flips only (no rot90 / channel shuffles)")
    pt.add_argument("--init", default="", metavar="FILE", help="start from these projector weights (fine-tune)")
    pt.add_argument("--dataset", default="bundled",
                    help="bundled photos (lmd-f8c4) or a dataset's training split, e.g. fashion-mnist")
    pt.add_argument("--resolution", type=int, action="append",
                    help="training resolution (repeat to alternate; default 128 and 64 for bundled, 32 otherwise)")
    pt.add_argument("--name", help="projector name recorded in the file (default lmd-f8c4[-<dataset>])")
    pt.add_argument("--device", default="auto")

    pc = sub.add_parser("precompute", help="encode a dataset into a Parquet latent store (OUT/train, OUT/val)")
    pc.add_argument("--dataset", default="bundled", help="bundled, fashion-mnist, mnist, or a directory of images")
    pc.add_argument("--projector", help="lmd-f8c4 (default; fashion-mnist: lmd-f8c4-fmnist, the projector lmd train "
                    "uses for it), identity, taesd:DIR, sdvae:DIR or a file")
    pc.add_argument("--resolution", type=int,
                    help="image side in pixels (default 32 for fashion-mnist and mnist, their padded size; else 128)")
    pc.add_argument("--out", required=True, metavar="DIR|URI",
                    help="store folder, or an object-store URI (s3://bucket/prefix) every node can read")
    pc.add_argument("--limit", type=int, help="training items (bundled: number of crops, default 2048)")
    pc.add_argument("--num-val", type=int, help="held-out items (bundled: default 256)")
    pc.add_argument("--shard-size", type=int, default=512)
    pc.add_argument("--batch-size", type=int, default=64, help="images per encode (the same chunks on any cluster)")
    pc.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    pc.add_argument("--encoders", type=int, help="encoder actors (default: one per GPU, else one per CPU)")

    pr = sub.add_parser("probe", help="linear-probe a trained encoder (and its references) on its labelled store")
    pr.add_argument("target", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its latest checkpoint) or a "
                    "checkpoint folder (checkpoints/step_NNNNNNNN)")
    pr.add_argument("--num-probe", type=int, help="labelled training items to fit on (default: the run's)")
    pr.add_argument("--no-references", action="store_true", help="skip the raw-input and random-encoder probes")

    p = sub.add_parser("presets", help="list model presets with size and cost")
    p.add_argument("--json", action="store_true")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from lmd.checkpoint import CheckpointError
    from lmd.data.images import ImageSourceError
    from lmd.data.store import StoreError
    from lmd.engine import NonFiniteLossError, RunDirError, check_run_dir
    from lmd.projector import ProjectorError
    from lmd.runtime import local_engine

    cfg = build_config(args.config, _passed(args, TRAIN_FLAGS))
    cluster = _cluster(args)
    if cluster is not None:
        from lmd.cli_ray_train import train_on_ray

        return train_on_ray(cfg, cluster, args.address)
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.resume:
        fail("--resume needs --run-dir (the run to continue)", EXIT_USAGE)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.model.preset}-{cfg.mask.scheduler}-s{cfg.run.seed}-{stamp}"
    try:
        check_run_dir(run_dir, args.resume)  # before building data: fail in a second, not a minute
        engine = local_engine(cfg, run_dir)
        # SIGTERM (preemption, `ray stop`) and the first Ctrl-C: checkpoint after this step and exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: engine.request_stop())
        result = engine.fit(resume=args.resume)
    except (CheckpointError, RunDirError, NonFiniteLossError, StoreError, ProjectorError, ImageSourceError) as err:
        fail(str(err), EXIT_RUNTIME)
    finally:
        shutdown_ray()
    print(json.dumps({"run_dir": str(run_dir), "step": result.step, "final_loss": result.final_loss,
                      "checkpoint": str(result.last_checkpoint), "metrics": str(result.metrics_path),
                      "preempted": result.preempted}))
    if result.preempted:  # a scheduler must tell "stopped, resume me" from "finished"
        print(f"lmd: preempted at step {result.step}: checkpointed; continue with --resume --run-dir {run_dir}",
              file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from lmd.config import dataset_projector
    from lmd.data.images import DIGITS_RESOLUTION, LABELLED_DATASETS, ImageSourceError
    from lmd.data.location import Location
    from lmd.data.precompute import PipelineError, encoder_pool, plan_build, run_build
    from lmd.data.store import StoreError
    from lmd.locks import LOCK_FILE, LockedError, check_free, hold
    from lmd.projector import ProjectorError, load_projector

    for flag in ("resolution", "limit", "num_val", "shard_size", "batch_size", "encoders"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            fail(f"--{flag.replace('_', '-')}={value}: must be > 0", EXIT_USAGE)
    try:
        out = Location.of(args.out)  # a local folder, or an object-store URI (s3://bucket/prefix)
    except ValueError as err:
        fail(str(err), EXIT_USAGE)
    started_ray = False  # shut down only a Ray this command started (main() may run inside a Ray driver)
    lock = None
    args.projector = args.projector or dataset_projector(args.dataset)
    args.resolution = args.resolution or (DIGITS_RESOLUTION if args.dataset in LABELLED_DATASETS else 128)
    try:
        projector = load_projector(args.projector)
        projector.latent_shape(args.resolution)  # checks the resolution against the downsampling factor
        # A second precompute into this store is refused by the first one's pid (nothing is created for it).
        # Object stores have no lock: there, one build per store is the user's to ensure (lmd.data.location).
        if out.is_local:
            check_free(out.local_path / LOCK_FILE, f"latent store {out}")
            # Held before planning, which writes (the plan) and deletes (a killed run's partial shards): a
            # builder that won the lock since the check above would lose its in-flight files. Released below.
            created, had_lock = not out.local_path.exists(), (out.local_path / LOCK_FILE).exists()
            lock = hold(out.local_path / LOCK_FILE, f"latent store {out}")
        try:  # planning needs no Ray: a bad dataset or a refused store fails before a cluster is joined
            build = plan_build(out, args.dataset, projector, args.resolution, args.limit, args.num_val,
                               shard_size=args.shard_size, batch_size=args.batch_size)
        except Exception:
            if lock is not None:  # bad input leaves nothing behind (removed before the release: no one else is in)
                if created:
                    shutil.rmtree(out.local_path, ignore_errors=True)  # the folder is ours alone
                elif not had_lock:
                    (out.local_path / LOCK_FILE).unlink(missing_ok=True)
                lock.release()
            raise
        pool = None  # a complete store (or one whose shards are all written) needs no cluster
        if build.chunks():
            import ray

            started_ray = not ray.is_initialized()
            init_ray(args.address)  # a wrong address: ClusterUnreachable, one line from main()
            try:
                pool = encoder_pool(args.encoders, "auto", ray.cluster_resources())
            except ValueError as err:
                fail(str(err), EXIT_USAGE)
        run_build(build, pool)
    except (StoreError, ProjectorError, ImageSourceError, PipelineError, LockedError) as err:
        fail(str(err), EXIT_RUNTIME)
    except OSError as err:  # storage refused (credentials, bucket, connection): one line naming the store
        fail(f"{out}: cannot use the store there ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
             EXIT_RUNTIME)
    finally:
        if started_ray:
            shutdown_ray()
        if lock is not None:
            lock.release()
    print(json.dumps({"store": str(out), "projector": projector.info()}))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from lmd.masking import schedule_table

    if args.total_steps <= 0:
        fail(f"--total-steps={args.total_steps}: must be > 0", EXIT_USAGE)
    cfg = build_config(overrides=_passed(args, SCHEDULE_FLAGS), preset=None).mask
    rows = schedule_table(args.total_steps, cfg, args.points)
    if args.json:
        print(json.dumps({"scheduler": cfg.scheduler, "start": cfg.start, "end": cfg.end, "ramp": cfg.ramp,
                          "total_steps": args.total_steps,
                          "rows": [{"step": s, "ratio": round(r, 6)} for s, r in rows]}))
    else:
        print(f"# scheduler={cfg.scheduler} start={cfg.start} end={cfg.end} ramp={cfg.ramp:.4f}")
        print(f"{'step':>8}  ratio")
        for s, r in rows:
            print(f"{s:>8}  {r:.4f}")
    return 0


def cmd_projector_train(args: argparse.Namespace) -> int:
    from lmd.device import resolve_device
    from lmd.projector import bundled_weights_path
    from lmd.projector.train import ProjectorTrainConfig, train_projector

    cfg = ProjectorTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               encoder_width=args.encoder_width, decoder_width=args.decoder_width, seed=args.seed,
                               max_minutes=args.max_minutes, eval_crops=args.eval_crops,
                               augment=not args.no_augment, init=args.init, dataset=args.dataset,
                               resolutions=tuple(args.resolution or _default_resolutions(args.dataset)),
                               name=args.name or _projector_name(args.dataset))
    try:
        cfg.validate()
    except ValueError as err:
        fail(str(err), EXIT_USAGE)
    from lmd.projector import BUNDLED_WEIGHTS

    if not args.out and cfg.name not in BUNDLED_WEIGHTS:
        fail(f"--name={cfg.name}: not a shipped projector ({', '.join(BUNDLED_WEIGHTS)}); pass --out FILE", EXIT_USAGE)
    out = Path(args.out) if args.out else bundled_weights_path(cfg.name)
    card = train_projector(cfg, out, resolve_device(args.device))
    print(json.dumps({"out": str(out), **{k: v for k, v in card.items() if k.startswith("heldout") or k in
                                          ("steps_done", "train_seconds", "device")}}))
    return 0


def _default_resolutions(dataset: str) -> tuple[int, ...]:
    return (128, 64) if dataset == "bundled" else (32,)


def _projector_name(dataset: str) -> str:
    from lmd.projector import DATASET_PROJECTORS

    return DATASET_PROJECTORS.get(dataset, "lmd-f8c4" if dataset == "bundled" else f"lmd-f8c4-{Path(dataset).name}")


def cmd_probe(args: argparse.Namespace) -> int:
    import torch

    from lmd.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from lmd.data.images import ImageSourceError
    from lmd.data.latents import probe_set, resolve_store
    from lmd.data.store import StoreError
    from lmd.engine import CHECKPOINT_DIR
    from lmd.model import build_model
    from lmd.probe import linear_probe, raw_probe
    from lmd.projector import ProjectorError

    target = Path(args.target)
    ckpt = latest_checkpoint(target / CHECKPOINT_DIR) if (target / CHECKPOINT_DIR).is_dir() else target
    if ckpt is None or not (ckpt / "manifest.json").is_file():
        fail(f"{target}: neither a run directory with checkpoints nor a checkpoint folder", EXIT_RUNTIME)
    if args.num_probe is not None and args.num_probe < 10:
        fail(f"--num-probe={args.num_probe}: must be >= 10", EXIT_USAGE)
    try:
        state, manifest = load_checkpoint(ckpt)
        cfg = TrainConfig.from_dict(manifest["config"])
        if cfg.data.dataset == "synthetic":
            raise StoreError(f"{ckpt}: a run on --dataset synthetic has no labels to probe; train on a labelled "
                             "dataset such as fashion-mnist")
        root, _ = resolve_store(cfg, progress=False)
        probe = probe_set(root, args.num_probe or cfg.data.num_probe or 2048)
        if probe is None:
            raise StoreError(f"{root / 'train' / 'manifest.json'}: classes: the store is unlabelled; a probe needs a "
                             "labelled dataset such as fashion-mnist")
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
        result = linear_probe(model, probe)
        out = {"checkpoint": str(ckpt), "step": int(state["step"]), "val_probe_acc": result.accuracy,
               "train_probe_acc": result.train_accuracy, "ridge": result.ridge, "features": result.features,
               "probe_items": int(probe.train.shape[0]), "heldout_items": int(probe.val.shape[0])}
        if not args.no_references:
            torch.manual_seed(cfg.run.seed)  # the run's own initialisation
            out["random_encoder_probe_acc"] = linear_probe(build_model(cfg.model), probe).accuracy
            out["raw_input_probe_acc"] = raw_probe(probe).accuracy
    except (CheckpointError, StoreError, ProjectorError, ImageSourceError) as err:
        fail(str(err), EXIT_RUNTIME)
    print(json.dumps(out))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lmd.model import param_count, train_flops_per_sample

    rows = [{"preset": name, "params": param_count(cfg), "tokens": cfg.num_patches,
             "patch_dim": cfg.patch_dim, "latent": f"{cfg.in_chans}x{cfg.latent_size}x{cfg.latent_size}",
             "train_gflops_per_sample_at_0.75": round(train_flops_per_sample(cfg, 0.75) / 1e9, 3)}
            for name, cfg in PRESETS.items()]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'preset':<10}{'params':>14}{'latent':>10}{'tokens':>8}{'GFLOP/sample (train, r=.75)':>30}")
        for r in rows:
            print(f"{r['preset']:<10}{r['params']:>14,}{r['latent']:>10}{r['tokens']:>8}"
                  f"{r['train_gflops_per_sample_at_0.75']:>30}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"train": cmd_train, "schedule": cmd_schedule, "presets": cmd_presets,
                "projector-train": cmd_projector_train, "precompute": cmd_precompute, "probe": cmd_probe}
    try:
        return handlers[args.command](args)
    except ConfigError as err:
        fail(str(err), EXIT_USAGE)
    except ClusterUnreachable as err:
        fail(str(err), EXIT_RUNTIME)


if __name__ == "__main__":
    sys.exit(main())
