"""The training loop: resume equality, atomic and verified checkpoints, divergence handling."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lmd.checkpoint as ckpt
from lmd.checkpoint import CheckpointError, checkpoint_dirs, latest_checkpoint, load_checkpoint
from lmd.config import OptimConfig
from lmd.data.latents import prepare_data
from lmd.engine import Engine, NonFiniteLossError, RunDirError, lr_at
from lmd.runtime import local_engine

from .conftest import tiny_config


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the clock and what is measured with it differ between runs; nothing else may
        for key in ("wall_seconds", "samples_per_s", "tflops_per_s"):
            row.pop(key)
    return rows


def _params(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


def test_stop_and_resume_is_bit_identical_to_a_straight_run(tmp_path):
    cfg = tiny_config(**{"run.steps": 20, "run.ckpt_every": 10})
    straight = local_engine(cfg, tmp_path / "a")
    straight.fit()

    first = local_engine(cfg, tmp_path / "b")
    assert first.fit(stop_at=10).step == 10
    resumed = local_engine(cfg, tmp_path / "b")  # a fresh process would build a fresh engine
    resumed.fit(resume=True)

    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_metrics_rows_carry_the_documented_fields(tmp_path):
    local_engine(tiny_config(), tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 21, 2))
    for key in ("samples_seen", "wall_seconds", "loss", "mask_ratio", "lr"):
        assert all(key in r for r in rows)
    evals = [r for r in rows if "val_masked_mse" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(math.isfinite(r["val_masked_mse_fixed"]) and r["eval_ratio"] == 0.75 for r in evals)
    assert rows[-1]["samples_seen"] == 20 * 8
    assert rows[0]["mask_ratio"] < rows[-1]["mask_ratio"] == pytest.approx(0.75)
    # What was trained: a whole number of masked patches (the scheduled ratio, rounded).
    cfg = tiny_config()
    assert all(r["masked_fraction"] * cfg.model.num_patches == pytest.approx(
        round(r["masked_fraction"] * cfg.model.num_patches)) for r in rows)
    assert rows[-1]["masked_fraction"] == pytest.approx(0.75)


def test_evals_fall_at_equal_fractions_of_the_runs_flops_and_are_checkpointed(tmp_path):
    from lmd.flops import run_flops, step_flops

    cfg = tiny_config(**{"run.steps": 40, "run.evals": 4, "run.log_every": 5, "run.ckpt_every": 40,
                         "mask.scheduler": "cosine"})
    local_engine(cfg, tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_masked_mse" in r]
    total, most = run_flops(cfg), step_flops(cfg, 0.0)
    assert len(evals) == 4 and evals[-1]["step"] == 40
    for k, row in enumerate(evals, start=1):  # each evaluation is the first step past k/4 of the FLOPs
        assert k / 4 * total <= row["train_flops"] * (1 + 1e-9) < k / 4 * total + most
    # The schedule's early steps see more tokens and cost more: the first quarter of the FLOPs ends before a
    # quarter of the steps, where step-spaced evaluations would have put it.
    assert evals[0]["step"] < 10
    assert [int(p.name.split("_")[1]) for p in checkpoint_dirs(tmp_path / "checkpoints")][-3:] == [
        r["step"] for r in evals[-3:]]  # each evaluation checkpointed (the last three kept)


def test_default_run_learns(tmp_path):
    cfg = tiny_config(**{"run.steps": 150, "run.eval_every": 150, "data.batch_size": 32, "data.num_train": 512,
                         "data.num_val": 64})
    local_engine(cfg, tmp_path).fit()
    rows = _metrics(tmp_path)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]


def test_keeps_only_the_last_k_checkpoints(tmp_path):
    local_engine(tiny_config(**{"run.ckpt_every": 4, "run.keep_last": 2}), tmp_path).fit()
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step_00000016", "step_00000020"]


def test_existing_run_dir_is_refused_without_resume(tmp_path):
    local_engine(tiny_config(), tmp_path).fit(stop_at=10)
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        local_engine(tiny_config(), tmp_path).fit()


def test_resume_with_a_changed_config_names_the_fields(tmp_path):
    local_engine(tiny_config(), tmp_path).fit(stop_at=10)
    changed = tiny_config(**{"mask.end": 0.6, "run.log_every": 5})  # log_every may change; mask.end may not
    with pytest.raises(CheckpointError, match=r"changed fields: mask\.end$"):
        local_engine(changed, tmp_path).fit(resume=True)


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    engine = local_engine(tiny_config(), tmp_path)
    engine.fit(stop_at=10)

    def write_half_then_die(state, path):
        path.write_bytes(b"PK\x03\x04 partial")
        raise OSError("disk went away mid-write")

    monkeypatch.setattr(ckpt, "_write_state", write_half_then_die)
    engine.step = 12
    with pytest.raises(CheckpointError, match="cannot write the checkpoint of step 12 .*mid-write.*intact"):
        engine.save()
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000010"
    state, manifest = load_checkpoint(latest)
    assert state["step"] == manifest["step"] == 10


def test_a_write_killed_before_rename_is_ignored_and_swept(tmp_path):
    local_engine(tiny_config(), tmp_path).fit(stop_at=10)
    stale = tmp_path / "checkpoints" / ".tmp-step_00000020-deadbeef"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"\x00" * 100)  # what SIGKILL during torch.save leaves behind
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000010"
    resumed = local_engine(tiny_config(), tmp_path)
    assert resumed.fit(resume=True).step == 20
    assert not stale.exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: _flip_byte(d / "state.pt"), "corrupt: sha256"),
    (lambda d: _truncate(d / "state.pt"), "truncated"),
    (lambda d: (d / "state.pt").unlink(), "missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest is not valid JSON"),
])
def test_damaged_checkpoint_is_refused_with_a_clear_message(tmp_path, damage, message):
    local_engine(tiny_config(), tmp_path).fit(stop_at=10)
    latest = latest_checkpoint(tmp_path / "checkpoints")
    damage(latest)
    with pytest.raises(CheckpointError, match=message) as err:
        local_engine(tiny_config(), tmp_path).fit(resume=True)
    assert str(latest) in str(err.value)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


class _PoisonedData:
    """Clean batches until `bad_step`, then NaNs: a stand-in for a diverging run."""

    def __init__(self, inner, bad_step):
        self.inner, self.bad_step = inner, bad_step

    def batch(self, step):
        batch = self.inner.batch(step)
        return batch * float("nan") if step >= self.bad_step else batch


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config()
    data = prepare_data(cfg)
    engine = Engine(cfg, tmp_path, replace(data, train=_PoisonedData(data.train, bad_step=13)), torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan before step 14.*step_00000010"):
        engine.fit()
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step_00000010"]
    state, _ = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_request_stop_checkpoints_at_the_current_step(tmp_path):
    engine = local_engine(tiny_config(**{"run.ckpt_every": 100, "run.steps": 50}), tmp_path)
    original = engine.train_step

    def stop_after_seven(*args):
        if engine.step == 6:
            engine.request_stop()
        return original(*args)

    engine.train_step = stop_after_seven
    assert engine.fit().step == 7
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000007"


def test_lr_warms_up_then_decays_to_min():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(100, 100, cfg) == pytest.approx(1e-5)
    values = [lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))


def test_building_an_engine_changes_no_process_state(tmp_path):
    cfg = tiny_config()
    data = prepare_data(cfg)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    engine = Engine(cfg, tmp_path, data, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert (torch.get_num_threads(), torch.get_float32_matmul_precision()) == (threads, precision)
    # The initial weights are a function of (config, seed) alone, whatever the process's RNG did before.
    torch.manual_seed(12345)
    again = Engine(cfg, tmp_path / "again", data, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(engine.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))


def test_the_model_wrapper_is_what_a_step_calls(tmp_path):
    calls = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls.append(1)
            return self.inner(*args)

    cfg = tiny_config(**{"run.steps": 4})
    engine = Engine(cfg, tmp_path, prepare_data(cfg), torch.device("cpu"), wrap_model=Recording)
    engine.fit()
    assert len(calls) == 4  # one per training step; evaluation uses the bare model


def test_every_row_carries_throughput_and_only_rank_zero_logs(tmp_path, caplog):
    cfg = tiny_config(**{"run.steps": 6})
    local_engine(cfg, tmp_path / "r0").fit()
    rows = [json.loads(line) for line in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["samples_per_s"] > 0 and r["tflops_per_s"] > 0 for r in rows)
    # A second rank (no process group here: it trains its half-batch) writes its rows but logs nothing.
    caplog.set_level("INFO", logger="lmd.engine")
    caplog.clear()
    Engine(cfg, tmp_path / "r1", prepare_data(cfg, rank=1, world_size=2), torch.device("cpu"), rank=1,
           world_size=2).fit()
    with pytest.raises(ValueError, match="rank 0 of 1"):  # a source cut for another rank is refused
        Engine(cfg, tmp_path / "r2", prepare_data(cfg), torch.device("cpu"), rank=1, world_size=2)
    assert not [r for r in caplog.records if r.name == "lmd.engine"]
    assert (tmp_path / "r1" / "metrics.jsonl").read_text().count("\n") == len(rows)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_wraps_the_wrapped_model_and_trains_like_eager(tmp_path, monkeypatch, mode):
    # Dynamo + AOTAutograd trace forward and backward as inductor would, without minutes of C++ codegen
    # (aot_eager has no modes: the one asked for is recorded, as inductor would receive it).
    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: modes.append(mode) or real_compile(
        module, backend="aot_eager", dynamic=dynamic))
    cfg = tiny_config(**{"run.steps": 3, "run.log_every": 1, "mask.scheduler": "constant"})
    eager = local_engine(cfg, tmp_path / "eager")
    eager.fit()
    compiled_cfg = tiny_config(**{"run.steps": 3, "run.log_every": 1, "mask.scheduler": "constant",
                                  "run.compile": True, "run.compile_mode": mode})
    wrapped = []
    compiled = Engine(compiled_cfg, tmp_path / "compiled", prepare_data(compiled_cfg), torch.device("cpu"),
                      wrap_model=lambda m: wrapped.append(m) or m)
    # What a step calls is the compiled form of what the wrapper returned (DDP under Ray Train).
    assert wrapped == [compiled.model] and getattr(compiled.forward, "_orig_mod", None) is compiled.model
    assert modes == [mode] and not compiled.cuda_graphs  # CUDA graphs only on CUDA; CPU compiles the same graphs
    compiled.fit()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("eager", "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def _two_checkpoints(tmp_path):
    local_engine(tiny_config(**{"run.ckpt_every": 5}), tmp_path).fit(stop_at=10)
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000005", "step_00000010"]
    return root


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: _flip_byte(d / "state.pt"), "rejected-corrupt"),
    (lambda d: (d / "manifest.json").unlink(), "rejected-unverified"),  # a kill mid-prune or an edit
])
def test_resume_takes_the_newest_verified_checkpoint_and_keeps_what_it_skips(tmp_path, caplog, damage, reason):
    root = _two_checkpoints(tmp_path)
    newest = root / "step_00000010"
    damage(newest)
    state_bytes = (newest / "state.pt").read_bytes()
    caplog.set_level("INFO")
    result = local_engine(tiny_config(**{"run.ckpt_every": 5}), tmp_path).fit(resume=True)
    assert result.step == 20
    assert "resumed from" in caplog.text and "step_00000005" in caplog.text and "step_00000010" in caplog.text
    kept = root / f"step_00000010.{reason}"
    assert (kept / "state.pt").read_bytes() == state_bytes  # set aside, never overwritten nor deleted
    assert latest_checkpoint(root).name == "step_00000020"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_resume_with_no_checkpoint_that_verifies_refuses_and_changes_nothing_so_it_refuses_again(tmp_path):
    root = _two_checkpoints(tmp_path)
    for step in ("step_00000005", "step_00000010"):
        _flip_byte(root / step / "state.pt")
    before = _tree(tmp_path)
    for _ in range(2):  # the second --resume must not find a clean folder and start from step 0
        with pytest.raises(CheckpointError, match="no checkpoint under .* verifies.*nothing was changed"):
            local_engine(tiny_config(**{"run.ckpt_every": 5}), tmp_path).fit(resume=True)
        assert _tree(tmp_path) == before


def test_a_run_holding_only_checkpoints_set_aside_is_not_restarted_from_step_0(tmp_path):
    root = _two_checkpoints(tmp_path)
    for step in ("step_00000005", "step_00000010"):
        (root / step).rename(root / f"{step}.rejected-corrupt")
    with pytest.raises(CheckpointError, match="holds only checkpoints set aside earlier"):
        local_engine(tiny_config(**{"run.ckpt_every": 5}), tmp_path).fit(resume=True)


def test_resuming_a_finished_run_reports_its_last_loss(tmp_path):
    first = local_engine(tiny_config(), tmp_path).fit()
    again = local_engine(tiny_config(), tmp_path).fit(resume=True)
    assert again.step == first.step == 20 and again.final_loss == pytest.approx(first.final_loss)


def test_unknown_entries_and_bad_metrics_lines_do_not_block_resume(tmp_path, caplog):
    root = _two_checkpoints(tmp_path)
    shutil.copytree(root / "step_00000010", root / "step_00000010.bak")  # a user's backup copy
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 11, "loss": 0.1')  # a torn last line
    caplog.set_level("WARNING")
    assert local_engine(tiny_config(**{"run.ckpt_every": 5}), tmp_path).fit(resume=True).step == 20
    assert "step_00000010.bak: not a checkpoint" in caplog.text
    assert (root / "step_00000010.bak" / "state.pt").is_file()
    assert (tmp_path / "metrics.jsonl.rejected").read_text() == '{"step": 11, "loss": 0.1\n'
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 20


def test_a_prune_killed_midway_leaves_only_a_temporary_folder(tmp_path, monkeypatch):
    real_rmtree = ckpt.shutil.rmtree

    def die_midway(path, ignore_errors=False):
        (Path(path) / "manifest.json").unlink()  # what a kill after deleting the first file leaves
        raise KeyboardInterrupt

    local_engine(tiny_config(**{"run.ckpt_every": 5, "run.keep_last": 1}), tmp_path).fit(stop_at=5)
    monkeypatch.setattr(ckpt.shutil, "rmtree", die_midway)
    with pytest.raises(KeyboardInterrupt):
        local_engine(tiny_config(**{"run.ckpt_every": 5, "run.keep_last": 1}), tmp_path).fit(resume=True)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    root = tmp_path / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names[-1] == "step_00000010" and all(n.startswith(".tmp-prune-step_00000005") for n in names[:-1])
    assert local_engine(tiny_config(**{"run.ckpt_every": 5, "run.keep_last": 1}), tmp_path).fit(resume=True).step == 20
    assert [p.name for p in root.iterdir()] == ["step_00000020"]


@pytest.mark.parametrize("blocker", ["a file", "a file above it"])
def test_an_unwritable_run_dir_is_one_error_naming_it(tmp_path, blocker):
    # Files in the way fail for every user (a read-only folder does not stop root, as CI runs).
    (tmp_path / "taken").write_text("a file where the run dir should be")
    run_dir = tmp_path / "taken" if blocker == "a file" else tmp_path / "taken" / "run"
    with pytest.raises(RunDirError, match=f"run dir {run_dir}: cannot write there"):
        local_engine(tiny_config(), run_dir).fit()


def test_a_compiled_schedule_builds_one_graph_per_visible_count_and_trains_like_eager(tmp_path, monkeypatch):
    # Static shapes: the step passes one ratio per visible count, so a cosine schedule over 12 steps compiles
    # exactly one graph per count it reaches (a symbolic-size graph would serve them all after the second).
    from lmd.masking import mask_ratio, num_visible

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: real_compile(
        module, backend="aot_eager", dynamic=dynamic))
    overrides = {"run.steps": 12, "run.log_every": 12, "mask.scheduler": "cosine", "mask.start": 0.1,
                 "mask.end": 0.9, "mask.ramp": 1.0}
    compiled = local_engine(tiny_config(**overrides, **{"run.compile": True}), tmp_path / "compiled")
    compiled.fit()
    eager = local_engine(tiny_config(**overrides), tmp_path / "eager")
    eager.fit()
    cfg = compiled.cfg
    counts = {num_visible(cfg.model.num_patches, mask_ratio(t, 12, cfg.mask)) for t in range(12)}
    assert len(counts) >= 3  # the schedule does visit several shapes
    row = json.loads(compiled.metrics_path.read_text().splitlines()[-1])
    assert row["compiled_graphs"] == len(counts)
    assert row["loss"] == pytest.approx(json.loads(eager.metrics_path.read_text().splitlines()[-1])["loss"], rel=1e-4)


@pytest.mark.parametrize(("mode", "graphs"), [("default", False), ("reduce-overhead", True), ("max-autotune", True)])
def test_cuda_graph_modes_are_known_and_mark_each_step(tmp_path, monkeypatch, mode, graphs):
    from lmd.config import COMPILE_MODES
    from lmd.speed import uses_cuda_graphs

    assert mode in COMPILE_MODES
    assert uses_cuda_graphs(mode, torch.device("cuda")) is graphs and not uses_cuda_graphs(mode, torch.device("cpu"))
    # The step's CUDA-graph handling, exercised on CPU: a mark per step, and a loss that is the step's own copy.
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    engine = local_engine(tiny_config(**{"run.steps": 3, "run.log_every": 1}), tmp_path)
    engine.cuda_graphs = graphs
    outputs = []
    real_forward = engine.forward
    engine.forward = lambda *a: outputs.append(real_forward(*a)) or outputs[-1]
    latents = engine.data.batch(0).float()
    loss = engine.train_step(latents, 0.75, engine.mask_noise(latents.shape[0], 0))
    assert marks == ([1] if graphs else [])
    assert (loss.data_ptr() != outputs[-1][0].data_ptr()) is graphs  # a replay would overwrite the output's memory


def test_in_memory_latents_move_to_a_gpu_only_when_they_fit_a_quarter_of_its_free_memory(monkeypatch):
    from lmd.speed import place_on_device

    class Source:
        latents = torch.zeros(1024, 256)  # 1 MiB of float32
        moved_to = None
        pin_memory = False

        def to_device(self, device):
            self.moved_to = device

    for free, moves in ((4 * 2**20, True), (4 * 2**20 - 1, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * 2**30))
        source = Source()
        assert place_on_device(source, torch.device("cuda")) is moves
        assert source.moved_to == (torch.device("cuda") if moves else None)
        assert source.pin_memory is not moves  # latents left on the host hand out pinned batches
    on_cpu = Source()
    assert place_on_device(on_cpu, torch.device("cpu")) is False and on_cpu.pin_memory is False  # nothing to copy

    class Stream:  # a streamed store has no latents to move: its batches are pinned for a GPU
        pin_memory = False

    stream = Stream()
    assert place_on_device(stream, torch.device("cuda")) is False and stream.pin_memory is True


def test_latents_moved_to_the_device_give_the_same_batches_and_labels():
    from lmd.data.memory import InMemoryLatents

    latents, labels = torch.randn(40, 4, 2, 2), torch.arange(40) % 7
    host = InMemoryLatents(latents.clone(), 8, seed=3, labels=labels, rank=1, world_size=2)
    moved = InMemoryLatents(latents.clone(), 8, seed=3, labels=labels, rank=1, world_size=2)
    moved.batch(0)  # an epoch's order already cached before the move must follow the latents
    moved.to_device(torch.device("cpu"))
    for step in range(12):  # 5 steps an epoch: crosses two epoch boundaries
        assert torch.equal(moved.batch(step), host.batch(step))
        pairs = zip(moved.labelled_batch(step), host.labelled_batch(step), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    assert moved._perm_on_latents.device == moved.latents.device


def test_gpu_peaks_are_read_by_whole_words_longest_first():
    from lmd.flops import GPU_PEAK_BF16, peak_of

    # torch.cuda.get_device_name's spellings (the first two seen on the lent machines)
    assert peak_of("NVIDIA H100 80GB HBM3") == GPU_PEAK_BF16["H100"]
    assert peak_of("NVIDIA H200") == GPU_PEAK_BF16["H200"]
    assert peak_of("NVIDIA H100 PCIe") == GPU_PEAK_BF16["H100 PCIe"] != GPU_PEAK_BF16["H100"]
    assert peak_of("NVIDIA H200 NVL") == GPU_PEAK_BF16["H200 NVL"] != GPU_PEAK_BF16["H200"]
    assert peak_of("NVIDIA L40") == GPU_PEAK_BF16["L40"] != GPU_PEAK_BF16["L4"]
    assert peak_of("NVIDIA L4") == GPU_PEAK_BF16["L4"]
    assert peak_of("NVIDIA GeForce RTX 4090") is None  # unknown: no MFU rather than a wrong one
