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
import importlib.util
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from lmd.experiments.ablation import budget_record, budget_steps, format_budget, trial_specs
from lmd.experiments.references import compute_references
from lmd.experiments.results import write_table
from lmd.experiments.summary import BASELINE, format_summary, summarize
from lmd.runtime import local_engine


def ablation_script():
    """tune/ablation.py as a module: its variants table and flags define the trials (it imports Ray only in main)."""
    path = Path(__file__).resolve().parent.parent / "tune" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(prog="benchmarks/ablation_engine.py", add_help=False,
                                  usage="%(prog)s [--device D] [--out DIR] [tune/ablation.py's flags]")
    own.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    own.add_argument("--out", default="", help="write results.parquet here")
    mine, rest = own.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):  # this script's own flags, then tune/ablation.py's help (which exits)
        print(own.format_help() + "\nThe other flags are tune/ablation.py's:\n")
    script = ablation_script()
    exp, spec = script.experiment(script.parse_args(rest))
    device = mine.device if mine.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    steps = budget_steps(spec, exp.placement())
    trials = trial_specs(spec, steps, exp.placement())
    print(format_budget(budget_record(spec, trials)), flush=True)
    started = time.perf_counter()
    references = compute_references({t.variant: t.cfg for t in trials if t.seed == 0}, seeds=range(spec.seeds))
    print(f"references: {time.perf_counter() - started:.1f} s", flush=True)

    rows = []
    for t in trials:
        cfg = replace(t.cfg, data=replace(t.cfg.data, loader="memory"),
                      run=replace(t.cfg.run, device=device, keep_last=1))
        tags = {"trial_id": f"{t.variant}_s{t.seed}", "variant": t.variant, "seed": t.seed}
        with tempfile.TemporaryDirectory() as scratch:
            local_engine(cfg, scratch, reporter=lambda row, _ckpt, tags=tags: rows.append({**row, **tags})).fit()
        last = rows[-1]
        rate = last["samples_seen"] / last["wall_seconds"]
        psnr, probe = last.get("val_psnr", float("nan")), last.get("val_probe_acc", float("nan"))
        print(f"{tags['trial_id']:<32} {last['step']:>6} steps {rate:>10.0f} samples/s  PSNR {psnr:.2f}  "
              f"probe {probe:.3f}", flush=True)
    table = pd.DataFrame(rows)
    table["device_seconds"] = table["wall_seconds"]
    summary = summarize(table, BASELINE, spec.target_metric, references)
    print(format_summary(summary))
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; total wall "
          f"{time.perf_counter() - started:.0f} s")
    if mine.out:
        Path(mine.out).mkdir(parents=True, exist_ok=True)
        write_table(table, Path(mine.out) / "results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
