"""One Tune trial = one engine run in the trial's process (a function trainable, no TorchTrainer).

Why not a TorchTrainer per trial: on a small machine it costs ~20 s of start-up per trial, while a
function trial starts in well under a second; the loop is the same `Engine.fit` either way.
Each trial loads its (small, pre-built) latent store into memory once: Ray Data read tasks would
otherwise compete with trials that hold every CPU. Checkpoints are the engine's verified format,
handed to `tune.report`; a restored trial continues from its latest one at the exact step.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmd.checkpoint import adopt_checkpoint
from lmd.config import TrainConfig
from lmd.engine import CHECKPOINT_DIR, Engine


def run_trial(config: dict[str, Any]) -> None:
    from ray import tune

    config = config.get("trial", config)  # grid-searched trials arrive under "trial"
    cfg = TrainConfig.from_dict(config["cfg"])
    cfg = replace(cfg, data=replace(cfg.data, loader="memory"), run=replace(cfg.run, keep_last=1))
    tags = {key: config[key] for key in ("variant", "seed") if key in config}
    scratch = Path(tempfile.mkdtemp(prefix="lmd-trial-"))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            adopt_checkpoint(Path(restored), scratch / CHECKPOINT_DIR)

    def report(row: dict[str, Any], ckpt: Path | None) -> None:
        saved = tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        tune.report({**row, **tags}, checkpoint=saved)

    engine = Engine(cfg, scratch, reporter=report)
    try:
        engine.fit(resume=checkpoint is not None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
