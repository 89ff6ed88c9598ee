"""What the ablation's time-to-target says when there is nothing to find: a variant identical to the baseline.

    python benchmarks/target_null.py                  # 400 simulated ablations per setting, ~1 min
    python benchmarks/target_null.py --repeats 2000 --seeds 3 5

Each simulated ablation has the baseline (pixel_mae) and a "twin" drawn from the same model: PSNR rising
with log FLOPs over 4 evaluations at equal FLOP fractions, a per-seed offset (seed-to-seed spread) and
per-evaluation noise. The twin's true speed-up is exactly 1x. For each target rule, the table prints the
median FLOPs speed-up of the twin (1.000 if the rule is unbiased), how often it is censored (a one-sided
bound), and how often the summary's verdict (`lmd.experiments.summary.speedup_claim`) claims a difference:
any verdict that excludes 1x ("below 1x", "at least 1x ...", "above 1x ...", "above 3x") is false here.

Rules: `worst` (the summary's: the baseline's worst final over seeds, which every baseline seed reaches) and
`mean` (the baseline's mean final, the rule before it: seeds ending below the mean never reach it). Nothing
here trains a model; it measures the statistics the ablation's answer is read with.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from lmd.experiments.summary import BASELINE, speedup_claim, summarize

FRACTIONS = np.array([0.25, 0.5, 0.75, 1.0])  # evaluations at equal fractions of the budget (as the ablation)
BUDGET = 1.6e12


def simulated_ablation(rng: np.random.Generator, seeds: int, seed_sd: float, eval_sd: float) -> pd.DataFrame:
    """Rows of the baseline and its twin: PSNR = 14 + 1.5 ln(fraction) + seed offset + evaluation noise."""
    rows = []
    for variant in (BASELINE, "twin"):
        for seed in range(seeds):
            offset = rng.normal(0.0, seed_sd)
            for fraction in FRACTIONS:
                rows.append({"trial_id": f"{variant}{seed}", "variant": variant, "seed": seed,
                             "step": int(fraction * 100), "total_steps": 100, "train_flops": fraction * BUDGET,
                             "samples_seen": fraction * 1e4, "wall_seconds": fraction * 100, "device_seconds": 100.0,
                             "val_psnr": 14 + 1.5 * math.log(fraction) + offset + rng.normal(0.0, eval_sd)})
    return pd.DataFrame(rows)


def mean_final(table: pd.DataFrame) -> float:
    finals = table[table["variant"] == BASELINE].sort_values("step").groupby("trial_id").tail(1)
    return float(finals["val_psnr"].mean())


def excludes_one(claim: str) -> bool:
    """Whether a verdict says the twin differs from the baseline (its interval, as claimed, leaves out 1x)."""
    return claim.startswith(("below 1x", "at least 1x", "above 1x", "above 3x"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[3])
    p.add_argument("--spreads", type=float, nargs="+", default=[0.15, 0.3], help="seed-to-seed PSNR sd (dB)")
    args = p.parse_args()
    print(f"{'seeds':>5} {'seed sd':>8} {'rule':>6} {'median speedup':>15} {'censored':>9} {'claims a difference':>20}")
    for seeds in args.seeds:
        for spread in args.spreads:
            rng = np.random.default_rng(0)
            tables = [simulated_ablation(rng, seeds, spread, spread / 3) for _ in range(args.repeats)]
            for rule in ("worst", "mean"):
                speedups, censored, differ = [], 0, 0
                for table in tables:
                    twin = summarize(table, target=None if rule == "worst" else mean_final(table)).set_index(
                        "variant").loc["twin"]
                    speedups.append(twin["speedup_tflops"])
                    censored += bool(twin["censoring"])
                    if not math.isnan(twin["speedup_tflops_lo"]):
                        differ += excludes_one(speedup_claim(twin["speedup_tflops_lo"], twin["speedup_tflops_hi"],
                                                             twin["censoring"]))
                n = len(tables)
                print(f"{seeds:>5} {spread:>8.2f} {rule:>6} {np.nanmedian(speedups):>15.3f} {censored / n:>9.1%} "
                      f"{differ / n:>20.1%}")


if __name__ == "__main__":
    main()
