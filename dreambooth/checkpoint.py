"""Resumable checkpoints: atomic writes into output_dir/checkpoints/step-NNNNNN, pruning, and an exact restore of
weights, optimizer (8-bit too), LR schedule, grad scaler, RNG streams and data position. No pickle anywhere."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import NON_TRAINING_KEYS, Config, flatten_config
from .errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"  # written last, inside the temp folder, so a folder that has it is whole
WEIGHTS = "weights.safetensors"  # trainable parameters by name, e.g. "unet.conv_in.weight"
TENSORS = "state.safetensors"  # optimizer, scheduler and RNG tensors, referenced from state.json
STATE = "state.json"
FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (path None if none could be written)."""

    def __init__(self, step: int, path: Path | None, signal_name: str):
        super().__init__(f"{signal_name} at step {step}")
        self.step, self.path, self.signal_name = step, path, signal_name


# ----------------------------------------------------------------------------------------------- settings

def training_settings(cfg: Config) -> dict[str, Any]:
    """The config's training-relevant keys, dotted and JSON-normalised; NON_TRAINING_KEYS may differ on resume."""
    return json.loads(json.dumps(flatten_config(cfg, NON_TRAINING_KEYS)))


def settings_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint value -> current value' for every training-relevant key that differs."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            out.append(f"{key}: {'(unset)' if a is missing else a!r} -> {'(unset)' if b is missing else b!r}")
    return out


# ----------------------------------------------------------------------------------------------- packing

def _pack(obj: Any, key: str, tensors: dict, seen: dict) -> Any:
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
            return {k: _pack(v, f"{key}.{k}", tensors, seen) for k, v in obj.items()}
        # Optimizer state is keyed by parameter index (int): JSON objects would turn those into strings.
        return {"__items__": [[k, _pack(v, f"{key}.{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a checkpoint (only tensors and plain data)")


def _unpack(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- folders

def root_of(out: str | Path) -> Path:
    return Path(out) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    try:
        return json.loads((path / COMPLETE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


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
    complete, incomplete = list_checkpoints(out)
    for path in incomplete:
        log.warning("ignoring incomplete checkpoint %s (its write was interrupted)", path)
    return complete[-1][1] if complete else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, write_files, marker: dict) -> Path:
    """Write a folder via `write_files(tmp)` into a temp folder beside `final`, add the completion marker,
    fsync, then rename into place; on any failure (or Ctrl-C) the temp folder goes and `final` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_files(tmp)
        (tmp / COMPLETE).write_text(json.dumps(marker, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = None
        if final.exists():  # the same step written again: swap, since rename cannot replace a full folder
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(out: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never ones marked keep) and stale temp folders."""
    complete, incomplete = list_checkpoints(out)
    removed = []
    for path in incomplete:
        if path.name.startswith(".step-"):
            shutil.rmtree(path, ignore_errors=True)
    if keep_last is None:
        return removed
    for _, path in complete[:-keep_last] if len(complete) > keep_last else []:
        if not json.loads((path / COMPLETE).read_text()).get("keep"):
            # Hide it first (one rename), so a delete cut short never leaves a half checkpoint that looks whole.
            doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------- trainer state

def trainable(trainer) -> list[tuple[str, torch.nn.Parameter]]:
    """The optimizer's parameters in its order, named by the model they belong to (UNet, text encoder, LoRA...)."""
    unwrap = trainer.accelerator.unwrap_model
    modules = [("unet", trainer.unet)] + [(k, m) for k, m in vars(trainer.components).items()
                                          if isinstance(m, torch.nn.Module)]
    names: dict[int, str] = {}
    for prefix, module in modules:
        for name, p in unwrap(module).named_parameters():
            names.setdefault(id(p), f"{prefix}.{name}")
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return [(names.get(id(p), f"param.{i}"), p) for i, p in enumerate(params)]


def assert_finite(trainer, what: str) -> None:
    """Refuse to write non-finite trainable weights anywhere."""
    bad = [name for name, p in trainable(trainer) if not torch.isfinite(p.detach()).all()]
    if bad:
        last = f"the last good checkpoint {trainer.last_checkpoint} is kept; " if trainer.last_checkpoint else ""
        raise UserError(f"trainable weights became NaN/inf by step {trainer.global_step} ({bad[0]} and "
                        f"{len(bad) - 1} more), so the {what} was not written; {last}"
                        "train with mixed_precision: bf16 or a lower learning_rate")


def _rng_state(trainer, tensors: dict) -> dict:
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors["rng.gen"] = trainer.gen.get_state()
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                             float(cached)]}


def _set_rng(rng: dict, tensors: dict, trainer) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    trainer.gen.set_state(tensors["rng.gen"])
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _no_space(trainer, root: Path, detail: str) -> None:
    """Disk full: raise a clear error (on_disk_full: stop) or warn and go on unsaved (continue)."""
    last = trainer.last_checkpoint
    kept = f"the last complete checkpoint {last} is intact" if last else "no earlier checkpoint exists"
    if trainer.cfg.on_disk_full == "continue":
        log.warning("not writing checkpoint in %s: %s; training continues unsaved (on_disk_full: continue); %s",
                    root, detail, kept)
        return
    raise UserError(f"not enough disk space for a checkpoint in {root}: {detail}; {kept}. Free some space and "
                    "resume with resume=latest, or set on_disk_full: continue to train on without checkpoints")


def save(trainer, keep: bool = False) -> Path | None:
    """Write the trainer's full state to output_dir/checkpoints/step-NNNNNN, then prune; None if skipped."""
    acc, cfg, step = trainer.accelerator, trainer.cfg, trainer.global_step
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    named = trainable(trainer)
    assert_finite(trainer, "checkpoint")
    weights = {name: p.detach() for name, p in named}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict = {}
    scaler = acc.scaler.state_dict() if acc.scaler is not None else None
    state = {
        "format": FORMAT, "step": step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "losses": trainer.losses, "param_names": [name for name, _ in named],
        "settings": training_settings(cfg), "optimizer_name": getattr(trainer, "optimizer_name", None),
        "optimizer": _pack(trainer.optimizer.state_dict(), "optimizer", tensors, seen),
        "lr_scheduler": _pack(trainer.lr_scheduler.state_dict(), "lr_scheduler", tensors, seen),
        "scaler": _pack(scaler, "scaler", tensors, seen),
        "rng": _rng_state(trainer, tensors),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    root = root_of(trainer.out)
    root.mkdir(parents=True, exist_ok=True)
    need = _nbytes(weights) + _nbytes(tensors) + 16 * 2**20  # + JSON and filesystem slack
    free = free_bytes(root)
    if free < need:
        return _no_space(trainer, root, f"needs about {need / 2**30:.2f} GB, {free / 2**30:.2f} GB free")

    def write(tmp: Path):
        save_file(weights, tmp / WEIGHTS, metadata={"step": str(step)})
        save_file(tensors, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(state))

    final = root / f"step-{step:06d}"
    try:
        write_atomic(final, write, {"format": FORMAT, "step": step, "keep": keep})
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _no_space(trainer, root, str(e))
        raise
    trainer.last_checkpoint, trainer.last_checkpoint_step = final, step
    for path in prune(trainer.out, cfg.keep_last):
        log.info("pruned checkpoint %s (keep_last: %s)", path, cfg.keep_last)
    return final


# ----------------------------------------------------------------------------------------------- resume

def _read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}): resume from another one, "
                        "e.g. resume=latest") from None


def resolve_resume(cfg: Config, out: Path) -> Path | None:
    """The checkpoint to resume from, checked against the config before anything is written; None for a fresh run."""
    if cfg.resume is None:
        complete, _ = list_checkpoints(out)
        if complete:
            raise UserError(f"output_dir {out} holds checkpoints of an earlier run (newest {complete[-1][1].name}): "
                            f"set resume=latest to continue it, or delete {root_of(out)} to start over")
        return None
    if cfg.resume.strip().lower() == "latest":
        path = latest_checkpoint(out)
        if path is None:
            raise UserError(f"resume: latest found no complete checkpoint in {root_of(out)}: "
                            "start without resume, or set resume to a checkpoint folder")
    else:
        path = Path(cfg.resume).expanduser()
        if path.is_dir() and not STEP_DIR.match(path.name) and (path / CHECKPOINTS).is_dir():
            path = latest_checkpoint(path) or path  # an output folder: take its newest checkpoint
        if not path.is_dir() or not is_complete(path):
            raise UserError(f"resume: {path} is not a complete checkpoint folder (no {COMPLETE}): "
                            f"give a folder like {root_of(out)}/step-000100, or resume=latest")
    state = _read_state(path)
    diffs = settings_differences(state.get("settings", {}), training_settings(cfg))
    if diffs and not cfg.resume_force:
        raise UserError(f"cannot resume from {path}: training settings differ from the checkpoint's "
                        f"({'; '.join(diffs)}): change them back, or set resume_force: true to resume anyway")
    if diffs:
        log.warning("resuming from %s despite changed settings (resume_force): %s", path, "; ".join(diffs))
    return path


def restore(trainer, path: Path) -> None:
    """Load a checkpoint into a set-up trainer: weights, optimizer, schedule, scaler, RNGs, data position, step."""
    state = _read_state(path)
    tensors = load_file(path / TENSORS)
    weights = load_file(path / WEIGHTS)
    named = trainable(trainer)
    names = [name for name, _ in named]
    if names != state["param_names"]:
        missing = sorted(set(state["param_names"]) ^ set(names))[:3]
        raise UserError(f"checkpoint {path} holds different trainable parameters than this run (e.g. {missing}): "
                        "resume with the finetune/train_text_encoder/lora settings it was written with")
    with torch.no_grad():
        for name, p in named:
            p.copy_(weights[name].to(p.device, p.dtype))
    if state.get("optimizer_name") == getattr(trainer, "optimizer_name", None):
        trainer.optimizer.load_state_dict(_unpack(state["optimizer"], tensors))
    else:
        log.warning("checkpoint was written with optimizer %s: its state is not loaded (fresh moments)",
                    state.get("optimizer_name"))
    trainer.lr_scheduler.load_state_dict(_unpack(state["lr_scheduler"], tensors))
    if trainer.accelerator.scaler is not None and state.get("scaler"):
        trainer.accelerator.scaler.load_state_dict(_unpack(state["scaler"], tensors))
    _set_rng(state["rng"], tensors, trainer)
    trainer.global_step, trainer.epoch = state["step"], state["epoch"]
    trainer.batch_in_epoch, trainer.losses = state["batch_in_epoch"], list(state["losses"])
    trainer.last_checkpoint, trainer.last_checkpoint_step = path, state["step"]
    log.info("resumed from %s at step %d", path, state["step"])


# ----------------------------------------------------------------------------------------------- signals

class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets `requested` (the loop finishes its step and checkpoints);
    a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step and writing a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
