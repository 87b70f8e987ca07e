"""Resumable checkpoints: what goes into output_dir/checkpoints/step-NNNNNN and how a run resumes from it (weights,
optimizer (8-bit too), LR schedule, grad scaler, data position, and each process's RNG streams and per-subject
stats), plus the stop signals that make the loop write one. Layout on disk: checkpoint_store.py. No pickle."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dreambooth.training import checkpoint_ranks as ranks
from dreambooth.training import checkpoint_store as store
from dreambooth.config.schema import NON_TRAINING_KEYS, Config, flatten_config
from dreambooth.errors import UserError
from dreambooth.models.load import launched_processes

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"  # trainable parameters by name, e.g. "unet.conv_in.weight"
TENSORS = "state.safetensors"  # optimizer, scheduler and grad scaler tensors, referenced from state.json
STATE = "state.json"
WRITTEN, SKIPPED, FAILED = 0, 1, 2  # how the main process's write of a checkpoint ended, told to the others


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


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds in any process (one collective, which is also a barrier; none in a single process)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item())


def _from_main(accelerator, code: int) -> int:
    """The main process's `code`, on every process (one collective; nothing to do in a single process)."""
    if accelerator.num_processes == 1:
        return code
    from accelerate.utils import broadcast
    return int(broadcast(torch.tensor([code], device=accelerator.device), from_process=0).item())


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


def assert_finite(trainer, what: str, named: list | None = None) -> None:
    """Refuse to write non-finite trainable weights anywhere (`named`: trainable(trainer), if already listed)."""
    named = trainable(trainer) if named is None else named
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()  # one device sync
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        last = f"the last good checkpoint {trainer.last_checkpoint} is kept; " if trainer.last_checkpoint else ""
        raise UserError(f"trainable weights became NaN/inf by step {trainer.global_step} ({bad[0]} and "
                        f"{len(bad) - 1} more), so the {what} was not written; {last}"
                        "train with mixed_precision: bf16 or a lower learning_rate")


# ----------------------------------------------------------------------------------------------- save

def save(trainer, keep: bool = False) -> Path | None:
    """Write the trainer's full state to output_dir/checkpoints/step-NNNNNN, then prune; None if skipped.
    Every process stages its own state; the main process writes the rest and moves them in."""
    index, count = ranks.process_rank(trainer)
    named = trainable(trainer)
    assert_finite(trainer, "checkpoint", named)  # the weights are the same in every process: all stop here
    final = store.root_of(trainer.out) / f"step-{trainer.global_step:06d}"
    staged = not any_process(trainer.accelerator, not ranks.stage(trainer, final, index))  # also a barrier
    code = FAILED
    try:
        if index != 0:
            code = WRITTEN
        elif staged:
            code = _write(trainer, named, final, count, keep)
        else:  # a process's disk was full: on_disk_full decides, as for the main write
            store.no_space(trainer, final.parent, "a process could not write its state (disk full)")
            code = SKIPPED
    finally:  # the others learn the outcome even when the main process raises (and then raise too)
        if index == 0:  # the staged files are in the checkpoint now, or unwanted after a skip or failure
            shutil.rmtree(ranks.staging(final), ignore_errors=True)
        code = _from_main(trainer.accelerator, code)
    if code == FAILED:
        raise UserError(f"the main process could not write checkpoint {final} (its message says why)")
    if code == SKIPPED:
        return None
    trainer.last_checkpoint, trainer.last_checkpoint_step = final, trainer.global_step
    return final


def _write(trainer, named: list, final: Path, count: int, keep: bool) -> int:
    """The main process's part of save: weights and shared state into `final`, with every process's state."""
    cfg, step = trainer.cfg, trainer.global_step
    weights = {name: p.detach() for name, p in named}
    tensors: dict[str, torch.Tensor] = {}
    state = _shared_state(trainer, named, tensors, count)
    root = final.parent
    need = store.nbytes(weights) + store.nbytes(tensors) + 16 * 2**20  # + JSON and filesystem slack
    free = store.free_bytes(root)
    if free < need:
        store.no_space(trainer, root, f"needs about {need / 2**30:.2f} GB, {free / 2**30:.2f} GB free")
        return SKIPPED

    def write(tmp: Path):
        save_file(weights, tmp / WEIGHTS, metadata={"step": str(step)})
        save_file(tensors, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(state))
        ranks.gather(final, tmp, count)

    try:
        store.write_atomic(final, write, {"format": store.FORMAT, "step": step, "keep": keep})
    except OSError as e:
        if not store.is_disk_full(e):
            raise
        store.no_space(trainer, root, str(e))
        return SKIPPED
    for path in store.prune(trainer.out, cfg.keep_last):
        log.info("pruned checkpoint %s (keep_last: %s)", path, cfg.keep_last)
    return WRITTEN


def _shared_state(trainer, named: list, tensors: dict, count: int) -> dict:
    """state.json's content (tensors go into `tensors`): what all processes share, as the main one holds it."""
    scaler = trainer.accelerator.scaler
    seen: dict = {}
    return {
        "format": store.FORMAT, "step": trainer.global_step, "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch, "losses": trainer.losses, "num_processes": count,
        "param_names": [name for name, _ in named], "settings": training_settings(trainer.cfg),
        "optimizer_name": getattr(trainer, "optimizer_name", None),
        "optimizer": store.pack(trainer.optimizer.state_dict(), "optimizer", tensors, seen),
        "lr_scheduler": store.pack(trainer.lr_scheduler.state_dict(), "lr_scheduler", tensors, seen),
        "scaler": store.pack(scaler.state_dict() if scaler is not None else None, "scaler", tensors, seen),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ----------------------------------------------------------------------------------------------- resume

def _read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}): resume from another one, "
                        "e.g. resume=latest") from None


def _resume_path(cfg: Config, out: Path) -> Path:
    """The checkpoint folder that cfg.resume names: `latest`, a step folder, or another run's output folder."""
    if cfg.resume.strip().lower() == "latest":
        path = store.latest_checkpoint(out)
        if path is None:
            raise UserError(f"resume: latest found no complete checkpoint in {store.root_of(out)}: "
                            "start without resume, or set resume to a checkpoint folder")
        return path
    path = Path(cfg.resume).expanduser()
    if path.is_dir() and not store.STEP_DIR.match(path.name) and (path / store.CHECKPOINTS).is_dir():
        path = store.latest_checkpoint(path) or path  # an output folder: take its newest checkpoint
    if not path.is_dir() or not store.is_complete(path):
        raise UserError(f"resume: {path} is not a complete checkpoint folder (no {store.COMPLETE}): "
                        f"give a folder like {store.root_of(out)}/step-000100, or resume=latest")
    return path


def resolve_resume(cfg: Config, out: Path) -> Path | None:
    """The checkpoint to resume from, checked against the config before anything is written; None for a fresh run."""
    if cfg.resume is None:
        complete, _ = store.list_checkpoints(out)
        if complete:
            raise UserError(f"output_dir {out} holds checkpoints of an earlier run (newest {complete[-1][1].name}): "
                            f"set resume=latest to continue it, or delete {store.root_of(out)} to start over")
        return None
    path = _resume_path(cfg, out)
    state = _read_state(path)
    diffs = settings_differences(state.get("settings", {}), training_settings(cfg))
    if diffs and not cfg.resume_force:
        raise UserError(f"cannot resume from {path}: training settings differ from the checkpoint's "
                        f"({'; '.join(diffs)}): change them back, or set resume_force: true to resume anyway")
    if diffs:
        log.warning("resuming from %s despite changed settings (resume_force): %s", path, "; ".join(diffs))
    ranks.check_processes(path, state.get("num_processes"), launched_processes(), cfg)
    return path


def restore(trainer, path: Path) -> None:
    """Load a checkpoint into a set-up trainer: weights, optimizer, schedule, scaler, RNGs, data position, step."""
    state = _read_state(path)
    index, count = ranks.process_rank(trainer)
    if not trainer.cfg.resume_force:  # resolve_resume checked already, unless the launcher did not set WORLD_SIZE
        ranks.check_processes(path, state.get("num_processes"), count, trainer.cfg)
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
        trainer.optimizer.load_state_dict(store.unpack(state["optimizer"], tensors))
    else:
        log.warning("checkpoint was written with optimizer %s: its state is not loaded (fresh moments)",
                    state.get("optimizer_name"))
    trainer.lr_scheduler.load_state_dict(store.unpack(state["lr_scheduler"], tensors))
    if trainer.accelerator.scaler is not None and state.get("scaler"):
        trainer.accelerator.scaler.load_state_dict(store.unpack(state["scaler"], tensors))
    ranks.restore(trainer, path, index, state, tensors)
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
