"""How checkpoints lie on disk: state packed into safetensors plus JSON (no pickle), step folders written
atomically and marked complete, pruning, and the free-space policy. checkpoint.py decides what goes in them."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreambooth import checksums
from dreambooth.errors import UserError
from dreambooth.files import atomic_folder, read_json

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"  # written last, inside the temp folder, so a folder that has it is whole
FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------- packing

def pack(obj: Any, key: str, tensors: dict, seen: dict) -> Any:
    """A JSON-able copy of `obj` with each tensor moved into `tensors` and replaced by {"__tensor__": name}."""
    if torch.is_tensor(obj):
        t = obj.detach()
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
        if t.numel() and ident in seen:  # the same tensor twice (bitsandbytes shares its qmaps): store once
            return {"__tensor__": seen[ident]}
        storage = ("storage", t.untyped_storage().data_ptr(), str(t.device))
        # safetensors refuses overlapping tensors: a view of memory already stored gets its own copy.
        tensors[key] = t.clone() if (t.numel() and storage in seen) or not t.is_contiguous() else t
        if t.numel():
            seen[ident], seen[storage] = key, key
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, f"{key}.{k}", tensors, seen) for k, v in obj.items()}
        # Optimizer state is keyed by parameter index (int): JSON objects would turn those into strings.
        return {"__items__": [[k, pack(v, f"{key}.{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a checkpoint (only tensors and plain data)")


def unpack(obj: Any, tensors: dict) -> Any:
    """The inverse of pack: `obj` with its tensor references, int-keyed dicts and tuples restored."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- folders

def root_of(out: str | Path) -> Path:
    return Path(out) / CHECKPOINTS


def marker(path: Path) -> dict | None:
    """The completion marker of a checkpoint folder, None if it has none (or an unreadable one)."""
    data = read_json(path / COMPLETE)
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def is_complete(path: Path) -> bool:
    return marker(path) is not None


def damage(path: Path, full: bool = True) -> str | None:
    """Why a complete checkpoint is damaged ('FILE is N bytes, M when written', 'FILE fails its checksum'), None if
    intact or written before checkpoints recorded their files. `full=False` compares sizes only (no reading)."""
    files = (marker(path) or {}).get("files")
    if not files:
        return None
    return checksums.check_files(path, files) if full else checksums.check_sizes(path, files)


def is_verifiable(path: Path) -> bool:
    """Whether the checkpoint records its files' sizes and checksums (those written before this do not)."""
    return bool((marker(path) or {}).get("files"))


def list_checkpoints(out: str | Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(complete checkpoints as (step, path) oldest first, incomplete folders) under output_dir/checkpoints."""
    root = root_of(out)
    complete, incomplete = [], []
    if not root.is_dir():
        return complete, incomplete
    for path in root.iterdir():
        m = STEP_DIR.match(path.name)
        if m and path.is_dir() and is_complete(path):
            complete.append((int(m.group(1)), path))
        elif path.is_dir() and (m or path.name.startswith(".step-")):
            incomplete.append(path)  # a write cut short by a hard kill or a second Ctrl-C
    return sorted(complete), sorted(incomplete)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a warning."""
    complete = complete_checkpoints(out)
    return complete[-1][1] if complete else None


def newest_intact(out: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their recorded sizes and checksums; each newer one that
    does not is skipped with a warning naming its first bad file (so resume never loads a damaged one)."""
    for _, path in reversed(complete_checkpoints(out)):
        problem = damage(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def complete_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints, oldest first, with a warning for each incomplete one."""
    complete, incomplete = list_checkpoints(out)
    for path in incomplete:
        log.warning("ignoring incomplete checkpoint %s (its write was interrupted)", path)
    return complete


def write_atomic(final: Path, write_files, marker: dict) -> Path:
    """Write a checkpoint folder via `write_files(tmp)` with the completion marker added last, atomically
    (files.atomic_folder: a failure or Ctrl-C leaves `final` untouched and no temp folder). The marker records
    every file's size and checksums, hashed from the page cache right after writing (checksums.py)."""
    def write(tmp: Path) -> None:
        write_files(tmp)
        files = checksums.record_files(tmp)
        (tmp / COMPLETE).write_text(json.dumps({**marker, "checksum": checksums.ALGORITHM, "files": files},
                                               indent=2))
    return atomic_folder(final, write)


def prune(out: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never ones marked keep) and stale temp folders,
    and never the newest intact one: when none of those kept is intact, the newest older intact one stays too.

    Intact here means every recorded file has its recorded size: pruning runs after every checkpoint, so it
    cannot re-read gigabytes; the checkpoint just written was hashed from the bytes written, and resume reads
    every checksum before loading."""
    complete, incomplete = list_checkpoints(out)
    removed = []
    for path in incomplete:
        if path.name.startswith(".step-"):
            shutil.rmtree(path, ignore_errors=True)
    if keep_last is None:
        return removed
    doomed = complete[:-keep_last] if len(complete) > keep_last else []
    if doomed and all(damage(path, full=False) for _, path in complete[-keep_last:]):
        spare = next((c for c in reversed(doomed) if damage(c[1], full=False) is None), None)
        if spare is not None:
            log.warning("keeping checkpoint %s beyond keep_last: %d: the newer ones are damaged", spare[1],
                        keep_last)
            doomed.remove(spare)
    for _, path in doomed:
        if not (marker(path) or {}).get("keep"):
            # Hide it first (one rename), so a delete cut short never leaves a half checkpoint that looks whole.
            hidden = path.with_name(f".{path.name}.del-{os.getpid()}")
            os.rename(path, hidden)
            shutil.rmtree(hidden, ignore_errors=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------- disk space

def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_disk_full(error: OSError) -> bool:
    """Whether a failed write ran out of space (or quota): the case on_disk_full decides."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def no_space(on_disk_full: str, last: Path | None, root: Path, detail: str) -> None:
    """Disk full: raise a clear error (on_disk_full: stop) or warn and go on unsaved (continue); `last` is the newest
    complete checkpoint, if any."""
    kept = f"the last complete checkpoint {last} is intact" if last else "no earlier checkpoint exists"
    if on_disk_full == "continue":
        log.warning("not writing checkpoint in %s: %s; training continues unsaved (on_disk_full: continue); %s",
                    root, detail, kept)
        return
    raise UserError(f"not enough disk space for a checkpoint in {root}: {detail}; {kept}. Free some space and "
                    "resume with resume=latest, or set on_disk_full: continue to train on without checkpoints")
