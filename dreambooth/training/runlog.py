"""What a run tells the user while it trains: output_dir/train.log, the per-step loss history (for the
report) and, when `log_with: tensorboard`, scalars and validation images through accelerate's tracker."""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from pathlib import Path

import accelerate
import diffusers
import numpy as np
import torch
import transformers

from dreambooth.config.plan import RunPlan
from dreambooth import __version__
from dreambooth.config.machine import has_package
from dreambooth.config.parse import flatten_config
from dreambooth.config.schema import Config
from dreambooth.errors import UserError
from dreambooth.files import write_json_atomic
from dreambooth.training.state import TrainState

log = logging.getLogger("dreambooth")
progress = logging.getLogger("dreambooth.progress")  # the periodic step lines

LOG_FILE = "train.log"
HISTORY_FILE = "loss_history.json"
TRACKER_DIR = "tensorboard"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def tracker_kwargs(cfg: Config, out: Path) -> dict:
    """Accelerator keyword arguments for `log_with`; {} when no tracker is asked for."""
    if cfg.log_with is None:
        return {}
    if not (has_package("tensorboard") or has_package("tensorboardX")):
        raise UserError("log_with: tensorboard needs the tensorboard package: pip install tensorboard, "
                        "or remove log_with from the config")
    return {"log_with": cfg.log_with, "project_dir": str(out)}


def _hparams(cfg: Config) -> dict:
    """The config flattened to the scalar values TensorBoard's hparams accept."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten_config(cfg).items()}


class RunLog:
    """train.log plus loss history and trackers of one Trainer; one open RunLog per process."""

    _open: "RunLog | None" = None

    def __init__(self, plan: RunPlan, out: Path, accelerator, resumed: bool = False):
        self.plan, self.cfg, self.out, self.accelerator = plan, plan.config, out, accelerator
        self.history: list[dict] = []
        self.main = accelerator.is_main_process
        self.resumed = resumed
        self.step_reached = 0  # the last step recorded, for the line that says how the run ended
        self.tracking = bool(self.cfg.log_with) and self.main
        self.handler: logging.Handler | None = None
        self._last_time, self._last_step, self.interval = time.time(), 0, 1
        if RunLog._open is not None:  # a Trainer that was never closed (tests) must not write into our log
            RunLog._open.close()
        if self.main:
            self._open_file()
        if self.cfg.log_with:
            accelerator.init_trackers(TRACKER_DIR, config=_hparams(self.cfg))
        RunLog._open = self

    def _open_file(self) -> None:
        self.handler = logging.FileHandler(self.out / LOG_FILE, mode="a" if self.resumed else "w")
        self.handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
        self.handler.setLevel(logging.INFO)
        self._old_level = log.level
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        log.addHandler(self.handler)
        # With bars on, step lines go to the file only (the bar shows them); quiet mode prints them instead.
        progress.propagate = self.cfg.quiet
        if not self.cfg.quiet:
            progress.addHandler(self.handler)

    def start(self, step: int) -> None:
        """One line on what is about to run, from `step` (0, or where a resumed run starts)."""
        plan = self.plan
        self.interval = max(1, plan.total_steps // 50)  # at most ~50 step lines per run
        log.info("training %s for %d steps (%d per epoch), batch %d x %d accumulation, lr %g, "
                 "mixed precision %s, optimizer %s, compile %s, device %s -> %s", self.cfg.model, plan.total_steps,
                 plan.steps_per_epoch, self.cfg.batch_size, self.cfg.gradient_accumulation_steps,
                 plan.learning_rate, plan.precision, plan.optimizer,
                 plan.compile_mode if plan.compile else "off", self.accelerator.device, self.out)
        self._last_time, self._last_step = time.time(), step
        self.step_reached = step

    def step(self, step: int, logs: dict[str, float]) -> None:
        """Record one optimisation step: history, tracker scalars, and every `interval` steps a log line."""
        entry = {"step": step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
        self.history.append(entry)
        self.step_reached = step
        if self.tracking:
            self.accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=step)
        total = self.plan.total_steps
        if step % self.interval and step not in (1, total):
            return
        recent = [h["loss"] for h in self.history[-self.interval:] if "loss" in h]
        now = time.time()
        per_step = (now - self._last_time) / max(1, step - self._last_step)
        self._last_time, self._last_step = now, step
        parts = [k for k in entry if k.endswith("_loss")]
        extras = "".join(f"  {k} {entry[k]:.4f}" for k in parts) if len(parts) > 1 else ""  # only with a prior
        mean = f" (mean of last {len(recent)}: {sum(recent) / len(recent):.4f})" if len(recent) > 1 else ""
        progress.info("step %d/%d  loss %.4f%s%s  lr %.2e  grad_norm %.3f  %.2f s/step  ETA %s", step, total,
                      entry.get("loss", float("nan")), mean, extras, entry.get("lr", float("nan")),
                      entry.get("grad_norm", float("nan")), per_step, hms(per_step * (total - step)))

    def validated(self, step: int, images: dict[str, list], seconds: float, scores: dict | None = None) -> None:
        """After a validation: keep its time out of s/step and ETA; its scores to the log and tracker, images to
        the tracker, a tag per prompt."""
        self._last_time += seconds
        if scores:
            progress.info("validation scores at step %d: %s", step,
                          "  ".join(f"{k} {v:+.4f}" if k == "drift" else f"{k} {v:.4f}" for k, v in scores.items()))
            if self.tracking:
                self.accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=step)
        if not self.tracking or not images:
            return
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for p, (prompt, ims) in enumerate(images.items()):
            tracker.add_images(f"validation/{p:02d} {prompt}"[:100], np.stack([np.asarray(i) for i in ims]),
                               step, dataformats="NHWC")

    def write_history(self) -> Path | None:
        """output_dir/loss_history.json; a resumed run keeps the entries written before its first step."""
        if not self.main:
            return None
        path = self.out / HISTORY_FILE
        history = self.history
        if self.resumed and path.is_file():
            first = history[0]["step"] if history else float("inf")
            earlier = [h for h in json.loads(path.read_text()) if h["step"] < first]
            history = earlier + history
        write_json_atomic(path, history, indent=None)
        return path

    def close(self, error: BaseException | None = None) -> None:
        """Close the log file (noting the error that ended the run, if any) and the trackers; safe twice."""
        if error is not None:
            try:  # an interrupted run keeps its history, for the report of the run that resumes it
                self.write_history()
            except OSError as e:
                log.warning("could not write %s: %s", HISTORY_FILE, e)
        if self.handler is not None:
            # To the file only: the console shows the outcome in its own form.
            if error is None:
                self._to_file(logging.INFO, f"run finished at step {self.step_reached}")
            else:
                tb = None if isinstance(error, (UserError, KeyboardInterrupt)) else \
                    (type(error), error, error.__traceback__)
                self._to_file(logging.ERROR, f"run stopped at step {self.step_reached}: "
                                             f"{type(error).__name__}: {error}", tb)
            log.removeHandler(self.handler)
            progress.removeHandler(self.handler)
            progress.propagate = True
            log.setLevel(self._old_level)
            self.handler.close()
            self.handler = None
        # Not accelerator.end_training(): that also tears down the process group, which save() still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        if RunLog._open is self:
            RunLog._open = None

    def _to_file(self, level: int, msg: str, exc_info=None) -> None:
        self.handler.handle(logging.makeLogRecord({"name": log.name, "levelno": level, "msg": msg,
                                                   "levelname": logging.getLevelName(level), "exc_info": exc_info}))


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_summary(plan: RunPlan, state: TrainState, wall_time: float, scoring: dict | None = None) -> dict:
    """train_summary.json of a finished run: steps, losses, time, throughput, peak memory, device, versions;
    with validation.metrics, the scores of each validated step and the recommended step (`scoring`)."""
    cfg, cuda = plan.config, torch.cuda.is_available()
    samples = state.step * cfg.batch_size * cfg.gradient_accumulation_steps
    return {
        "steps": state.step,
        "epochs": round(state.step / plan.steps_per_epoch, 3),
        "final_loss": state.losses[-1] if state.losses else None,
        "mean_loss": sum(state.losses) / len(state.losses) if state.losses else None,
        "wall_time_s": round(wall_time, 3),
        "samples_per_s": round(samples / wall_time, 4) if wall_time else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "mixed_precision": plan.precision,
        "optimizer": plan.optimizer,
        "weights": "ema" if cfg.ema else "raw",  # what the exported model holds: the average or the last step's
        # What config.yaml keeps as auto, as this run decided it (export headers read it back).
        "resolved": plan.resolved(),
        "subjects": state.subjects.summary(),
        **({"validation_scores": scoring} if scoring else {}),
        **({"recommended_step": scoring["recommended"]["step"]} if scoring and "recommended" in scoring else {}),
        "versions": library_versions(),
    }


def library_versions() -> dict:
    """The versions of this package and the libraries it trains with (train_summary.json and bench JSON)."""
    return {"dreambooth": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
