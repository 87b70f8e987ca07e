"""Every random stream training draws from, captured and put back exactly (validation, checkpoints)."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_snapshot(generators: list[torch.Generator]) -> dict:
    """Every RNG stream training draws from, in memory: Python, NumPy, torch CPU and CUDA, and `generators`."""
    cuda = dict(enumerate(torch.cuda.get_rng_state_all())) if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda, "generators": [(g, g.get_state()) for g in generators]}


def restore_rng(snapshot: dict) -> None:
    """Put back the streams of an rng_snapshot (CUDA devices it does not name keep theirs)."""
    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.set_rng_state(snapshot["torch"])
    for i, state in snapshot["cuda"].items():
        torch.cuda.set_rng_state(state, i)
    for g, state in snapshot["generators"]:
        g.set_state(state)
