"""One trial, wherever it runs (a Ray worker, or a test): skipped when finished, resumed from its latest checkpoint
when one exists, trained as a normal run, its progress reported, stopped with a checkpoint when the sweep stops.
No Ray here: engine.py passes Tune's report function in."""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from pathlib import Path
from typing import Callable

from dreambooth.config.schema import METRICS as SCORES
from dreambooth.errors import UserError
from dreambooth.files import read_json
from dreambooth.files import write_json_atomic as write_json
from dreambooth.sweep.grid import Trial

STOP_FILE = "STOP"  # in the sweep folder: the driver writes it on Ctrl-C (or you do, by hand) to stop every trial
RECORD = "sweep_trial.json"  # in each trial folder: status, attempts, time, the trial's settings and config
SUMMARY = "train_summary.json"  # a finished run's summary (training/trainer.py)
HISTORY = "loss_history.json"
RECENT = 10  # recent_loss: the mean of the last this many steps' losses
# Metrics a trial reports (every report_steps and at the end), each "as if the run ended here"; lower is better.
LOSSES = ("final_loss", "mean_loss", "recent_loss")
# With validation.metrics, each scored validation step's scores too, as validation_<score> (the latest step's).
PREFIX = "validation_"
METRICS = LOSSES + tuple(PREFIX + m for m in SCORES)
HIGHER_IS_BETTER = tuple(PREFIX + m for m in ("dino", "clip_i", "clip_t"))
DONE = ("finished", "early_stopped")  # statuses a rerun of the sweep skips


def loss_metrics(losses: list[float]) -> dict:
    """The metrics of a run whose per-step losses so far are `losses` (non-finite steps left out of the means)."""
    finite = [x for x in losses if math.isfinite(x)]
    recent = [x for x in losses[-RECENT:] if math.isfinite(x)]
    return {"step": len(losses), "final_loss": losses[-1] if losses else None,
            "mean_loss": sum(finite) / len(finite) if finite else None,
            "recent_loss": sum(recent) / len(recent) if recent else None}


def metric_mode(metric: str) -> str:
    """`max` for the scores where higher is better (DINO, CLIP-I, CLIP-T), else `min`."""
    return "max" if metric in HIGHER_IS_BETTER else "min"


def check_metric(metric: str, trials: list[Trial]) -> None:
    """Refuse a metric no trial will report: an unknown name, or a score the trials' validation does not compute."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    score = metric.removeprefix(PREFIX)
    configs = [t.config() for t in trials] if metric.startswith(PREFIX) else []
    if any(not (c.validation.enabled and score in c.validation.metrics) for c in configs):
        raise UserError(f"--metric {metric}: the trials do not score {score} at their validation steps: add it to "
                        f"the config's validation.metrics (e.g. validation.metrics=[{score}]), docs/evaluate.md")


def score_metrics(scores: dict | None) -> dict:
    """A validation step's scores as metrics: validation_<score>."""
    return {PREFIX + k: v for k, v in (scores or {}).items() if isinstance(v, (int, float))}


def folder_metrics(out: Path) -> dict:
    """A trial folder's metrics as its files record them: the loss history (else the train summary) and the
    latest scored validation step."""
    history = read_json(out / HISTORY, [])
    metrics = loss_metrics([h["loss"] for h in history if "loss" in h]) if history else {}
    done = read_json(out / "validation" / "index.json", {}).get("done", {})
    scored = sorted((int(step), d["scores"]) for step, d in done.items() if isinstance(d, dict) and d.get("scores"))
    if scored:
        metrics.update(score_metrics(scored[-1][1]))
    summary = read_json(out / SUMMARY, {})
    for key in ("final_loss", "mean_loss"):  # the summary's own values win: they are what the run reported
        if summary.get(key) is not None:
            metrics[key] = summary[key]
    if summary:
        metrics.update(step=summary.get("steps"), train_time_s=summary.get("wall_time_s"))
    return metrics


def trial_record(out: Path) -> dict:
    """What the trial folder says about the trial: its RECORD, with status finished whenever the run finished."""
    record = read_json(out / RECORD, {})
    if (out / SUMMARY).is_file():
        record["status"] = "finished"
    return record


def run_trial(trial: Trial, report: Callable[[dict], None], stop_file: Path | None = None,
              report_steps: int = 10) -> dict:
    """Train one trial (or skip it when finished); returns, and reports last, its result with `status`."""
    out = Path(trial.dir)
    if stop_file is not None and stop_file.exists():
        return {"status": "not_started"}
    if (out / SUMMARY).is_file():
        result = {**folder_metrics(out), "status": "finished", "skipped": True}
        report(result)
        return result
    from dreambooth.config.schema import config_from_dict
    from dreambooth.export.output_dir import check_output_dir, mark_output_dir
    from dreambooth.training.checkpoint_store import latest_checkpoint
    from dreambooth.training.signals import Interrupted
    from dreambooth.training.trainer import run_training

    start = time.time()
    check_output_dir(str(out))
    mark_output_dir(out)
    record = read_json(out / RECORD, {})
    record.update(name=trial.name, settings=trial.settings, data=trial.data, status="running", pid=os.getpid(),
                  host=socket.gethostname(), attempts=record.get("attempts", 0) + 1)
    write_json(out / RECORD, record)
    data = copy.deepcopy(trial.data)
    if latest_checkpoint(out) is not None:  # a retry after a lost worker, or a rerun of a stopped sweep
        data["resume"] = "latest"
    seen = {"losses": [], "early": False, "scores": {}}

    def on_step(state, logs):
        seen["losses"] = state.losses
        scores = score_metrics(logs.get("validation"))  # only on a scored validation step: reported there
        seen["scores"].update(scores)
        if state.step % report_steps == 0 or scores:
            try:
                report({**loss_metrics(state.losses), **scores})
            except SystemExit:  # how Tune's report ends a trial its scheduler stops: checkpoint, then stop
                seen["early"] = True
                return "stopped early by the sweep's scheduler"
        if stop_file is not None and stop_file.exists():
            return "sweep stopped"
        return None

    try:
        summary = run_training(config_from_dict(data, f"trial {trial.name}"), on_step)
        result = {**folder_metrics(out), "status": "finished"}
        result.setdefault("step", summary["steps"])
    except Interrupted as e:
        result = {**loss_metrics(seen["losses"]), **seen["scores"],
                  "status": "early_stopped" if seen["early"] else "stopped",
                  "checkpoint": str(e.path) if e.path else None}
    except UserError as e:  # the same mistake again on a retry: no retry, the error goes in the summary
        result = {"status": "failed", "error": str(e)}
    except BaseException as e:  # a crash: Ray retries the trial (max_failures), which resumes from a checkpoint
        record.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0])
        record["wall_time_s"] = round(record.get("wall_time_s", 0) + time.time() - start, 3)
        write_json(out / RECORD, record)
        raise
    record.update(status=result["status"], error=result.get("error"))
    record["wall_time_s"] = round(record.get("wall_time_s", 0) + time.time() - start, 3)
    write_json(out / RECORD, record)
    result["wall_time_s"] = record["wall_time_s"]
    if not seen["early"]:  # Tune takes no report from a trial it has stopped
        report(result)
    return result


def prepare_class_images(trial: Trial) -> int:
    """Top up the class images of the trial's subjects (prior preservation); returns how many folders it checked."""
    from dreambooth.data.class_images import ensure_class_images
    return len(ensure_class_images(trial.config()))
