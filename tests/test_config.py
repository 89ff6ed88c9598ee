"""Config validation at the edge: every bad value is named, and the CLI prints one line and exits 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from lmd.cli import CLUSTER_FLAGS, SCHEDULE_FLAGS, TRAIN_FLAGS, _cluster, _parser, _passed, main
from lmd.config import SECTIONS, ClusterConfig, ConfigError, TrainConfig
from lmd.config_build import build_config, config_diff
from lmd.options import cli_flags, option


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lmd: error: ")
    return err


FLAG_CASES = [
    (["--mask-end", "1.0"], "mask.end=1.0"),
    (["--mask-end", "-0.1"], "mask.end=-0.1"),
    (["--mask-start", "1.5"], "mask.start=1.5"),
    (["--mask-start", "0.6", "--mask-end", "0.5"], "mask.end=0.5: must be >= mask.start=0.6"),
    (["--mask-ramp", "0"], "mask.ramp=0.0"),
    (["--mask-ramp", "1.5"], "mask.ramp=1.5"),
    (["--scheduler", "linear"], "mask.scheduler='linear': unknown scheduler"),
    (["--preset", "huge"], "model.preset='huge': unknown preset"),
    (["--batch-size", "0"], "data.batch_size=0"),
    (["--batch-size", "-4"], "data.batch_size=-4"),
    (["--patch-size", "5"], "model.latent_size=16: must be divisible by model.patch_size=5"),
    (["--steps", "0"], "run.steps=0"),
    (["--steps", "ten"], "--steps: invalid int value: 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(("flags", "expected"), FLAG_CASES)
def test_bad_train_flag_names_field_and_value(capsys, tmp_path, flags, expected):
    err = _cli_error(capsys, ["train", "--run-dir", str(tmp_path / "run"), *flags])
    assert expected in err
    assert not (tmp_path / "run").exists()  # nothing is created for a rejected config


FILE_CASES = [
    ("model:\n  depth: 0\n", "model.depth=0: must be > 0"),
    ("model:\n  decoder_depth: -1\n", "model.decoder_depth=-1"),
    ("model:\n  embed_dim: 66\n  num_heads: 4\n", "model.embed_dim=66: must be divisible by model.num_heads=4"),
    ("model:\n  decoder_embed_dim: 36\n  decoder_num_heads: 5\n",
     "model.decoder_embed_dim=36: must be divisible by model.decoder_num_heads=5"),
    ("model:\n  latent_size: 18\n", "model.latent_size=18: must be divisible by model.patch_size=4"),
    ("model:\n  preset: nope\n", "model.preset='nope'"),
    ("mask:\n  scheduler: exp\n", "mask.scheduler='exp'"),
    ("mask:\n  start: 0.8\n  end: 0.7\n", "mask.end=0.7"),
    ("mask:\n  ramp: 2\n", "mask.ramp=2.0"),
    ("data:\n  batch_size: 0\n", "data.batch_size=0"),
    ("run:\n  steps: twelve\n", "run.steps='twelve': expected an integer"),
    ("optim:\n  lr: true\n", "optim.lr=True: expected a finite number"),
    ("optim:\n  momentum: 0.9\n", "optim.momentum=0.9: unknown field of optim"),
    ("trainer:\n  steps: 3\n", "unknown section 'trainer'"),
    ("model: [1, 2\n", "malformed"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
]


@pytest.mark.parametrize(("text", "expected"), FILE_CASES)
def test_bad_config_file_value_is_named(capsys, tmp_path, text, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    err = _cli_error(capsys, ["train", "--config", str(path), "--run-dir", str(tmp_path / "run")])
    assert expected in err


def test_unreadable_config_file_is_named(capsys, tmp_path):
    missing = tmp_path / "absent.yaml"
    assert f"config file {missing}: cannot read" in _cli_error(capsys, ["train", "--config", str(missing)])


def test_malformed_json_config_is_named(capsys, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"mask": {"end": 0.5,}}')
    assert f"config file {path}: malformed" in _cli_error(capsys, ["train", "--config", str(path)])


def test_layers_apply_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": {"preset": "small", "depth": 3}, "mask": {"end": 0.8},
                                "run": {"steps": 7}}))
    cfg = build_config(path, {"mask.end": 0.85})
    assert cfg.model.preset == "small" and cfg.model.depth == 3 and cfg.model.embed_dim == 192
    assert cfg.mask.end == 0.85 and cfg.run.steps == 7


def test_round_trip_through_dict_and_diff():
    cfg = build_config(overrides={"mask.scheduler": "piecewise", "run.seed": 3})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    other = build_config(overrides={"mask.scheduler": "uniform", "run.seed": 3})
    assert config_diff(cfg, other) == ["mask.scheduler"]


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError, match=r"mask\.end=0\.95"):
        build_config(overrides={"mask.end": 0.95, "mask.start": 0.96})


@pytest.mark.parametrize("argv", [["train", "--mask-end", "1.2"], ["schedule", "--total-steps", "0"],
                                  ["schedule", "--total-steps", "10", "--scheduler", "bogus"]])
def test_real_process_prints_one_line_and_no_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "lmd.cli", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lmd: error: ")


# A valid value, different from the tiny build's, for every field that has a flag. A new flag fails
# test_every_flagged_field_has_a_sample until it gets one here, so no flag goes untested.
SAMPLES = {
    "model.preset": "small", "model.latent_size": 32, "model.in_chans": 3, "model.patch_size": 8,
    "model.norm_target": True, "mask.scheduler": "uniform", "mask.start": 0.2, "mask.end": 0.9,
    "mask.ramp": 0.5, "mask.eval_ratio": 0.6, "optim.lr": 0.002, "optim.warmup_steps": 7,
    "data.dataset": "synthetic", "data.projector": "identity", "data.resolution": 64, "data.latents": "<tmp>",
    "data.loader": "memory", "data.stream_lanes": 4, "data.stream_window": 512,
    "data.batch_size": 32, "data.num_train": 512, "data.num_val": 32,
    "data.num_probe": 20, "run.steps": 7, "run.seed": 3, "run.log_every": 2, "run.eval_every": 3, "run.evals": 5,
    "run.ckpt_every": 4, "run.keep_last": 5, "run.device": "cpu", "run.precision": "fp32", "run.compile": True,
    "run.compile_mode": "reduce-overhead",
    "cluster.workers": 2, "cluster.gpus_per_worker": 0.5, "cluster.cpus_per_worker": 2.0,
    "cluster.storage": "s3://bucket/runs", "cluster.name": "exp", "cluster.max_failures": 0,
    "cluster.spread": True, "cluster.keep_best": True,
}


def _argv(flag: str, value: object) -> list[str]:
    return [flag] if value is True else [flag, str(value)]


def _train_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_flagged_field_has_a_sample():
    flagged = {f.dotted for f in [*TRAIN_FLAGS.values(), *CLUSTER_FLAGS.values()]}
    assert flagged == set(SAMPLES)
    for f in [*TRAIN_FLAGS.values(), *CLUSTER_FLAGS.values()]:
        assert type(SAMPLES[f.dotted]) is f.kind, f.dotted


@pytest.mark.parametrize("flag", list(TRAIN_FLAGS))
def test_train_flag_is_in_help_and_sets_its_field(capsys, tmp_path, flag):
    dotted = TRAIN_FLAGS[flag].dotted
    value = str(tmp_path) if SAMPLES[dotted] == "<tmp>" else SAMPLES[dotted]
    assert f"  {flag}" in _train_help(capsys) and TRAIN_FLAGS[flag].help
    args = _parser().parse_args(["train", *_argv(flag, value)])
    assert _passed(args, TRAIN_FLAGS) == {dotted: value}  # only the flag passed becomes an override
    section, _, name = dotted.partition(".")
    assert getattr(getattr(build_config(args.config, _passed(args, TRAIN_FLAGS)), section), name) == value
    assert getattr(getattr(build_config(), section), name) != value  # so a wrongly mapped flag would fail


@pytest.mark.parametrize("flag", list(CLUSTER_FLAGS))
def test_ray_train_flag_is_in_help_and_sets_its_cluster_field(capsys, flag):
    name = CLUSTER_FLAGS[flag].dotted.removeprefix("cluster.")
    value = SAMPLES[CLUSTER_FLAGS[flag].dotted]
    assert f"  {flag}" in _train_help(capsys) and CLUSTER_FLAGS[flag].help
    cluster = _cluster(_parser().parse_args(["train", "--workers", "3", *_argv(flag, value)]))
    assert getattr(cluster, name) == value and getattr(ClusterConfig(), name) != value


def test_without_workers_there_is_no_ray_train_and_no_override():
    args = _parser().parse_args(["train", "--gpus-per-worker", "1"])
    assert _cluster(args) is None and _passed(args, TRAIN_FLAGS) == {}


def test_schedule_takes_the_mask_schedule_flags_only(capsys):
    assert {f.dotted for f in SCHEDULE_FLAGS.values()} == {"mask.scheduler", "mask.start", "mask.end", "mask.ramp"}
    args = _parser().parse_args(["schedule", "--total-steps", "5", "--mask-end", "0.9"])
    assert _passed(args, SCHEDULE_FLAGS) == {"mask.end": 0.9}
    assert "--eval-ratio" in _cli_error(capsys, ["schedule", "--total-steps", "5", "--eval-ratio", "0.5"])


def test_no_flag_is_defined_twice():
    flags = [*TRAIN_FLAGS, *CLUSTER_FLAGS]
    assert len(flags) == len(set(flags))
    fields = [f.dotted for f in [*TRAIN_FLAGS.values(), *CLUSTER_FLAGS.values()]]
    assert len(fields) == len(set(fields))  # one-to-one: no field has two flags either
    assert set(TRAIN_FLAGS) == set(cli_flags(SECTIONS))  # the parser's flags are the config's, no others
    _parser()  # argparse itself refuses a flag added twice (hand-written --config/--address included)


def test_a_flag_declared_by_two_fields_is_refused():
    @dataclasses.dataclass(frozen=True)
    class A:
        x: int = option(1, "--x", "one")

    @dataclasses.dataclass(frozen=True)
    class B:
        y: int = option(2, "--x", "two")

    with pytest.raises(TypeError, match=r"--x is declared by both a\.x and b\.y"):
        cli_flags({"a": A, "b": B})


def test_config_imports_neither_the_model_nor_torch():
    code = "import lmd.config, sys; assert not {'torch', 'lmd.model'} & set(sys.modules), sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
