"""The process's random state (torch, CUDA, NumPy, Python), saved in a checkpoint for a bit-exact resume.

The engine draws its mask noise from its own seeded generator (`lmd.engine.step_seed`); this is the rest:
dropout or any library that draws from the global generators keeps drawing the same numbers after a resume.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """The global generators' state as tensors and plain values (what torch.load(weights_only=True) reads)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators from `capture_rng`'s state, wherever its tensors were loaded (torch only takes
    CPU byte tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU that was visible at the save; a resume may see fewer (or more) of them.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
