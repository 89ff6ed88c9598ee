"""Train-step speed per model preset: steps/s, samples/s, achieved TFLOP/s and (on GPU) MFU.

Times `Engine.train_step`, the exact step `lmd train` runs (forward, masked loss, backward, clip,
fused/foreach AdamW), on a batch already on the device, so the figure is the model's speed and not
the input pipeline's (benchmarks/data_stream.py measures that). The batch is synthetic latents of the
preset's shape, so the benchmark needs no projector and no photos. With --compile the eager and the
torch.compile'd step are measured side by side in one run and their ratio printed. With --official
the official LMD step (benchmarks/official_step.py: MAE's model and loop, fp16 + GradScaler, a host
sync per step) is measured at the same preset's dims and batch in the same run, and each of our rows
printed as a multiple of it (issue 14 asks for >= 2x at batch 1024).

    python benchmarks/step_speed.py                          # tiny and small on this machine
    python benchmarks/step_speed.py --presets base_p4 large --batch-size 256 --compile   # on a GPU
    python benchmarks/step_speed.py --presets base_p4 large --batch-size 1024 --compile --official base_p4
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from official_step import measure_official  # benchmarks/ is on sys.path when this runs as a script

from lmd.config import PRESETS
from lmd.config_build import build_config
from lmd.flops import device_peak_flops
from lmd.io import write_json_atomic
from lmd.model import param_count, train_flops_per_sample
from lmd.runtime import local_engine


def measure(preset: str, batch: int, steps: int, warmup: int, ratio: float, compile_: bool, device: str) -> dict:
    # Synthetic latents of the preset's shape: the step's speed does not depend on what the values are, and a
    # bundled-photo store would need the projector's encode and foolbox's photos (absent on a lent GPU).
    cfg = build_config(overrides={"model.preset": preset, "data.dataset": "synthetic",
                                  "data.batch_size": batch, "data.num_train": batch,
                                  "data.num_val": 1, "run.device": device, "run.compile": compile_,
                                  "run.steps": warmup + steps})
    with tempfile.TemporaryDirectory() as tmp:
        engine = local_engine(cfg, tmp)
        latents = engine.data.batch(0).to(engine.device)
        noise = engine.mask_noise(batch, 0)

        def sync() -> None:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(warmup):  # includes compilation when --compile
            engine.train_step(latents, ratio, noise)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = engine.train_step(latents, ratio, noise)
        sync()
        seconds = time.perf_counter() - start
    assert torch.isfinite(loss), f"{preset}: non-finite loss in the benchmark"
    flops = train_flops_per_sample(cfg.model, ratio)
    name, peak = device_peak_flops(engine.device)
    samples_s = steps * batch / seconds
    return {"preset": preset, "device": name, "compile": compile_, "mode": "compile" if compile_ else "eager",
            "batch": batch, "mask_ratio": ratio,
            "params": param_count(cfg.model), "steps_per_s": steps / seconds, "samples_per_s": samples_s,
            "tflops": samples_s * flops / 1e12, "mfu": samples_s * flops / peak if peak else None}


def print_row(r: dict) -> None:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{r['preset']:<9}{r['mode']:<32}{r['batch']:>6}{r['steps_per_s']:>10.2f}{r['samples_per_s']:>12.1f}"
          f"{r['tflops']:>10.3f}{mfu:>8}  {r['device']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio (0.75 = after the ramp)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile and print the ratio")
    parser.add_argument("--official", nargs="*", metavar="PRESET", choices=list(PRESETS),
                        help="also measure the official LMD step (benchmarks/official_step.py) at these presets' "
                             "dims (bare --official: every preset in --presets) and print each row's ratio to it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    args = parser.parse_args()
    official = set(args.presets if args.official == [] else args.official or [])
    if official - set(args.presets):
        parser.error(f"--official {' '.join(sorted(official - set(args.presets)))}: not in --presets")

    rows = []

    def keep(row: dict) -> None:  # the JSON is rewritten after every row: a part cut by its time limit keeps its rows
        rows.append(row)
        print_row(row)
        if args.json:
            write_json_atomic(args.json, rows)

    print(f"{'preset':<9}{'mode':<32}{'batch':>6}{'steps/s':>10}{'samples/s':>12}{'TFLOP/s':>10}{'MFU':>8}  device")
    for preset in args.presets:
        ours = []
        for compile_ in ([False, True] if args.compile else [False]):
            ours.append(measure(preset, args.batch_size, args.steps, args.warmup, args.ratio, compile_, args.device))
            keep(ours[-1])
        if args.compile:
            eager, compiled = ours
            print(f"{preset:<9}compile/eager speed ratio: {compiled['steps_per_s'] / eager['steps_per_s']:.2f}x")
        if preset in official:
            ref = measure_official(args.batch_size, args.steps, args.warmup, args.ratio, args.device, preset)
            keep(ref)
            for r in ours:
                print(f"{preset:<9}{r['mode']} / official: {r['steps_per_s'] / ref['steps_per_s']:.2f}x")
            diff = ours[0]["params"] - ref["params"]
            print(f"{preset:<9}params: ours {ours[0]['params'] / 1e6:.2f} M, official {ref['params'] / 1e6:.2f} M "
                  f"(difference {diff:+d})", flush=True)


if __name__ == "__main__":
    main()
