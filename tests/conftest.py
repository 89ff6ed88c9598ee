"""Shared fixtures: small configs that train in seconds on CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from lmd.config import TrainConfig
from lmd.config_build import build_config


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # Default latent stores are cached per machine; tests build theirs in a private folder, once per
    # session (the default bundled store takes ~50 s on 2 cores), and children inherit it.
    os.environ["LMD_CACHE"] = str(tmp_path_factory.mktemp("lmd-cache"))
    yield


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    # Bit-identical comparisons need the same reduction order in every run of a test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml): each test file runs whole on one worker, so its
# module fixtures (a Ray session, a store) are built once; the two files that share the session's real
# ablation and search runs run together.
SHARED_GROUPS = {"test_experiments": "tune", "test_dashboard": "tune", "test_search": "tune"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marker into each test's group
def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = item.path.stem
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(stem, stem)))


def descendants(root: int) -> set[int]:
    """Pids of every live process below `root`: a test's own Ray processes, not those of a test running beside it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ray_train_workers(root: int) -> list[int]:
    """This test's Ray Train worker processes (below `root`: the test process, or a driver it started)."""
    import subprocess

    named = {int(p) for p in subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True,
                                            text=True).stdout.split()}
    return sorted(named & descendants(root))


def tiny_config(**overrides) -> TrainConfig:
    base = {"run.steps": 20, "run.log_every": 2, "run.eval_every": 10, "run.ckpt_every": 10,
            "run.device": "cpu", "data.batch_size": 8, "data.num_train": 64, "data.num_val": 16,
            "optim.warmup_steps": 3, "data.dataset": "synthetic"}
    base.update(overrides)
    return build_config(overrides=base, preset="tiny")


def tune_script(name: str) -> Any:
    """tune/<name>.py as a module (its flags, table or space, typed experiment), without running it."""
    import importlib.util
    import sys

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(f"tune_{name}", repo / "tune" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an imported module is (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def run_tune_script(script: str, *args: str, timeout: float = 600):
    """Run tune/<script> as a user would (a fresh process with its own Ray)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(repo / "tune" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# Tiny experiments on Fashion-MNIST: 20 steps, evaluations at 10 and 20, 16 held-out items (PSNR decoding
# dominates on CPU), the probe fit on 64 labelled items.
SMALL_DATA = ["--num-train", "128", "--num-val", "16", "--num-probe", "64", "--batch-size", "16"]
SMALL_RUN = ["--budget-by", "steps", "--budget", "20", "--evals", "2", *SMALL_DATA]  # the ablation
SMALL_SEARCH = ["--budget", "0.01", "--evals", "2", "--finalists", "1", "--seeds", "2", *SMALL_DATA]


@pytest.fixture(scope="session")
def ablation_run(tmp_path_factory):
    """One real small ablation (2 variants x 2 seeds), shared by the results and dashboard tests."""
    storage = tmp_path_factory.mktemp("ablation-storage")
    proc = run_tune_script("ablation.py", "--variants", "lmd_cosine", "pixel_mae", "--seeds", "2", *SMALL_RUN,
                           "--storage", str(storage))
    return proc, storage / "ablation"


@pytest.fixture(scope="session")
def search_run(tmp_path_factory):
    """One real small search with the conditional (constant) schedule allowed, two objectives and a finalist."""
    storage = tmp_path_factory.mktemp("search-storage")
    proc = run_tune_script("search.py", "--samples", "4", "--include-constant", "--objectives", *SMALL_SEARCH,
                           "--storage", str(storage))
    return proc, storage / "search"


@contextmanager
def local_ray(num_cpus: int) -> Iterator[Any]:
    """A local Ray for one test module's fixture: started here unless one is running, shut down only if started here.

    `num_cpus` is logical: 4 on a 2-core machine leaves room for Ray Data's read tasks beside 2 training workers.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
