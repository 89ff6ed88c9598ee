"""How often an early-stopping rung's ranking of trials agrees with their final ranking, per pair of schedulers.

    python tune/ablation.py --evals 8 --storage /tmp/rungs --name ablation-evals8      # the data: ~15-30 min on CPU
    python benchmarks/rung_agreement.py /tmp/rungs/ablation-evals8/results.parquet
    python benchmarks/rung_agreement.py RESULTS --metric val_probe_acc --json /tmp/rungs/agreement_probe.json
    python benchmarks/rung_agreement.py RESULTS --curves       # only each variant's mean metric per rung

The search (tune/search.py) stops trials early with ASHA, but a mask-ratio curriculum (cosine, uniform,
piecewise: 0.15 ramping to 0.75 over the first 2/3 of training) is evaluated at the fixed ratio 0.75, so
mid-ramp it can look worse than a constant-0.75 schedule it ends up beating. This measures that on an
ablation's results table: each complete trial's evaluations (rows with a val_psnr), sorted by step, are
its rungs k = 1..E at k/E of its training FLOPs (`tune/ablation.py --evals E`), the last one its final value.

For each rung k < E and each unordered pair of trials from different variants, the pair "agrees" when
sign(M_k(a) - M_k(b)) == sign(M_final(a) - M_final(b)). The first table gives the fraction of agreeing
pairs per rung for each pair of scheduler types ("cosine vs constant"; "cosine vs cosine" is two different
variants sharing a scheduler), for all pairs of one curriculum and one constant trial, for all pairs with
the same scheduler type (within-scheduler) and overall. Seeds of one variant are not paired: their order
is seed noise, not the comparison a search makes.

The second table is what ASHA with reduction factor 2 does with it: Ray stops a trial at a rung when its
value is below the 50th percentile of the values recorded there. Among the trials whose final value is in
the top half (at or above the median final), it gives the fraction below the rung's median, i.e. wrongly
stopped, for curriculum and constant trials separately. All trials are compared at once here; the real
ASHA compares with whichever trials reached the rung before, so this is its expected case, not its worst.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lmd.experiments.results import complete_trials
from lmd.experiments.summary import HIGHER_IS_BETTER

CONSTANT = "constant"
# Row order of the tables: the curricula in the order the ablation lists them, then the constant schedule.
SCHEDULER_ORDER = ("cosine", "uniform", "piecewise", CONSTANT)
CURRICULUM_VS_CONSTANT = "curriculum vs constant"
WITHIN = "within-scheduler"
OVERALL = "overall"
SUMMARY_ROWS = (CURRICULUM_VS_CONSTANT, WITHIN, OVERALL)  # listed after the scheduler-type pairs


def trial_curves(table: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Per complete trial: its variant and scheduler (`trials`) and its metric at each evaluation (`values`, one
    column per rung 1..E, same index); and each rung's mean measured FLOP fraction (a check that rung k is k/E)."""
    table, _ = complete_trials(table)  # a stopped or failed trial has no final value to agree with
    evals = table[table["val_psnr"].notna()].sort_values(["trial_id", "step"])
    evals = evals.assign(rung=evals.groupby("trial_id").cumcount() + 1,
                         fraction=evals["train_flops"] / evals.groupby("trial_id")["train_flops"].transform("max"))
    counts = evals.groupby("trial_id")["rung"].max()
    if counts.nunique() != 1:
        raise SystemExit(f"trials have different numbers of evaluations ({sorted(counts.unique())}): "
                         "rung k would not be the same FLOP fraction for all of them")
    values = evals.pivot(index="trial_id", columns="rung", values=metric)
    if values.isna().any().any():
        raise SystemExit(f"{metric} is missing at some evaluations: pick a metric every evaluation records")
    trials = evals.groupby("trial_id")[["variant", "scheduler"]].first().loc[values.index]
    return trials, values, evals.groupby("rung")["fraction"].mean().to_numpy()


def scheduler_key(scheduler: str) -> tuple[int, str]:
    """Sort key: the known schedulers in SCHEDULER_ORDER, any other after them by name."""
    known = scheduler in SCHEDULER_ORDER
    return (SCHEDULER_ORDER.index(scheduler) if known else len(SCHEDULER_ORDER), "" if known else scheduler)


def pair_groups(a: str, b: str) -> list[str]:
    """The rows a pair of trials with schedulers `a` and `b` counts in: its scheduler-type pair, overall, and
    within-scheduler or curriculum-vs-constant where it is one."""
    first, second = sorted((a, b), key=scheduler_key)
    groups = [f"{first} vs {second}"]
    if first == second:
        groups.append(WITHIN)
    elif CONSTANT in (first, second):
        groups.append(CURRICULUM_VS_CONSTANT)
    return groups + [OVERALL]


def agreement(trials: pd.DataFrame, values: pd.DataFrame) -> dict[str, dict[str, object]]:
    """Per pair group, in table order: its number of pairs and, per rung k < E, the fraction of pairs whose order
    at k is their final order. A sign comparison of differences, so it needs no metric direction."""
    matrix = values.to_numpy(float)
    variants, schedulers = trials["variant"].to_numpy(), trials["scheduler"].to_numpy()
    agrees: dict[str, list[np.ndarray]] = {}
    for i, j in itertools.combinations(range(len(matrix)), 2):
        if variants[i] == variants[j]:
            continue
        same = np.sign(matrix[i, :-1] - matrix[j, :-1]) == np.sign(matrix[i, -1] - matrix[j, -1])
        for group in pair_groups(schedulers[i], schedulers[j]):
            agrees.setdefault(group, []).append(same)
    type_pairs = sorted(set(agrees) - set(SUMMARY_ROWS), key=lambda g: [scheduler_key(s) for s in g.split(" vs ")])
    order = type_pairs + [g for g in SUMMARY_ROWS if g in agrees]
    return {g: {"pairs": len(agrees[g]), "by_rung": np.mean(agrees[g], axis=0).tolist()} for g in order}


def wrongly_stopped(trials: pd.DataFrame, values: pd.DataFrame, higher: bool) -> dict[str, dict[str, object]]:
    """ASHA, reduction factor 2: among the trials with a final value in the top half, per kind (curriculum,
    constant), the number of them and the fraction below the median at each rung k < E (stopped there)."""
    score = values.to_numpy(float) * (1 if higher else -1)  # larger is better from here on
    median = np.percentile(score, 50, axis=0)  # Ray's ASHA cutoff for rf=2 (linear interpolation, as nanpercentile)
    top_final = score[:, -1] >= median[-1]
    stopped = score[:, :-1] < median[:-1]
    constant = trials["scheduler"].to_numpy() == CONSTANT
    out = {}
    for kind, members in (("curriculum", ~constant), (CONSTANT, constant)):
        top = top_final & members
        out[kind] = {"trials": int(top.sum()),
                     "by_rung": stopped[top].mean(axis=0).tolist() if top.any() else [float("nan")] * stopped.shape[1]}
    return out


def variant_curves(trials: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """Each variant's mean metric at each rung (its seeds averaged), with its scheduler."""
    means = values.groupby(trials["variant"]).mean()
    means.insert(0, "scheduler", trials.groupby("variant")["scheduler"].first())
    return means.sort_values("scheduler", key=lambda s: s.map(scheduler_key), kind="stable")


def rung_header(label: str, width: int, fractions: np.ndarray, last: str) -> str:
    """A table header over the rungs k < E: each named k/E with its measured FLOP fraction under it."""
    rungs, evaluations = fractions[:-1], len(fractions)
    names = "".join(f"{f'{k}/{evaluations}':>8}" for k in range(1, evaluations))
    measured = "".join(f"{f:>8.3f}" for f in rungs)
    return f"{label:<{width}}{names}{last:>8}\n{'(measured FLOP fraction)':<{width}}{measured}"


def format_report(results: Path, metric: str, higher: bool, trials: pd.DataFrame, fractions: np.ndarray,
                  agree: dict[str, dict[str, object]], stopped: dict[str, dict[str, object]]) -> str:
    """The two tables as plain text, under a line saying what was read."""
    width = 28
    lines = [f"{results}: {len(trials)} complete trials, {trials['variant'].nunique()} variants, "
             f"{len(fractions)} evaluations each; metric {metric} ({'higher' if higher else 'lower'} is better)",
             "",
             "pairs of trials from different variants ordered as at the end (fraction of pairs)",
             rung_header("rung", width, fractions, "pairs")]
    for group, row in agree.items():
        if group == next(g for g in agree if g in SUMMARY_ROWS):
            lines.append("-" * (width + 8 * len(fractions)))
        lines.append(f"{group:<{width}}" + "".join(f"{v:>8.1%}" for v in row["by_rung"]) + f"{row['pairs']:>8}")
    lines += ["",
              "ASHA rf=2: trials with a top-half final value below the median at the rung (wrongly stopped)",
              rung_header("kind", width, fractions, "trials")]
    for kind, row in stopped.items():
        lines.append(f"{kind:<{width}}" + "".join(f"{v:>8.1%}" for v in row["by_rung"]) + f"{row['trials']:>8}")
    return "\n".join(lines)


def format_curves(curves: pd.DataFrame, metric: str, fractions: np.ndarray) -> str:
    """`variant_curves` as plain text."""
    count = len(fractions)
    header = f"{'variant':<24}{'scheduler':>10}" + "".join(f"{f'{k}/{count}':>8}" for k in range(1, count + 1))
    rows = [f"{variant:<24}{row['scheduler']:>10}" + "".join(f"{v:>8.3f}" for v in row.iloc[1:])
            for variant, row in curves.iterrows()]
    return "\n".join([f"mean {metric} per variant (over seeds) at each evaluation, k/E of its training FLOPs",
                      header, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="an ablation's results.parquet (tune/ablation.py --evals E, E >= 2)")
    p.add_argument("--metric", choices=sorted(HIGHER_IS_BETTER), default="val_psnr")
    p.add_argument("--curves", action="store_true", help="print only each variant's mean metric per rung")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers to this JSON file")
    args = p.parse_args()
    trials, values, fractions = trial_curves(pd.read_parquet(args.results), args.metric)
    if args.curves:
        print(format_curves(variant_curves(trials, values), args.metric, fractions))
        return
    if len(fractions) < 2:
        raise SystemExit("one evaluation per trial: no rung before the final one (run the ablation with --evals >= 2)")
    higher = HIGHER_IS_BETTER[args.metric]
    agree, stopped = agreement(trials, values), wrongly_stopped(trials, values, higher)
    print(format_report(args.results, args.metric, higher, trials, fractions, agree, stopped))
    if args.json:
        args.json.write_text(json.dumps({
            "results": str(args.results), "metric": args.metric, "higher_is_better": higher,
            "trials": len(trials), "evaluations": len(fractions), "rung_fractions": fractions[:-1].tolist(),
            "agreement": agree, "wrongly_stopped": stopped}, indent=2))


if __name__ == "__main__":
    main()
