"""The output folder: refuse foreign or unwritable places before anything is written, mark it as ours, and swap
a saved pipeline in only once it is complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .errors import UserError

MARKER = "dreambooth_run.json"  # marks a folder as ours, so a rerun may overwrite it


def check_output_dir(path: str) -> Path:
    """Refuse a non-empty foreign folder or an unwritable place, before anything is written."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a folder path for output_dir")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"output_dir {out} is not empty and was not written by dreambooth: "
                        "choose a new output_dir or empty that folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output_dir {out} is inside {parent}, which is a file: choose a folder path for output_dir")
    try:  # os.access says yes to root on read-only places (/proc, read-only mounts): try a real, unnamed file
        writable = os.access(parent, os.W_OK)
        if writable:
            tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        writable = False
    if not writable:
        raise UserError(f"output_dir {out} cannot be written ({parent} is read-only): choose a writable output_dir")
    return out


def mark_output_dir(out: Path) -> None:
    """Create the folder and the marker that lets later runs (and resumes) write into it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"tool": "dreambooth", "version": __version__}))


def write_pipeline(pipe, out: Path) -> None:
    """save_pretrained into out/.saving (safetensors), then move each part over the old one."""
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
