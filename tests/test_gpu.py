"""What only a GPU can show: pinned host batches, CUDA graphs in the real loop, and resume on CUDA.

Skipped without CUDA (CI has none); `benchmarks/gpu_session.sh` runs this file on a lent GPU, where
there is no Ray (nothing here needs it). The CPU halves of each path are tested elsewhere:
tests/test_engine.py (place_on_device's decisions, the CUDA-graph step handling with stubs, resume).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmd.data.memory import InMemoryLatents, host_copy
from lmd.masking import mask_ratio, num_visible
from lmd.runtime import local_engine
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_config(**overrides):
    return tiny_config(**{"run.device": "cuda", **overrides})


def losses(engine) -> list[float]:
    return [json.loads(line)["loss"] for line in engine.metrics_path.read_text().splitlines()]


def test_pinned_host_batches_hold_the_same_values_as_pageable_ones():
    latents = torch.randn(64, 4, 8, 8).half()
    pageable = InMemoryLatents(latents, 16, seed=1)
    pinned = InMemoryLatents(latents, 16, seed=1)
    pinned.pin_memory = True
    for step in range(6):  # across an epoch boundary
        batch = pinned.batch(step)
        assert batch.is_pinned() and torch.equal(batch, pageable.batch(step))
        assert torch.equal(batch.to("cuda", non_blocking=True).cpu(), batch)
    array = np.arange(24, dtype="<f2").reshape(2, 3, 4)  # a streamed window's read-only view, as Ray gives it
    array.setflags(write=False)
    copy = host_copy(array, pinned=True)
    assert copy.is_pinned() and copy.dtype == torch.float16 and torch.equal(copy, torch.from_numpy(array.copy()))


def test_latents_left_on_the_host_train_like_latents_held_on_the_gpu(tmp_path, monkeypatch):
    cfg = cuda_config(**{"run.steps": 8, "run.log_every": 1})
    resident = local_engine(cfg, tmp_path / "resident")
    assert resident.data.latents.is_cuda
    resident.fit()
    monkeypatch.setattr("lmd.speed.RESIDENT_SHARE", 0.0)  # as if the latents were larger than the GPU's share
    host = local_engine(cfg, tmp_path / "host")
    assert not host.data.latents.is_cuda and host.data.pin_memory
    host.fit()
    assert losses(host) == pytest.approx(losses(resident), rel=1e-6)


def test_stop_and_resume_on_cuda_gives_the_straight_run(tmp_path):
    # On CPU this is bit-identical (tests/test_engine.py). On CUDA the RNG states and data order are restored
    # the same way; this records whether the GPU's kernels keep it bit-identical too.
    cfg = cuda_config(**{"run.steps": 12, "run.ckpt_every": 6, "run.log_every": 2})
    straight = local_engine(cfg, tmp_path / "a")
    straight.fit()
    local_engine(cfg, tmp_path / "b").fit(stop_at=6)
    resumed = local_engine(cfg, tmp_path / "b")
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"resume on CUDA is not bit-identical: max |diff| per tensor {differ}"
    assert losses(straight) == losses(resumed)


def test_cuda_graphs_replay_one_graph_per_visible_count_and_train_like_eager(tmp_path):
    # Last in the file: it compiles (the slowest test here). Three visible counts, the last held for 10 of 16
    # steps, so graphs are recorded and then replayed; inductor counts each graph it could not capture.
    overrides = {"run.steps": 16, "run.log_every": 16, "mask.scheduler": "uniform", "mask.start": 0.625,
                 "mask.end": 0.75, "mask.ramp": 0.375}
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    graphs = local_engine(cuda_config(**overrides, **{"run.compile": True, "run.compile_mode": "reduce-overhead"}),
                          tmp_path / "graphs")
    assert graphs.cuda_graphs
    graphs.fit()
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs"
    eager = local_engine(cuda_config(**overrides), tmp_path / "eager")
    eager.fit()
    counts = {num_visible(graphs.cfg.model.num_patches, mask_ratio(t, 16, graphs.cfg.mask)) for t in range(16)}
    row = json.loads(graphs.metrics_path.read_text().splitlines()[-1])
    assert row["compiled_graphs"] == len(counts) >= 2
    assert row["loss"] == pytest.approx(losses(eager)[-1], rel=2e-2)  # bf16 autocast: fused kernels round apart
