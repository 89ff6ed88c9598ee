"""Shared fixtures: small configs that train in seconds on CPU."""

from __future__ import annotations

import os

import pytest
import torch

from lmd.config import TrainConfig, build_config


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


def tiny_config(**overrides) -> TrainConfig:
    base = {"run.steps": 20, "run.log_every": 2, "run.eval_every": 10, "run.ckpt_every": 10,
            "run.device": "cpu", "data.batch_size": 8, "data.num_train": 64, "data.num_val": 16,
            "optim.warmup_steps": 3, "data.dataset": "synthetic"}
    base.update(overrides)
    return build_config(overrides=base, preset="tiny")
