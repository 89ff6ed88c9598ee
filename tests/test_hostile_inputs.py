"""Hostile and careless inputs end in one `<prog>: error:` line naming the culprit, a non-zero exit, nothing written.

Each row of CASES is a real command run as a user would run it (a fresh interpreter): the files it
needs are made first in a scratch folder, the command runs there, and the test checks the exit
code, that stderr is exactly one line holding the expected fragment (no traceback), and that no
file in the scratch folder appeared, vanished or changed. Every row fails before any training or
Ray start, so the table stays fast. Locks and the cluster script are tested beside it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from lmd.locks import LockedError, hold
from tests.test_dashboard import synthetic_table, write_experiment

REPO = Path(__file__).resolve().parent.parent
PWNED = "pwned-by-pickle"  # what the malicious pickle below would create if it were ever unpickled
SECRET = "s3cr3tKeyMaterial"  # a credential some rows pass in a URI: no output may show it


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _own_meta(**changes: str) -> dict[str, str]:
    meta = {"format": "lmd-projector/1", "name": "x", "latent_channels": "4", "width": "8", "decoder_width": "8",
            "scale": "1.0", "shift": "0.0", "card": "{}"}
    return {**meta, **changes}


def _taesd_dir(root: Path, encoder: Callable[[Path], None]) -> None:
    (root / "taesd").mkdir()
    encoder(root / "taesd" / "taesd_encoder.pth")
    torch.save({"1.weight": torch.zeros(8, 4, 3, 3)}, root / "taesd" / "taesd_decoder.pth")


def _experiment(root: Path, change: Callable[[Path], None]) -> None:
    exp = write_experiment(root / "exp")
    change(exp)


def _retyped_results(exp: Path) -> None:
    table = synthetic_table()
    table["val_psnr"] = table["val_psnr"].astype(str)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(arrow.replace_schema_metadata({b"lmd_results_schema": b"3"}), exp / "results.parquet")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "lmd ..." runs `python -m lmd.cli ...`; "tune/x.py ...", "analysis/..." the script
    fragment: str  # must appear in the one stderr line
    code: int
    setup: Callable[[Path], None] | None = None


CASES = [
    # ---- config files and flags
    Case("config-not-utf8", ("lmd", "train", "--config", "c.yaml"), "c.yaml: not UTF-8 text", 2,
         lambda d: (d / "c.yaml").write_bytes(b"run: {steps: 5}\n\xff\xfe\n")),
    Case("config-recursive-alias", ("lmd", "train", "--config", "c.yaml"), "recursive YAML alias", 2,
         lambda d: (d / "c.yaml").write_text("model: &m {depth: *m}\n")),
    Case("config-alias-bomb", ("lmd", "train", "--config", "c.yaml"), "expand to more than 100,000 values", 2,
         lambda d: (d / "c.yaml").write_text("".join(
             f"{n}: &{n} [{', '.join([f'*{p}' if p else '1'] * 9)}]\n"
             for p, n in zip(["", *"abcdefgh"], "abcdefghi", strict=False)) + "model: {depth: *i}\n")),
    Case("config-list-preset", ("lmd", "train", "--config", "c.yaml"), "model.preset=['tiny', 'small']", 2,
         lambda d: (d / "c.yaml").write_text("model: {preset: [tiny, small]}\n")),
    Case("config-list-dataset", ("lmd", "train", "--config", "c.yaml"), "data.dataset=['a']", 2,
         lambda d: (d / "c.yaml").write_text("data: {dataset: [a]}\n")),
    Case("seed-above-int64", ("lmd", "train", "--dataset", "synthetic", "--seed", str(2**63)),
         f"run.seed={2**63}", 2),
    Case("seed-negative", ("lmd", "train", "--dataset", "synthetic", "--seed", "-1"), "run.seed=-1", 2),
    Case("schedule-negative-points", ("lmd", "schedule", "--total-steps", "10", "--points", "-5"),
         "--points=-5", 2),
    Case("num-train-beyond-the-source", ("lmd", "train", "--dataset", "fashion-mnist", "--num-train",
                                         "1000000000000"), "data.num_train=1000000000000", 2),
    Case("bundled-crops-beyond-reason", ("lmd", "precompute", "--dataset", "bundled", "--limit", "1000000000000",
                                         "--out", "store"), "1000000000000 crops asked", 1),
    Case("train-workers-name-escapes", ("lmd", "train", "--workers", "2", "--dataset", "synthetic", "--name",
                                        "../../x"), "--name='../../x'", 2),
    # ---- projector files that are not state dicts (the rest of them in-process, below)
    Case("projector-malicious-pickle", ("lmd", "precompute", "--projector", "taesd:taesd", "--out", "store"),
         "refused by torch.load(weights_only=True)", 1,
         lambda d: _taesd_dir(d, lambda p: p.write_bytes(pickle.dumps({"0.weight": _Evil()})))),
    # ---- dashboard inputs
    Case("dashboard-torn-pictures", ("analysis/dashboard.py", "exp", "--out", "out/d.html"),
         "pictures.parquet: not a readable Parquet file", 2,
         lambda d: _experiment(d, lambda e: (e / "pictures.parquet").write_bytes(os.urandom(999)))),
    Case("dashboard-foreign-journal", ("analysis/dashboard.py", "exp", "--out", "out/d.html"),
         "optuna.journal: not a readable Optuna journal", 2,
         lambda d: _experiment(d, lambda e: (e / "optuna.journal").write_text('{"op_code": 99}\nnot json\n'))),
    Case("dashboard-args-not-an-object", ("analysis/dashboard.py", "exp", "--out", "out/d.html"),
         "args.json: the experiment's flags is not a JSON object", 2,
         lambda d: _experiment(d, lambda e: (e / "args.json").write_text("[1, 2]"))),
    Case("dashboard-column-type", ("analysis/dashboard.py", "exp", "--out", "out/d.html"),
         "column 'val_psnr'", 2, lambda d: _experiment(d, _retyped_results)),
    Case("dashboard-bad-reference", ("analysis/dashboard.py", "exp", "--out", "out/d.html"),
         "references[0] is not a reference record", 2,
         lambda d: _experiment(d, lambda e: (e / "references.json").write_text('{"references": [{"x": 1}]}'))),
    # ---- experiment scripts (all refused before Ray starts)
    Case("search-missing-projector", ("tune/search.py", "--projector", "/nonexistent"), "projector '/nonexistent'", 2),
    Case("ablation-name-escapes", ("tune/ablation.py", "--name", "../../x"), "--name='../../x'", 2),
    Case("ablation-s3-storage", ("tune/ablation.py", "--storage", "s3://bucket/x"), "--storage=s3://bucket/x", 2),
    Case("ablation-gpus-without-gpus", ("tune/ablation.py", "--gpus-per-trial", "1"), "--gpus-per-trial=1", 2),
    Case("train-gpus-without-gpus", ("lmd", "train", "--workers", "2", "--gpus-per-worker", "1", "--dataset",
                                     "synthetic"), "--workers=2 x --gpus-per-worker=1: this machine has 0 GPUs", 2),
    Case("cluster-port-not-a-number", ("cluster/local_cluster.sh", "stop", "6390;x"), "PORT=6390;x", 2),
    # ---- outputs never replace inputs
    Case("dashboard-out-over-its-results", ("analysis/dashboard.py", "exp", "--out", "exp/results.parquet"),
         "inside the experiment's own files", 2, lambda d: write_experiment(d / "exp")),
    Case("dashboard-out-over-another-file", ("analysis/dashboard.py", "exp", "--out", "notes.txt"),
         "exists and is not an HTML page", 2,
         lambda d: (write_experiment(d / "exp"), (d / "notes.txt").write_text("mine\n"))),
    # ---- secrets: a credential in a URI is refused, and never shown back (SECRET below must appear nowhere)
    Case("ablation-storage-credentials", ("tune/ablation.py", "--storage", f"s3://KEY:{SECRET}@bucket/x"),
         "--storage=s3://bucket/x", 2),
    Case("train-storage-credentials", ("lmd", "train", "--dataset", "synthetic", "--workers", "2", "--storage",
                                       f"s3://KEY:{SECRET}@bucket/x"), "--storage=s3://bucket/x", 2),
    Case("train-latents-credentials", ("lmd", "train", "--latents", f"s3://KEY:{SECRET}@bucket/x"),
         "data.latents='s3://bucket/x'", 2),
    Case("search-storage-credentials", ("tune/search.py", "--storage", f"s3://KEY:{SECRET}@bucket/x"),
         "--storage s3://bucket/x", 2),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root`, with a checksum for files."""
    snap = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snap


def _command(argv: tuple[str, ...]) -> list[str]:
    if argv[0] == "lmd":
        return [sys.executable, "-m", "lmd.cli", *argv[1:]]
    if argv[0].endswith(".sh"):
        return ["bash", str(REPO / argv[0]), *argv[1:]]
    return [sys.executable, str(REPO / argv[0]), *argv[1:]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input_ends_in_one_line_and_changes_nothing(case: Case, tmp_path):
    if case.id == "ablation-gpus-without-gpus" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case.setup is not None:
        case.setup(tmp_path)
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    proc = subprocess.run(_command(case.argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == case.code, proc.stderr[-2000:]
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-2000:]
    assert case.fragment in lines[0]
    assert SECRET not in proc.stderr + proc.stdout
    assert _snapshot(tmp_path) == before  # nothing created, removed or modified (no run dir, store, experiment)
    assert not (tmp_path / PWNED).exists()


# Projector files read in-process (the command line turns the same ProjectorError into its one line, as the
# malicious-pickle row shows): spec, the file(s) to make, the message fragment.
PROJECTOR_FILES = {
    "wrong-tensors": ("p.safetensors", lambda d: save_file({"x": torch.zeros(3)}, str(d / "p.safetensors"),
                                                           metadata=_own_meta()), "not a TAESD-layout state dict"),
    "absurd-width": ("p.safetensors", lambda d: save_file({"x": torch.zeros(3)}, str(d / "p.safetensors"),
                                                          metadata=_own_meta(width="100000000")), "width=100000000"),
    "nan-scale": ("p.safetensors", lambda d: save_file({"x": torch.zeros(3)}, str(d / "p.safetensors"),
                                                       metadata=_own_meta(scale="nan")), "must be finite"),
    "card-not-json": ("p.safetensors", lambda d: save_file({"x": torch.zeros(3)}, str(d / "p.safetensors"),
                                                           metadata=_own_meta(card="{x")), "card is not valid JSON"),
    "random-bytes": ("p.safetensors", lambda d: (d / "p.safetensors").write_bytes(random.Random(2).randbytes(4096)),
                     "not a readable .safetensors file"),
    "empty-safetensors": ("p.safetensors", lambda d: (d / "p.safetensors").write_bytes(b""),
                          "not a readable .safetensors file"),
    "empty-pth": ("taesd:taesd", lambda d: _taesd_dir(d, lambda p: p.write_bytes(b"")),
                  "taesd_encoder.pth: cannot be read as a state dict"),
    # Random bytes fail in the unpickler in many ways (bad opcode, bad UTF-8, truncated...): each is one line naming
    # the file. Seeded, so the case is the same in every run.
    "random-pth": ("taesd:taesd", lambda d: _taesd_dir(d, lambda p: p.write_bytes(random.Random(1).randbytes(4096))),
                   "taesd/taesd_encoder.pth: "),
    "pth-tensor": ("taesd:taesd", lambda d: _taesd_dir(d, lambda p: torch.save(torch.zeros(3), p)),
                   "not a state dict (a mapping of names to tensors), but a Tensor"),
    "pth-list": ("taesd:taesd", lambda d: _taesd_dir(d, lambda p: torch.save([torch.zeros(3)], p)),
                 "not a state dict (a mapping of names to tensors), but a list"),
    "pth-global": ("taesd:taesd", lambda d: _taesd_dir(d, lambda p: torch.save({"0.weight": _Evil()}, p)),
                   "unsupported GLOBAL"),
}


@pytest.mark.parametrize("name", PROJECTOR_FILES)
def test_a_projector_file_that_is_not_a_state_dict_is_refused_by_name(name, tmp_path, monkeypatch):
    from lmd.projector import ProjectorError, load_projector

    spec, make, fragment = PROJECTOR_FILES[name]
    make(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProjectorError, match=None) as err:
        load_projector(spec)
    assert fragment in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / PWNED).exists()


def _lock_holder(lock: Path) -> subprocess.Popen:
    """Another process that holds `lock` (until killed), started and holding when this returns."""
    script = (f"from lmd.locks import hold; import time; h = hold({str(lock)!r}, 'x'); print('held', "
              "flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "run" / ".lock"
    holder = _lock_holder(lock)
    try:
        with pytest.raises(LockedError, match=f"run directory {tmp_path / 'run'} is in use by process {holder.pid}"):
            hold(lock, f"run directory {tmp_path / 'run'}")
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock
        holder.wait()
    with hold(lock, "run directory") as mine:  # the dead holder's lock is free at once
        assert mine.held and hold(lock, "again") is mine  # re-entrant within one process
    assert not mine.held


def test_a_second_builder_of_one_store_is_refused_before_it_encodes(tmp_path):
    from lmd.data.latents import build_store
    from lmd.data.store import StoreError
    from lmd.projector import load_projector

    store = tmp_path / "store"
    holder = _lock_holder(store / ".lock")
    try:
        with pytest.raises(StoreError, match=f"latent store {store} is in use by process {holder.pid}"):
            build_store(store, "bundled", load_projector("identity"), 32, 8, 4, progress=False)
        assert sorted(p.name for p in store.iterdir()) == [".lock"]  # nothing encoded, nothing written
        proc = subprocess.run([sys.executable, "-m", "lmd.cli", "precompute", "--projector", "identity", "--resolution",
                               "32", "--limit", "8", "--num-val", "4", "--out", str(store)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert proc.returncode == 1 and f"is in use by process {holder.pid}" in proc.stderr.strip().splitlines()[-1]
        assert sorted(p.name for p in store.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_builder_that_takes_the_store_after_the_early_check_keeps_its_in_flight_files(tmp_path, monkeypatch,
                                                                                          capsys):
    """The race between the early check and the lock: the lock is taken before planning, which would delete a
    running builder's temporary files as a killed run's leftovers."""
    import lmd.cli
    import lmd.locks
    from lmd.io import TMP_PREFIX

    store = tmp_path / "store"
    holder = _lock_holder(store / ".lock")  # won the store after this command's early check (made a no-op here)
    in_flight = store / "train" / f"{TMP_PREFIX}shard-00000.parquet.inflight"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"being written")
    monkeypatch.setattr(lmd.locks, "check_free", lambda *_: None)
    try:
        with pytest.raises(SystemExit) as exit_info:
            lmd.cli.main(["precompute", "--projector", "identity", "--resolution", "32", "--limit", "8", "--num-val",
                          "4", "--out", str(store)])
        assert exit_info.value.code == 1 and f"is in use by process {holder.pid}" in capsys.readouterr().err
        assert in_flight.read_bytes() == b"being written"
        assert sorted(p.name for p in (store / "train").iterdir()) == [in_flight.name]  # no plan written either
    finally:
        holder.kill()
        holder.wait()


def test_a_bad_dataset_leaves_no_store_folder_behind(tmp_path, capsys):
    from lmd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["precompute", "--dataset", str(tmp_path / "no-such-images"), "--projector", "identity", "--resolution",
              "32", "--out", str(tmp_path / "store")])
    assert exit_info.value.code == 1 and str(tmp_path / "no-such-images") in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_two_lmd_train_into_one_run_directory_the_second_is_refused(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    train = [sys.executable, "-m", "lmd.cli", "train", "--dataset", "synthetic", "--steps", "100000", "--run-dir",
             str(run), "--ckpt-every", "100000", "--eval-every", "100000"]
    first = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (run / "config.json").exists() and time.time() < deadline:  # written after the lock is taken
            time.sleep(0.2)
        second = subprocess.run([*train, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"lmd: error: run directory {run} is in use by process {first.pid} (lock {run / '.lock'}); "
        "wait for it to end, or stop it"]


def test_a_second_driver_of_one_experiment_is_refused_before_ray_starts(tmp_path):
    lock = tmp_path / "st" / ".abl.lock"  # where tune/ablation.py --storage st --name abl keeps its lock
    script = f"from lmd.locks import hold; import time; h = hold({str(lock)!r}, 'x'); print('held', flush=True); " \
             "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, str(REPO / "tune/ablation.py"), "--storage", "st", "--name", "abl",
                               "--variants", "lmd_cosine", "--seeds", "1", "--num-train", "256", "--num-val", "32",
                               "--num-probe", "64"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"ablation: error: experiment {tmp_path / 'st' / 'abl'} is in use by process {holder.pid} (lock {lock}); "
        "wait for it to end, or stop it"]


def test_cluster_stop_matches_its_exact_port_only():
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--address=127.0.0.1:63901"])
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--address=127.0.0.1:6390"])
    try:
        time.sleep(0.5)
        subprocess.run(["bash", str(REPO / "cluster/local_cluster.sh"), "stop", "6390"], check=True, timeout=30)
        assert target.wait(timeout=10) != 0  # killed
        assert decoy.poll() is None  # 63901 is another cluster's port: untouched
    finally:
        for proc in (decoy, target):
            proc.kill()
            proc.wait()


def test_the_malicious_pickle_would_run_code_if_it_were_unpickled(tmp_path):
    """The malicious-pickle row is meaningful: plain pickle.load of that file runs its payload."""
    payload = pickle.dumps({"0.weight": _Evil()})
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        pickle.loads(payload)  # noqa: S301 - on purpose, to show what weights_only=True prevents
    finally:
        os.chdir(cwd)
    assert (tmp_path / PWNED).exists()
