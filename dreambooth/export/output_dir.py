"""The output folder: refuse foreign or unwritable places before anything is written, mark it as ours, and swap
a saved pipeline in only once it is complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dreambooth import __version__
from dreambooth.errors import UserError
from dreambooth.files import can_write, fsync, fsync_tree, nearest_existing, replace_folder, write_json_atomic
from dreambooth.locks import LOCK, FolderLock, launch_rank, lock_folder

MARKER = "dreambooth_run.json"  # marks a folder as ours, so a rerun may overwrite it


def check_output_dir(path: str) -> Path:
    """Refuse a non-empty foreign folder or an unwritable place, before anything is written."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a folder path for output_dir")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"output_dir {out} is not empty and was not written by dreambooth: "
                        "choose a new output_dir or empty that folder")
    parent = nearest_existing(out)
    if not parent.is_dir():
        raise UserError(f"output_dir {out} is inside {parent}, which is a file: choose a folder path for output_dir")
    if not can_write(parent):
        raise UserError(f"output_dir {out} cannot be written ({parent} is read-only): choose a writable output_dir")
    return out


def lock_output_dir(out: Path) -> FolderLock | None:
    """Hold output_dir for this run's life (locks.py), so a second run into it is refused. Only the launch's first
    process takes it: the others under accelerate launch belong to the same run (and stop with it)."""
    if launch_rank() != 0:
        return None
    return lock_folder(out, "output_dir", "wait for that run to end, or choose another output_dir")


def mark_output_dir(out: Path) -> None:
    """Create the folder and the marker that lets later runs (and resumes) write into it."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, {"tool": "dreambooth", "version": __version__}, indent=None)


def write_pipeline(pipe, out: Path) -> None:
    """save_pretrained into out/.saving (safetensors), then move each part over the old one, each part whole
    (files.replace_folder; the folder holds our other outputs too, so it cannot be swapped in one rename).

    model_index.json, which makes the folder loadable, goes first and comes back last: a crash mid-swap leaves
    a folder that refuses to load rather than one that loads a mix of two models."""
    tmp = out / ".saving"
    for stale in [tmp, *out.glob(".*.old-*")]:  # left by a save that was killed part-way
        shutil.rmtree(stale, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    prefix_text_encoder_keys(tmp / "text_encoder")
    fsync_tree(tmp)  # on disk before any part replaces the old one
    (out / "model_index.json").unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = out / item.name
        if item.is_dir():
            replace_folder(item, target)
        else:
            os.replace(item, target)
    fsync(out)
    tmp.rmdir()


def prefix_text_encoder_keys(folder: Path) -> None:
    """Write CLIPTextModel weights under `text_model.`, as the published SD 2.x files have them.

    transformers 5 saves them without the prefix; transformers 4 would then silently start from random weights
    (it loads both forms; 5 loads both too)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("architectures") != ["CLIPTextModel"]:
        return
    index = folder / "model.safetensors.index.json"
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
        tensors = load_file(str(path))
        if all(k.startswith("text_model.") for k in tensors):
            continue
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()},
                  str(path), metadata=metadata)
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k if k.startswith("text_model.") else f"text_model.{k}": v
                              for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
