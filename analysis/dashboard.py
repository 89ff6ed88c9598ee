"""Render an experiment's results as one self-contained HTML dashboard.

    python analysis/dashboard.py runs/tune/ablation [--out report.html]

RESULTS is an experiment folder (written by tune/ablation.py or tune/search.py) or its
results.parquet. Reads files only; nothing is re-run.
"""

from __future__ import annotations

import argparse
import sys

from lmd.dashboard import ResultsError, render_dashboard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="analysis/dashboard.py", description=__doc__.splitlines()[0])
    p.add_argument("results", help="experiment folder or its results.parquet")
    p.add_argument("--out", help="HTML file to write (default: <experiment>/dashboard.html)")
    args = p.parse_args(argv)
    try:
        path = render_dashboard(args.results, args.out)
    except ResultsError as err:
        print(f"dashboard: error: {err}", file=sys.stderr)
        return 2
    print(f"dashboard: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
