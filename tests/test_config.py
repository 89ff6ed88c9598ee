"""Config validation at the edge: every bad value is named, and the CLI prints one line and exits 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmd.cli import main
from lmd.config import ConfigError, TrainConfig, build_config, config_diff


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
