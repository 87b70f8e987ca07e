"""Resumable checkpoints in output_dir/checkpoints/step-NNNNNN: the trainable weights, optimizer (8-bit too), LR
schedule, grad scaler, the EMA of the weights (when on) and the TrainState (each process's RNG streams and subject stats in its own file). No pickle.
Layout on disk: checkpoint_store.py; which checkpoint to resume from: resume.py."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreambooth.config.plan import RunPlan
from dreambooth.errors import UserError
from dreambooth.training import checkpoint_ranks as ranks
from dreambooth.training import checkpoint_store as store
from dreambooth.training.resume import STATE, read_state, training_settings
from dreambooth.training.state import TrainState

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"  # trainable parameters by name, e.g. "unet.conv_in.weight"
TENSORS = "state.safetensors"  # optimizer, scheduler and grad scaler tensors, referenced from state.json
EMA_FILE = "ema.safetensors"  # the EMA's fp32 average of the trainable parameters, named as in WEIGHTS
WRITTEN, SKIPPED, FAILED = 0, 1, 2  # how the main process's write of a checkpoint ended, told to the others


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
    from accelerate.utils import broadcast  # accelerate is imported by the trainer already; here for the rare path
    return int(broadcast(torch.tensor([code], device=accelerator.device), from_process=0).item())


def named_trainable(modules: dict[str, torch.nn.Module], optimizer, unwrap) -> list[tuple[str, torch.nn.Parameter]]:
    """The optimizer's parameters in its order, named by the module they belong to (unet., text_encoder., ...)."""
    names: dict[int, str] = {}
    for prefix, module in modules.items():
        for name, p in unwrap(module).named_parameters():
            names.setdefault(id(p), f"{prefix}.{name}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [(names.get(id(p), f"param.{i}"), p) for i, p in enumerate(params)]


class Checkpointer:
    """Writes and restores the run's checkpoints from what it is handed: the named trainable weights, optimizer,
    LR schedule, the accelerator (processes, grad scaler), the EMA (or None) and, at each call, the TrainState."""

    def __init__(self, plan: RunPlan, out: Path, accelerator, named: list[tuple[str, torch.nn.Parameter]],
                 optimizer, lr_scheduler, ema=None):
        self.plan, self.cfg, self.out, self.accelerator = plan, plan.config, out, accelerator
        self.named, self.optimizer, self.lr_scheduler, self.ema = named, optimizer, lr_scheduler, ema
        self.last: Path | None = None  # the newest complete checkpoint of this run
        self.last_step: int | None = None

    def assert_finite(self, state: TrainState, what: str) -> None:
        """Refuse to write non-finite trainable weights anywhere."""
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in self.named]).tolist()  # one sync
        bad = [name for (name, _), ok in zip(self.named, finite) if not ok]
        if bad:
            last = f"the last good checkpoint {self.last} is kept; " if self.last else ""
            raise UserError(f"trainable weights became NaN/inf by step {state.step} ({bad[0]} and "
                            f"{len(bad) - 1} more), so the {what} was not written; {last}"
                            "train with mixed_precision: bf16 or a lower learning_rate")

    # ------------------------------------------------------------------------------------------- save
    def save(self, state: TrainState, keep: bool = False) -> Path | None:
        """Write the full state to output_dir/checkpoints/step-NNNNNN, then prune; None if skipped (disk full,
        on_disk_full: continue). Every process stages its own state; the main process writes the rest."""
        index, count = ranks.process_rank(self.accelerator)
        self.assert_finite(state, "checkpoint")  # the weights are the same in every process: all stop here
        final = store.root_of(self.out) / f"step-{state.step:06d}"
        staged = not any_process(self.accelerator, not ranks.stage(state, final, index))  # also a barrier
        code = FAILED
        try:
            if index != 0:
                code = WRITTEN
            elif staged:
                code = self._write(state, final, count, keep)
            else:  # a process's disk was full: on_disk_full decides, as for the main write
                self._no_space(final.parent, "a process could not write its state (disk full)")
                code = SKIPPED
        finally:  # the others learn the outcome even when the main process raises (and then raise too)
            if index == 0:  # the staged files are in the checkpoint now, or unwanted after a skip or failure
                shutil.rmtree(ranks.staging(final), ignore_errors=True)
            code = _from_main(self.accelerator, code)
        if code == FAILED:
            raise UserError(f"the main process could not write checkpoint {final} (its message says why)")
        if code == SKIPPED:
            return None
        self.last, self.last_step = final, state.step
        return final

    def _no_space(self, root: Path, detail: str) -> None:
        store.no_space(self.cfg.on_disk_full, self.last, root, detail)

    def _write(self, state: TrainState, final: Path, count: int, keep: bool) -> int:
        """The main process's part of save: weights and shared state into `final`, with every process's state."""
        weights = {name: p.detach() for name, p in self.named}
        tensors: dict[str, torch.Tensor] = {}
        shared = self._shared_state(state, tensors, count)
        average = self.ema.tensors() if self.ema is not None else {}
        root = final.parent
        need = store.nbytes(weights) + store.nbytes(tensors) + store.nbytes(average) + 16 * 2**20  # + JSON, slack
        free = store.free_bytes(root)
        if free < need:
            self._no_space(root, f"needs about {need / 2**30:.2f} GB, {free / 2**30:.2f} GB free")
            return SKIPPED

        def write(tmp: Path):
            save_file(weights, tmp / WEIGHTS, metadata={"step": str(state.step)})
            save_file(tensors, tmp / TENSORS)
            if average:
                save_file(average, tmp / EMA_FILE)
            (tmp / STATE).write_text(json.dumps(shared))
            ranks.gather(final, tmp, count)

        try:
            store.write_atomic(final, write, {"format": store.FORMAT, "step": state.step, "keep": keep})
        except OSError as e:
            if not store.is_disk_full(e):
                raise
            self._no_space(root, str(e))
            return SKIPPED
        for path in store.prune(self.out, self.cfg.keep_last):
            log.info("pruned checkpoint %s (keep_last: %s)", path, self.cfg.keep_last)
        return WRITTEN

    def _shared_state(self, state: TrainState, tensors: dict, count: int) -> dict:
        """state.json's content (tensors go into `tensors`): what all processes share, as the main one holds it."""
        scaler = self.accelerator.scaler
        seen: dict = {}
        return {
            "format": store.FORMAT, **state.shared(), "num_processes": count,
            "param_names": [name for name, _ in self.named], "settings": training_settings(self.plan),
            "optimizer_name": self.plan.optimizer,
            "optimizer": store.pack(self.optimizer.state_dict(), "optimizer", tensors, seen),
            "lr_scheduler": store.pack(self.lr_scheduler.state_dict(), "lr_scheduler", tensors, seen),
            "scaler": store.pack(scaler.state_dict() if scaler is not None else None, "scaler", tensors, seen),
            "ema": self.ema.state() if self.ema is not None else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    # ------------------------------------------------------------------------------------------- restore
    def restore(self, state: TrainState, path: Path) -> None:
        """Load a checkpoint: weights, optimizer, schedule, scaler, then the TrainState (RNGs, data position, step)."""
        saved = read_state(path)
        index, count = ranks.process_rank(self.accelerator)
        if not self.cfg.resume_force:  # resolve_resume checked already, unless the launcher did not set WORLD_SIZE
            ranks.check_processes(path, saved.get("num_processes"), count, self.cfg)
        tensors = load_file(path / TENSORS)
        weights = load_file(path / WEIGHTS)
        names = [name for name, _ in self.named]
        if names != saved["param_names"]:
            missing = sorted(set(saved["param_names"]) ^ set(names))[:3]
            raise UserError(f"checkpoint {path} holds different trainable parameters than this run (e.g. {missing}): "
                            "resume with the finetune/train_text_encoder/lora settings it was written with")
        with torch.no_grad():
            for name, p in self.named:
                p.copy_(weights[name].to(p.device, p.dtype))
        if saved.get("optimizer_name") == self.plan.optimizer:
            self.optimizer.load_state_dict(store.unpack(saved["optimizer"], tensors))
        else:
            log.warning("checkpoint was written with optimizer %s: its state is not loaded (fresh moments)",
                        saved.get("optimizer_name"))
        self.lr_scheduler.load_state_dict(store.unpack(saved["lr_scheduler"], tensors))
        if self.accelerator.scaler is not None and saved.get("scaler"):
            self.accelerator.scaler.load_state_dict(store.unpack(saved["scaler"], tensors))
        self._restore_ema(path, saved)
        ranks.restore(state, path, index, saved, tensors)
        state.load_shared(saved)
        self.last, self.last_step = path, state.step
        log.info("resumed from %s at step %d", path, state.step)

    def _restore_ema(self, path: Path, saved: dict) -> None:
        """The EMA from the checkpoint; one written without (resume_force) starts the average at its weights."""
        if self.ema is None:
            return
        if saved.get("ema") and (path / EMA_FILE).is_file():
            self.ema.load(load_file(path / EMA_FILE), saved["ema"])
        else:
            log.warning("checkpoint %s holds no EMA: the average starts at its weights", path)
            self.ema.reset()
