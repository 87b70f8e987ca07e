"""Each process's own part of a checkpoint: its RNG streams (torch, CUDA, the training state's generator, Python,
NumPy) and per-subject stats, in rank-NNNNN.safetensors/.json. Every process stages its files beside the
checkpoint; the main process moves them in before marking it complete; on resume each reads its own."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dreambooth.config.schema import Config
from dreambooth.errors import UserError
from dreambooth.training import checkpoint_store as store
from dreambooth.training.rng import restore_rng, rng_snapshot
from dreambooth.training.state import TrainState

log = logging.getLogger(__name__)

RANK = "rank-{:05d}"  # + .safetensors (RNG tensors) and .json (Python/NumPy RNG, subject stats)


def process_rank(accelerator) -> tuple[int, int]:
    """(this process's index, number of processes) of the run's accelerator."""
    return accelerator.process_index, accelerator.num_processes


def check_processes(path: Path, saved: int | None, current: int, cfg: Config) -> None:
    """Refuse a checkpoint written by another number of processes (data shards and RNG streams would not match)."""
    if saved is None or saved == current:  # None: written before checkpoints recorded the count
        return
    if not cfg.resume_force:
        raise UserError(f"cannot resume from {path}: it was written by {_processes(saved)} and this run has "
                        f"{current}: launch with {saved} (accelerate launch --num_processes {saved}), or set "
                        "resume_force: true to resume anyway, with other data shards and random streams")
    log.warning("resuming from %s, written by %s, with %d (resume_force): data shards and random streams differ "
                "from an uninterrupted run", path, _processes(saved), current)


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


# ----------------------------------------------------------------------------------------------- RNG streams

def rng_state(generator: torch.Generator, tensors: dict) -> dict:
    """This process's RNG states: tensors into `tensors`, Python's and NumPy's as JSON-able lists."""
    snap = rng_snapshot([generator])
    tensors["rng.torch"], tensors["rng.gen"] = snap["torch"], snap["generators"][0][1]
    tensors.update({f"rng.cuda.{i}": state for i, state in snap["cuda"].items()})
    version, mt, gauss = snap["python"]
    name, keys, pos, has_gauss, cached = snap["numpy"]
    return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                             float(cached)]}


def set_rng(rng: dict, tensors: dict, generator: torch.Generator) -> None:
    """The inverse of rng_state."""
    version, mt, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else ()
    restore_rng({"python": (version, tuple(mt), gauss),
                 "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
                 "torch": tensors["rng.torch"], "generators": [(generator, tensors["rng.gen"])],
                 "cuda": {i: tensors[f"rng.cuda.{i}"] for i in devices if f"rng.cuda.{i}" in tensors}})


# ----------------------------------------------------------------------------------------------- files

def staging(final: Path) -> Path:
    """Where every process leaves its state for the main process to move into checkpoint `final`."""
    return final.with_name(f".{final.name}.ranks")  # a ".step-" folder: prune clears one that a crash left


def stage(train: TrainState, final: Path, index: int) -> bool:
    """Write this process's RNG streams and subject stats beside checkpoint `final`; False if the disk is full."""
    tensors: dict[str, torch.Tensor] = {}
    state = {"rank": index, "rng": rng_state(train.generator, tensors), "subjects": train.subjects.state_dict()}
    folder = staging(final)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / f"{RANK.format(index)}.safetensors")
        (folder / f"{RANK.format(index)}.json").write_text(json.dumps(state))
    except OSError as e:
        if not store.is_disk_full(e):
            raise
        return False
    return True


def gather(final: Path, tmp: Path, count: int) -> None:
    """Move the state of processes 0..count-1 into the folder being written; every one must be there."""
    folder = staging(final)
    names = [RANK.format(i) + ext for i in range(count) for ext in (".safetensors", ".json")]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"checkpoint {final} lacks the state of some processes (no {folder / missing[0]}): "
                        "output_dir must be on a filesystem that every process shares")
    for n in names:
        os.replace(folder / n, tmp / n)


def restore(train: TrainState, path: Path, index: int, state: dict, tensors: dict) -> None:
    """This process's RNG streams and subject stats from its own file (older checkpoints: state.json's streams)."""
    own = path / f"{RANK.format(index)}.json"
    if own.is_file():
        rank = json.loads(own.read_text())
        set_rng(rank["rng"], load_file(path / f"{RANK.format(index)}.safetensors"), train.generator)
        train.subjects.load_state_dict(rank["subjects"])
    elif "rng" in state:
        set_rng(state["rng"], tensors, train.generator)
    else:  # more processes than wrote the checkpoint (resume_force)
        log.warning("checkpoint %s holds no state for process %d: its random streams start afresh", path, index)
