"""Imported at start-up by a Python whose PYTHONPATH holds this folder: makes it look like the lent GPU machine.

That machine has torch, pyarrow, pandas, scipy, scikit-image and scikit-learn, but no Ray, Optuna, Plotly,
diffusers or moto (README, "Benchmarks"); Ray's wheel is too large to travel there. Importing one of those
fails here as it would there, so a benchmark that pulled one in on its way would fail in the test, not in
a rare minute of lent GPU time. foolbox is missing there too but is not blocked: its wheel travels with the
session (benchmarks/gpu_prepare.sh), because the bundled photos include its ImageNet JPEGs.
"""

import sys

ABSENT = frozenset({"ray", "optuna", "plotly", "diffusers", "moto"})


class _AbsentPackages:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the lent GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _AbsentPackages())
