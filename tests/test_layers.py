"""The layers of docs/ARCHITECTURE.md hold: what each module may not import, checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

# Imported in this order in one fresh process, each checked right after its import: the torch-free
# modules first (so nothing imported earlier can hide a torch import), then the Ray-free ones.
RULES = [
    ("lmd.options", {"torch", "ray"}),
    ("lmd.config", {"torch", "ray"}),
    ("lmd.config_build", {"torch", "ray"}),
    ("lmd.io", {"torch", "ray"}),
    ("lmd.entry", {"torch", "ray"}),
    ("lmd.masking", {"torch", "ray"}),  # the schedules are pure Python (the dashboard draws them)
    ("lmd.dashboard", {"torch", "ray"}),
    ("lmd.model", {"ray"}),
    ("lmd.engine", {"ray"}),
    ("lmd.runtime", {"ray"}),
    ("lmd.data.store", {"ray"}),
    ("lmd.data.store_writer", {"ray"}),
    ("lmd.data.verified", {"ray"}),
    ("lmd.data.location", {"ray"}),
    ("lmd.data.latents", {"ray"}),
    ("lmd.probe", {"ray"}),
]

CHECK = """
import importlib, json, sys
rules = json.loads(sys.argv[1])
broken = []
for module, forbidden in rules:
    importlib.import_module(module)
    found = sorted(name for name in forbidden if name in sys.modules)
    if found:
        broken.append(f"{module} imports {', '.join(found)}")
        break  # what follows would inherit the import
print(json.dumps(broken))
"""


def test_each_layer_imports_only_what_it_may():
    out = subprocess.run([sys.executable, "-c", CHECK, json.dumps([[m, sorted(f)] for m, f in RULES])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
