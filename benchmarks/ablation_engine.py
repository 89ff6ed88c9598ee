"""The ablation's exact trials through the engine alone (no Ray, no Tune, no plotly): the GPU-scale table.

Builds the trial configs `tune/ablation.py` would run for the same flags (variants, equal-FLOP
budgets, seeds, evaluation points), trains each with `Engine.fit` one after the other on this
process's device, computes the same references, and prints the same budget, summary and verdicts,
plus each variant's real-loop throughput (samples/s on the training clock, evaluation excluded).
For machines where Ray cannot run (the lent GPU machines carry no Ray) and for quick checks.

    python benchmarks/ablation_engine.py --seeds 2 --budget 0.2 --out /tmp/abl     # CPU smoke
    python benchmarks/ablation_engine.py --device cuda --preset small --resolution 128 --dataset fashion-mnist \
        --budget 400 --batch-size 256 --out runs/gpu-ablation                        # one GPU, minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from lmd.config import TrainConfig
from lmd.experiments.ablation import BASELINE, budget_record, budget_steps, format_budget, parse_args, trial_configs
from lmd.experiments.references import compute_references
from lmd.experiments.results import write_table
from lmd.experiments.summary import format_summary, summarize
from lmd.runtime import local_engine


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--device", default="auto", help="auto, cpu or cuda")
    own.add_argument("--out", default="", help="write results.parquet here")
    mine, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    device = mine.device if mine.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    steps = budget_steps(args)
    trials = trial_configs(args, steps)
    print(format_budget(budget_record(args, trials)), flush=True)
    configs = {t["variant"]: TrainConfig.from_dict(t["cfg"]) for t in trials if t["seed"] == 0}
    started = time.perf_counter()
    references = compute_references(configs, seeds=range(args.seeds))
    print(f"references: {time.perf_counter() - started:.1f} s", flush=True)

    rows = []
    for t in trials:
        cfg = TrainConfig.from_dict(t["cfg"])
        cfg = replace(cfg, data=replace(cfg.data, loader="memory"), run=replace(cfg.run, device=device, keep_last=1))
        tags = {"trial_id": f"{t['variant']}_s{t['seed']}", "variant": t["variant"], "seed": t["seed"]}
        with tempfile.TemporaryDirectory() as scratch:
            local_engine(cfg, scratch, reporter=lambda row, _ckpt, tags=tags: rows.append({**row, **tags})).fit()
        last = rows[-1]
        rate = last["samples_seen"] / last["wall_seconds"]
        psnr, probe = last.get("val_psnr", float("nan")), last.get("val_probe_acc", float("nan"))
        print(f"{tags['trial_id']:<32} {last['step']:>6} steps {rate:>10.0f} samples/s  PSNR {psnr:.2f}  "
              f"probe {probe:.3f}", flush=True)
    table = pd.DataFrame(rows)
    table["device_seconds"] = table["wall_seconds"]
    summary = summarize(table, BASELINE, args.target_metric, references)
    print(format_summary(summary))
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; total wall "
          f"{time.perf_counter() - started:.0f} s")
    if mine.out:
        Path(mine.out).mkdir(parents=True, exist_ok=True)
        write_table(table, Path(mine.out) / "results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
