"""Writing files so that nothing is ever half-written: each writer fills a temp file (or folder) beside the
target, fsyncs it and renames it into place; a failure (disk full, Ctrl-C) leaves the old file and no temp.
Also the PNG writer and file-name helper that training, sampling and generation share."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dreambooth import checksums

TEMP = ".tmp"  # temp files are named .<stem>.<random>.tmp<suffix>: hidden, and they keep the suffix


def fsync(path: Path) -> None:
    """Flush a file or folder to disk (a folder: its entries, so a rename in it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nearest_existing(path: Path) -> Path:
    """PATH itself if it exists, else its nearest ancestor that does: where creating PATH would start."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def can_write(folder: Path) -> bool:
    """Whether this process can create files in the existing FOLDER."""
    try:  # os.access says yes to root on read-only places (/proc, read-only mounts): try a real, unnamed file
        if not os.access(folder, os.W_OK):
            return False
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under FOLDER, deepest first, before it is renamed into place."""
    for f in sorted(folder.rglob("*"), reverse=True):
        fsync(f)


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path` with the same suffix (some writers pick the format by suffix)."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}{TEMP}{path.suffix}")


def temp_glob(name: str) -> str:
    """The glob that matches temp_path's names for files called `name` (which may hold wildcards)."""
    stem, dot, suffix = name.rpartition(".") if "." in name else (name, "", "")
    return f".{stem}.*{TEMP}{dot}{suffix}"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it is fsynced and renamed over `path`, on any
    failure (KeyboardInterrupt included) it is removed and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def read_json(path: str | Path, default=None):
    """A JSON file's content, or `default` when it is missing or not valid JSON (a run folder's records)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) in one piece."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data, indent: int | None = 2) -> Path:
    """Write `data` as a JSON file in one piece."""
    return write_text_atomic(path, json.dumps(data, indent=indent))


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None,
                            half: bool = False) -> Path:
    """Write tensors (in fp16 if `half`, floats only) as one .safetensors file with `metadata` in its header, and
    the CRCs of its data (checksums.HEADER_KEY), which checksums.safetensors_problem checks when it is read back."""
    from safetensors.torch import save_file  # heavy (torch): most users of this module never need it

    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    metadata = {**(metadata or {}), checksums.HEADER_KEY: checksums.placeholder(tensors)}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        checksums.seal(tmp)  # the bytes were just written: read back from the page cache
    return Path(path)


def replace_folder(src: Path, final: Path) -> None:
    """Move the complete folder `src` to `final`, replacing a folder already there (rename cannot, so the old
    one is renamed aside first and deleted once the new one is in place)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(src, final)
    fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_folder(final: str | Path, write_files: Callable[[Path], object]) -> Path:
    """Write a folder via `write_files(tmp)` into a temp folder beside `final` (named .<name>.tmp-*), fsync it,
    then move it into place; on any failure (or Ctrl-C) the temp folder goes and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP}-", dir=final.parent))
    try:
        write_files(tmp)
        fsync_tree(tmp)  # files first, then the folders that name them
        fsync(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------------------ images and names

def png_settings(settings: dict):
    """PNG text chunks that carry the settings that made an image, as JSON under `parameters`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    return info


def save_png(image, path: str | Path, settings: dict) -> Path:
    """Save a PNG, in one piece, with the settings that made it in its `parameters` text chunk."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_settings(settings))
    return Path(path)


def slug(text: str, length: int = 48) -> str:
    """A prompt as a short file-name part: lower-case letters and digits joined by dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "image"
