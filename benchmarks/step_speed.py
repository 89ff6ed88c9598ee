"""Train-step speed per model preset: steps/s, samples/s, achieved TFLOP/s and (on GPU) MFU.

Times `Engine.train_step`, the exact step `lmd train` runs (forward, masked loss, backward, clip,
fused/foreach AdamW), on a batch already on the device, so the figure is the model's speed and not
the input pipeline's (benchmarks/data_stream.py measures that). With --compile the eager and the
torch.compile'd step are measured side by side in one run and their ratio printed.

    python benchmarks/step_speed.py                          # tiny and small on this machine
    python benchmarks/step_speed.py --presets base_p4 large --batch-size 256 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from lmd.config import PRESETS, build_config
from lmd.flops import device_peak_flops
from lmd.model import param_count, train_flops_per_sample
from lmd.runtime import local_engine


def measure(preset: str, batch: int, steps: int, warmup: int, ratio: float, compile_: bool, device: str) -> dict:
    cfg = build_config(overrides={"model.preset": preset, "data.batch_size": batch, "data.num_train": batch,
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
    return {"preset": preset, "device": name, "compile": compile_, "batch": batch, "mask_ratio": ratio,
            "params": param_count(cfg.model), "steps_per_s": steps / seconds, "samples_per_s": samples_s,
            "tflops": samples_s * flops / 1e12, "mfu": samples_s * flops / peak if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio (0.75 = after the ramp)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile and print the ratio")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    args = parser.parse_args()

    rows = []
    print(f"{'preset':<9}{'mode':<9}{'batch':>6}{'steps/s':>10}{'samples/s':>12}{'TFLOP/s':>10}{'MFU':>8}  device")
    for preset in args.presets:
        for compile_ in ([False, True] if args.compile else [False]):
            r = measure(preset, args.batch_size, args.steps, args.warmup, args.ratio, compile_, args.device)
            rows.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{preset:<9}{'compile' if compile_ else 'eager':<9}{r['batch']:>6}{r['steps_per_s']:>10.2f}"
                  f"{r['samples_per_s']:>12.1f}{r['tflops']:>10.3f}{mfu:>8}  {r['device']}", flush=True)
        if args.compile:
            eager, compiled = rows[-2], rows[-1]
            print(f"{preset:<9}compile/eager speed ratio: {compiled['steps_per_s'] / eager['steps_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
