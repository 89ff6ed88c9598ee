"""The real training loop next to its bare step: how much of the step's speed `lmd train` delivers.

Runs `Engine.fit` as `lmd train` does (batches drawn from the in-memory latents by step, mask
noise, LR and mask schedules, metrics rows, the non-finite check; no evaluation until the last
row, whose cost the engine's training clock excludes) and, in the same process on the same
engine, the bare `Engine.train_step` on one batch already on the device. Prints both, their ratio
(goal: loop >= 90% of step) and a profiler breakdown of the loop's host time per step.

Both run at the same mask ratio (a constant schedule at --ratio), so the step's cost is the same
in both and the gap is the loop's own overhead. Throughput is read from the loop's own metrics rows
(samples/s over each log interval after the warm-up), the figure every run logs.

    python benchmarks/loop_speed.py                                  # small preset, CPU, here
    python benchmarks/loop_speed.py --preset small --batch-size 256 --device cuda --steps 400   # a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lmd.config_build import build_config
from lmd.flops import device_peak_flops, train_flops_per_sample
from lmd.runtime import local_engine


def loop_rate(cfg, warmup: int) -> float:
    """Samples/s of `Engine.fit`, from its metrics rows after `warmup` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        local_engine(cfg, tmp).fit()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] >= warmup]  # from the first row at or after the warm-up
    if len(timed) < 2:
        raise SystemExit(f"loop_speed: fewer than two metrics rows after step {warmup}: raise --steps or lower "
                         "--log-every")
    first, last = timed[0], timed[-1]
    return (last["samples_seen"] - first["samples_seen"]) / (last["wall_seconds"] - first["wall_seconds"])


def step_rate(cfg, steps: int, warmup: int, ratio: float) -> float:
    """Samples/s of the bare step on one batch already on the device (the model's speed)."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = local_engine(cfg, tmp)
        latents = engine.data.batch(0).to(engine.device)
        noise = engine.mask_noise(latents.shape[0], 0)
        for _ in range(warmup):
            engine.train_step(latents, ratio, noise)
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            loss = engine.train_step(latents, ratio, noise)
        sync()
        seconds = time.perf_counter() - started
    if not torch.isfinite(loss):
        raise SystemExit("loop_speed: the bare step's loss is not finite")
    return steps * latents.shape[0] / seconds


def host_breakdown(cfg, steps: int, top: int) -> str:
    """The loop's host (CPU-side) time per step by operator, from torch.profiler over a short fit."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = local_engine(cfg, tmp)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.fit()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines = [f"{'operator':<44}{'host us/step':>14}{'share':>8}"]
    for e in rows:
        lines.append(f"{e.key[:43]:<44}{e.self_cpu_time_total / steps:>14.1f}{e.self_cpu_time_total / total:>8.1%}")
    lines.append(f"{'all operators':<44}{total / steps:>14.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--log-every", type=int, default=10, help="the loop's log interval (lmd train's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default", help="with --compile: default, reduce-overhead (CUDA "
                        "graphs) or max-autotune")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps profiled for the host breakdown (0: skip)")
    args = parser.parse_args()

    total = args.warmup + args.steps
    base = {"model.preset": args.preset, "data.dataset": "synthetic", "data.batch_size": args.batch_size,
            "data.num_train": max(args.batch_size * 8, 512), "data.num_val": args.batch_size,
            "mask.scheduler": "constant", "mask.end": args.ratio, "run.device": args.device,
            "run.compile": args.compile, "run.compile_mode": args.compile_mode, "run.log_every": args.log_every,
            "run.eval_every": 10 * total,
            "run.ckpt_every": 10 * total, "optim.warmup_steps": 1}
    cfg = build_config(overrides={**base, "run.steps": total})
    name, peak = device_peak_flops(torch.device("cuda") if cfg.run.device != "cpu" and torch.cuda.is_available()
                                   else torch.device("cpu"))
    flops = train_flops_per_sample(cfg.model, args.ratio)
    print(f"loop_speed: preset {args.preset}, batch {args.batch_size}, ratio {args.ratio}, device {name}, "
          f"compile {args.compile and args.compile_mode}, threads {torch.get_num_threads()}")
    print(f"{'what':<34}{'samples/s':>12}{'steps/s':>10}{'TFLOP/s':>10}{'MFU':>8}")

    def show(label: str, rate: float) -> None:  # each rate as soon as it is measured: a cut run keeps the first
        mfu = f"{rate * flops / peak:.1%}" if peak else "-"
        print(f"{label:<34}{rate:>12.1f}{rate / args.batch_size:>10.2f}{rate * flops / 1e12:>10.4f}{mfu:>8}",
              flush=True)

    loop = loop_rate(cfg, args.warmup)
    show("real loop (Engine.fit)", loop)
    step = step_rate(cfg, args.steps, args.warmup, args.ratio)
    show("bare step (Engine.train_step)", step)
    print(f"loop / step: {loop / step:.3f} (goal >= 0.90)")
    if args.profile_steps:
        profiled = build_config(overrides={**base, "run.steps": args.profile_steps})
        print(f"\nhost time per step of the loop ({args.profile_steps} steps profiled):")
        print(host_breakdown(profiled, args.profile_steps, top=12))


if __name__ == "__main__":
    main()
