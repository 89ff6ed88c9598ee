"""The LMD training loop in plain PyTorch: steps, evaluation, metrics, checkpoints and resume.

No Ray here, in what runs as well as in the imports: the engine is handed its parts (data, device,
model wrapper, reporter) by its entry point (`lmd.runtime` for one process; `lmd.distributed` makes
them from a Ray Train worker's shard, with DDP as the wrapper). Determinism is by construction: the
batch at step t, the mask noise at step t and the evaluation masks are pure functions of (seed, t),
so a run's data position is its step count and stop + resume reproduces an uninterrupted run bit for
bit on CPU.

The step never synchronises host and device: losses stay on the device and are read back only
every `run.log_every` steps, where the non-finite check happens (and always before a checkpoint
is written, so a diverged model is never saved over the last good one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmd import code_version
from lmd.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    resume_point,
    save_checkpoint,
    sweep_stale,
)
from lmd.config import ModelConfig, OptimConfig, TrainConfig
from lmd.config_build import config_diff
from lmd.device import autocast_dtype
from lmd.evaluation import reconstruction_psnr
from lmd.flops import device_peak_flops, evaluation_steps, step_flops, train_flops_until
from lmd.io import write_json_atomic, write_text_atomic
from lmd.masking import mask_ratio, num_visible, shape_ratio
from lmd.model import MaskedLatentTransformer, build_model
from lmd.optim import build_optimizer, set_lr, warmup_cosine
from lmd.probe import linear_probe
from lmd.rng_state import capture_rng, restore_rng
from lmd.speed import compile_model, compiled_graphs, place_on_device, throughput, uses_cuda_graphs

if TYPE_CHECKING:
    from lmd.data.latents import RunData

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_SEED = 20_240_101  # evaluation masks are the same at every eval, in every run
# Fields that may change between a run and its resumption without changing what it computes.
# data.latents names where the store is (a moved store, or the absolute path Ray Train workers get); what it holds is
# checked against the run by the store's validation, not by its name.
RESUMABLE_CHANGES = {"run.log_every", "run.eval_every", "run.evals", "run.ckpt_every", "run.keep_last", "run.device",
                     "run.precision", "run.compile", "run.compile_mode", "data.latents"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left in place."""


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a run and --resume is absent)."""


class Reporter(Protocol):
    """Called on every rank at every log row, with the checkpoint folder when rank 0 just wrote one."""

    def __call__(self, row: dict[str, Any], checkpoint: Path | None) -> None: ...


class BatchSource(Protocol):
    """Anything that returns this rank's rows of a global step's batch: [B / world_size, C, H, W], any float dtype."""

    def batch(self, step: int) -> torch.Tensor: ...


@dataclass
class FitResult:
    step: int
    final_loss: float
    last_checkpoint: Path | None
    metrics_path: Path
    preempted: bool = False  # stopped early by request_stop (SIGTERM): checkpointed, resumable, not finished


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start a fresh run over an existing one (nothing is overwritten without --resume)."""
    latest = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    if not resume and (latest is not None or (run_dir / CONFIG_FILE).exists()):
        raise RunDirError(f"run dir {run_dir} already holds a run"
                          f"{f' (checkpoint {latest.name})' if latest else ''}: pass --resume to "
                          "continue it, or choose a new --run-dir")


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over `warmup_steps`, then half-cosine decay from `lr` to `min_lr`."""
    return warmup_cosine(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)


def initial_model(cfg: ModelConfig, seed: int) -> MaskedLatentTransformer:
    """The model's initial weights: a function of (config, seed) alone, whatever the process's RNG state.

    The random-encoder probe reference and `lmd probe` rebuild a run's initial encoder with this.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the mask noise at (seed, step, rank): distinct streams, no state to carry."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def _metrics_row(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line as a row, or None when it is not one (torn, edited, or missing its integer step)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class Engine:
    """Owns the model, optimizer and run directory of one training run; is handed everything else.

    Parts, made by the entry point (`lmd.runtime` for one process, `lmd.distributed` for a Ray Train
    worker): `data` (the batch source, held-out latents and, for stores, projector, images and probe
    set), the `device`, `wrap_model` (DDP under Ray Train; identity otherwise) and `reporter` (called
    with every log row). Process-wide settings (threads, TF32, seeds) are the entry point's job too
    (`lmd.runtime.setup_runtime`): constructing an engine changes no global state.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, data: RunData, device: torch.device, *,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 reporter: Reporter | None = None, rank: int = 0, world_size: int = 1):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        # Data parallelism: the batch source gives this rank its slice of the step's global batch, and every
        # rank draws the same global mask noise and keeps its slice, so N ranks compute the single-process update.
        self.rank, self.world_size, self.reporter = rank, world_size, reporter
        self.device = device
        self.amp_dtype = autocast_dtype(cfg.run.precision, device)
        # For MFU on every row (known GPUs only): the rows count the global batch's FLOPs, which all ranks' devices
        # compute together.
        peak = device_peak_flops(device)[1]
        self.peak_flops = peak * world_size if peak else None
        self.data = data.train
        source = (getattr(self.data, "rank", 0), getattr(self.data, "world_size", 1))
        if source != (rank, world_size):
            raise ValueError(f"the batch source serves rank {source[0]} of {source[1]}, this engine is rank {rank} "
                             f"of {world_size}: build the data with prepare_data(cfg, rank=, world_size=)")
        self.val_latents = data.val
        self.projector, self.val_images, self.probe = data.projector, data.val_images, data.probe
        place_on_device(self.data, device)  # latents onto the GPU when they fit, else pinned batches (lmd.speed)

        self.model: MaskedLatentTransformer = initial_model(cfg.model, cfg.run.seed).to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self._params = list(self.model.parameters())  # clipped each step: listed once, not walked per step
        # What a training step calls: the model, wrapped for data parallelism, then compiled (compiling the
        # wrapper lets DDP's bucketed all-reduce overlap with the compiled backward).
        forward = wrap_model(self.model) if wrap_model is not None else self.model
        self.forward = compile_model(forward, cfg.model, cfg.run.compile_mode) if cfg.run.compile else forward
        # CUDA graphs replay into the same output memory: a step marks its start, and keeps a copy of its loss.
        self.cuda_graphs = cfg.run.compile and uses_cuda_graphs(cfg.run.compile_mode, device)
        # Rows of a compiled run carry the graphs compiled since here: > 0 shows the step runs compiled (in a Ray
        # Train worker, a Tune trial), and the count is the visible-token counts the schedule has reached so far.
        self._graphs_before = compiled_graphs() or 0
        self.noise_gen = torch.Generator(device=device)
        self.step = 0
        self.wall_offset = 0.0
        self._stop_requested = False
        # Every logged row so far; checkpoints carry it, so a run resumed on a fresh machine (a restarted
        # Tune trial driving Ray Train) can replay the rows its new driver never saw.
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- one step, evaluation
    def train_step(self, latents: torch.Tensor, ratio: float, noise: torch.Tensor) -> torch.Tensor:
        """One optimisation step. latents: [B, C, H, W]; noise: [B, L]. Returns the loss (on device)."""
        if not self.model.training:  # only after an evaluation: .train() walks every module (host time per step)
            self.model.train()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        ratio = shape_ratio(self.cfg.model.num_patches, ratio)  # the same visible count: one graph per count
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, _, _ = self.forward(latents, ratio, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.optim.grad_clip, foreach=True)
        self.optimizer.step()
        # The loss is read back only at the next log row: a CUDA graph's output would be overwritten by then.
        return loss.detach().clone() if self.cuda_graphs else loss.detach()

    def mask_noise(self, batch_size: int, step: int, rank: int = 0) -> torch.Tensor:
        self.noise_gen.manual_seed(step_seed(self.cfg.run.seed, step, rank))
        return torch.rand(batch_size, self.cfg.model.num_patches, device=self.device, generator=self.noise_gen)

    @torch.no_grad()
    def evaluate(self, ratio: float) -> float:
        """Masked-patch MSE on the validation latents at `ratio`, with masks fixed across evals."""
        if self.val_latents is None:
            return float("nan")
        self.model.eval()
        gen = torch.Generator(device=self.device)
        total, count = torch.zeros((), device=self.device), 0
        bs = self.cfg.data.batch_size
        for i in range(0, self.val_latents.shape[0], bs):
            chunk = self.val_latents[i:i + bs].to(self.device, non_blocking=True)
            gen.manual_seed(EVAL_SEED + i)
            noise = torch.rand(chunk.shape[0], self.cfg.model.num_patches, device=self.device, generator=gen)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, _, _ = self.model(chunk, ratio, noise)
            total += loss.float() * chunk.shape[0]
            count += chunk.shape[0]
        return (total / count).item()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "wall_seconds": self.wall_offset, "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.wall_offset = float(state["wall_seconds"])
        restore_rng(state["rng"])

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # SUM: gloo (CPU) has no AVG
            return values / self.world_size
        return values

    def close(self) -> None:
        """Release the data source's live pipeline (a Ray Data stream); it reopens on demand."""
        close = getattr(self.data, "close", None)
        if close is not None:
            close()

    def request_stop(self) -> None:
        """Finish the current step, checkpoint and return (used for SIGTERM / preemption)."""
        self._stop_requested = True

    # ---------------------------------------------------------------- the loop
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def _prepare_run_dir(self, resume: bool) -> None:
        check_run_dir(self.run_dir, resume)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:  # read-only, a file in the way, no permission: one line naming the path
            raise RunDirError(f"run dir {self.run_dir}: cannot write there ({err.strerror or err})") from None
        sweep_stale(self.checkpoint_root)
        # Loaded to the host: torch.set_rng_state takes only a CPU byte tensor, and load_state_dict moves the
        # weights and optimizer state onto the parameters' device anyway.
        point = resume_point(self.checkpoint_root, map_location="cpu") if resume else None
        if point is not None:
            latest, state, manifest = point
            saved = TrainConfig.from_dict(manifest["config"])
            changed = [f for f in config_diff(saved, self.cfg) if f not in RESUMABLE_CHANGES]
            if changed:
                raise CheckpointError(f"{latest}: cannot resume with a different config; changed fields: "
                                      f"{', '.join(changed)}")
            self.load_state_dict(state)
            self.history = [row for row in manifest.get("history", []) if row["step"] <= self.step]
            if self.rank == 0:
                log.info("resumed from %s (step %d)", latest, self.step)
        elif resume:
            log.info("--resume: no checkpoint in %s, starting from step 0", self.checkpoint_root)
        self._truncate_metrics(self.step)
        write_json_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_dict())

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows newer than the resumed step, so the history has each step once.

        A line that is not a metrics row (a torn last line from a kill, an edit) is moved, not dropped:
        appended to `metrics.jsonl.rejected`, with a warning naming its line number.
        """
        if not self.metrics_path.exists():
            return
        keep, rejected = [], []
        for number, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), start=1):
            row = _metrics_row(line)
            if row is None:
                if line.strip():
                    rejected.append((number, line))
            elif row["step"] <= step:
                keep.append(line)
        if rejected:
            aside = self.metrics_path.with_name(METRICS_FILE + ".rejected")
            with aside.open("a") as f:
                f.writelines(line + "\n" for _, line in rejected)
            log.warning("%s: %d line(s) are not metrics rows (first: line %d); moved to %s", self.metrics_path,
                        len(rejected), rejected[0][0], aside.name)
        write_text_atomic(self.metrics_path, "".join(r + "\n" for r in keep))

    def save(self) -> Path:
        meta = {"config": self.cfg.to_dict(), "code_version": code_version(),
                "samples_seen": self.step * self.cfg.data.batch_size, "history": self.history}
        try:
            return save_checkpoint(self.checkpoint_root, self.step, self.state_dict(), meta, self.cfg.run.keep_last)
        except OSError as err:  # disk full, folder gone: the previous checkpoint is intact (atomic write)
            raise CheckpointError(f"{self.checkpoint_root}: cannot write the checkpoint of step {self.step} "
                                  f"({err.strerror or err}); the previous one is intact") from None

    def fit(self, resume: bool = False, stop_at: int | None = None) -> FitResult:
        """Train to `run.steps` (or to `stop_at`, checkpointing there). Returns the final figures."""
        self._prepare_run_dir(resume)
        run, total = self.cfg.run, self.cfg.run.steps
        end = min(total, stop_at) if stop_at is not None else total
        pending: list[torch.Tensor] = []  # losses not yet read back from the device
        # A run resumed at its end trains no step: its final loss is the last one it recorded.
        last_loss = next((float(r["loss_last"]) for r in reversed(self.history) if r.get("loss_last") is not None),
                         math.nan)
        last_ckpt = latest_checkpoint(self.checkpoint_root)
        started = time.perf_counter() - self.wall_offset
        # Training FLOPs so far (model matmuls, global batch): a pure function of (config, step), the
        # deterministic axis that equal-compute comparisons use.
        flops = train_flops_until(self.cfg, self.step)
        eval_steps = evaluation_steps(self.cfg, run.evals)  # empty unless run.evals: then at equal FLOP fractions
        patches = self.cfg.model.num_patches
        since = (self.step, self.wall_offset, flops)  # throughput is measured over each log interval

        with self.metrics_path.open("a") as metrics, contextlib.closing(self):
            while self.step < end:
                ratio = mask_ratio(self.step, total, self.cfg.mask)
                lr = lr_at(self.step, total, self.cfg.optim)
                set_lr(self.optimizer, lr)
                # This rank's rows of the global batch (only they travel to the device; float16 stores are
                # cast there), and their rows of the global mask noise.
                latents = self.data.batch(self.step).to(self.device, non_blocking=True).float()
                noise = self.mask_noise(self.cfg.data.batch_size, self.step)
                if self.world_size > 1:
                    per_rank = self.cfg.data.batch_size // self.world_size
                    noise = noise[self.rank * per_rank:(self.rank + 1) * per_rank]
                pending.append(self.train_step(latents, ratio, noise))
                flops += step_flops(self.cfg, ratio)
                self.step += 1
                self.wall_offset = time.perf_counter() - started

                stopping = self.step == end or self._stop_requested
                at_eval = self.step in eval_steps if run.evals else self.step % run.eval_every == 0
                do_ckpt = self.step % run.ckpt_every == 0 or stopping or (run.evals > 0 and at_eval)
                do_eval = at_eval or do_ckpt  # checkpoints carry their val score
                if self.step % run.log_every == 0 or do_eval or do_ckpt:
                    losses = self._mean_over_ranks(torch.stack(pending).float()).tolist()  # one sync per interval
                    pending.clear()
                    bad = [v for v in losses if not math.isfinite(v)]
                    if bad:
                        raise NonFiniteLossError(
                            f"loss became {bad[0]} before step {self.step}; stopped without saving. "
                            f"Last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr or raise "
                            "optim.warmup_steps.")
                    last_loss = losses[-1]
                    row: dict[str, Any] = {
                        "step": self.step, "samples_seen": self.step * self.cfg.data.batch_size,
                        "wall_seconds": round(self.wall_offset, 4), "train_flops": flops,
                        "loss": sum(losses) / len(losses),
                        "loss_last": last_loss, "mask_ratio": ratio, "lr": lr,
                        # What the step trained at: the scheduled ratio rounded to whole masked patches.
                        "masked_fraction": 1 - num_visible(patches, ratio) / patches,
                        **throughput(since, (self.step, self.wall_offset, flops), self.cfg.data.batch_size,
                                     self.peak_flops),
                        **({"compiled_graphs": (compiled_graphs() or 0) - self._graphs_before}
                           if self.cfg.run.compile else {})}
                    since = (self.step, self.wall_offset, flops)
                    if do_eval:
                        eval_started = time.perf_counter()
                        row["val_masked_mse"] = self.evaluate(ratio)
                        row["val_masked_mse_fixed"] = self.evaluate(self.cfg.mask.eval_ratio)
                        row["eval_ratio"] = self.cfg.mask.eval_ratio
                        if self.projector is not None and self.val_images is not None:
                            n = self.val_images.shape[0]
                            row["val_psnr"] = reconstruction_psnr(self.model, self.projector, self.val_latents[:n],
                                                                  self.val_images, self.cfg.mask.eval_ratio)
                        if self.probe is not None:
                            row["val_probe_acc"] = linear_probe(self.model, self.probe).accuracy
                        # The training clock (wall_seconds, time-to-target) excludes evaluation, whose
                        # cost differs by variant (decoding latents vs pasting pixels).
                        started += time.perf_counter() - eval_started
                    metrics.write(json.dumps(row) + "\n")
                    self.history.append(row)
                    metrics.flush()
                    if self.rank == 0:  # one line per row, not one per worker
                        log.info("step %d/%d loss %.5f ratio %.3f lr %.2e %.0f samples/s %.3g TFLOP/s%s",
                                 self.step, total, row["loss"], ratio, lr, row["samples_per_s"],
                                 row["tflops_per_s"], f" val {row['val_masked_mse_fixed']:.5f}" if do_eval else "")
                    saved = self.save() if do_ckpt and self.rank == 0 else None
                    last_ckpt = saved or last_ckpt
                    if self.reporter is not None:
                        self.reporter(row, saved)
                if self._stop_requested:
                    if self.rank == 0:
                        log.info("stop requested: checkpointed at step %d", self.step)
                    break
        return FitResult(self.step, last_loss, last_ckpt, self.metrics_path, preempted=self.step < end)
