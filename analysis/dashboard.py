"""Render an experiment's results as one self-contained HTML dashboard.

    python analysis/dashboard.py runs/tune/ablation [--out report.html]

RESULTS is an experiment folder (written by tune/ablation.py or tune/search.py) or its
results.parquet. Reads files only; nothing is re-run.
"""

from __future__ import annotations

import argparse
import sys

from lmd.dashboard import ResultsError, render_dashboard
from lmd.entry import EXIT_RUNTIME, EXIT_USAGE, fail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="analysis/dashboard.py", description=__doc__.splitlines()[0])
    p.add_argument("results", help="experiment folder or its results.parquet")
    p.add_argument("--out", help="HTML file to write (default: <experiment>/dashboard.html)")
    args = p.parse_args(argv)
    try:
        path = render_dashboard(args.results, args.out)
    except ResultsError as err:
        fail(str(err), EXIT_USAGE, prog="dashboard")
    except OSError as err:  # e.g. --out in a read-only or missing folder
        fail(f"{err.filename or args.out}: cannot write the dashboard ({err.strerror or err})", EXIT_RUNTIME,
             prog="dashboard")
    print(f"dashboard: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
