"""The sweep driver on Ray Tune, the only module that imports Ray (`pip install "dreambooth[sweep]"`): trials as Tune
trials with one GPU each, retries of lost workers (each retry resumes from the trial's latest checkpoint), optional
early stopping, Ctrl-C that stops every trial with a checkpoint, and the summary at the end."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dreambooth.errors import UserError
from dreambooth.export.output_dir import MARKER as RUN_MARKER
from dreambooth.files import read_json
from dreambooth.files import write_json_atomic as write_json
from dreambooth.sweep.grid import Trial, class_image_jobs, training_differences
from dreambooth.sweep.summary import earlier_rows, trial_row, write_summary
from dreambooth.sweep.trial import (DONE, RECORD, STOP_FILE, check_metric, metric_mode, prepare_class_images,
                                    run_trial, trial_record)

try:
    import ray
    from ray import tune
except ImportError:  # the error names the extra to install
    raise UserError('dreambooth sweep needs Ray: pip install "dreambooth[sweep]"') from None

log = logging.getLogger(__name__)
SWEEP_MARKER = "dreambooth_sweep.json"  # marks a folder as a sweep of ours, so reruns may write into it
SCHEDULERS = ("asha", "median")


@dataclass
class SweepResult:
    rows: list[dict]
    best: str | None
    stopped: bool = False  # Ctrl-C (or the STOP file) ended it early: rerun the command to go on
    trial_times: dict[str, float] = field(default_factory=dict)  # driver-side start -> end of each trial run now
    ray_start_s: float = 0.0


# ----------------------------------------------------------------------------------------------- the sweep folder

def prepare_folder(sweep_dir: Path, trials: list[Trial], command: str | None) -> list[Trial]:
    """Check and mark the sweep folder; returns the trials still to run (a rerun skips finished ones)."""
    if (sweep_dir / RUN_MARKER).is_file():
        raise UserError(f"output_dir {sweep_dir} holds a training run, not a sweep: choose another output_dir")
    if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not (sweep_dir / SWEEP_MARKER).is_file():
        raise UserError(f"output_dir {sweep_dir} is not empty and is not a dreambooth sweep: choose a new output_dir")
    todo = []
    for t in trials:
        record = trial_record(Path(t.dir))
        if record.get("data") is not None:
            diffs = training_differences(record["data"], t.data)
            if diffs:
                raise UserError(f"trial {t.name} in {sweep_dir} was trained with other settings ({'; '.join(diffs)}): "
                                "rerun the sweep into a new output_dir, or delete that trial's folder")
        if record.get("status") not in DONE:
            todo.append(t)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / SWEEP_MARKER, {"tool": "dreambooth", "command": command, "trials": [t.name for t in trials]})
    (sweep_dir / STOP_FILE).unlink(missing_ok=True)  # a new run of the sweep goes on where the last one stopped
    return todo


class StopOnSignal:
    """The first Ctrl-C/SIGTERM writes the STOP file (each trial checkpoints after its step and ends, trials not yet
    started are skipped); a second one aborts at once."""

    def __init__(self, stop_file: Path):
        self.stop_file, self.old, self.requested = stop_file, {}, False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.stop_file.write_text(signal.Signals(signum).name)
        print(f"\n{signal.Signals(signum).name}: stopping the sweep: each running trial finishes its step and writes "
              "a checkpoint (press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- Ray Tune

def tune_trial(config: dict, trials: dict | None = None, stop_file: str = "", report_steps: int = 10,
               trial_fn: Callable | None = None) -> None:
    """A Tune function trainable: the trial named config["trial"], reporting through tune.report."""
    (trial_fn or run_trial)(trials[config["trial"]], tune.report, Path(stop_file), report_steps)


class Recorder(tune.Callback):
    """Driver-side facts per trial: when it started and ended, its last result, retries, its final error."""

    def __init__(self):
        self.start, self.end, self.last, self.errors, self.retries = {}, {}, {}, {}, {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start.setdefault(trial.config["trial"], time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.config["trial"]] = result

    def on_trial_recover(self, iteration, trials, trial, **info):
        name = trial.config["trial"]
        self.retries[name] = self.retries.get(name, 0) + 1
        log.warning("trial %s lost its worker; retrying it from its latest checkpoint", name)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end[trial.config["trial"]] = time.time()

    def on_trial_error(self, iteration, trials, trial, **info):
        name = trial.config["trial"]
        self.end[name] = time.time()
        self.errors[name] = str(trial.error_file or "the trial failed")


def connect(address: str | None, num_cpus: int | None = None) -> tuple[bool, float]:
    """Join the cluster at `address`, else start a local Ray; (started here, seconds it took)."""
    start = time.time()
    if ray.is_initialized():
        return False, 0.0
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")  # a CPU trial sees no GPU
    kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    try:
        ray.init(log_to_driver=False, **kwargs)
    except ConnectionError as e:
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({e}); start one with "
                        "`ray start --head` or leave --address out to run on this machine") from None
    return not address, time.time() - start


def scheduler_for(name: str | None, metric: str, mode: str, trials: list[Trial], grace_steps: int | None):
    """ASHA or the median stopping rule on `metric` against the trial's step; None for no early stopping."""
    if not name:
        return None
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name}: choose {' or '.join(SCHEDULERS)}")
    steps = [t.data.get("max_steps") for t in trials]
    max_t = max(steps) if all(isinstance(s, int) for s in steps) else 10**6  # epoch-based runs: no known end
    grace = grace_steps or max(1, min(steps) // 4 if max_t < 10**6 else 50)
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
    if name == "asha":
        # stop_last_trials off: a trial at its last step finishes (and saves) on its own, it is not "stopped".
        return ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max_t, grace_period=min(grace, max_t),
                             reduction_factor=2, stop_last_trials=False)
    return MedianStoppingRule(time_attr="step", metric=metric, mode=mode, grace_period=grace)


def run_sweep(trials: list[Trial], sweep_dir: Path, *, metric: str = "final_loss", mode: str | None = None,
              address: str | None = None, num_cpus: int | None = None, gpus_per_trial: float | None = None,
              cpus_per_trial: float = 1, scheduler: str | None = None, grace_steps: int | None = None,
              max_failures: int = 2, max_concurrent: int | None = None, report_steps: int = 10,
              command: str | None = None, trial_fn: Callable | None = None, verbose: int = 1) -> SweepResult:
    """Run the trials not yet finished on Ray Tune, then write the summary of all of them. mode: min or max,
    by default the metric's own (max for DINO, CLIP-I, CLIP-T)."""
    check_metric(metric, trials)
    mode = mode or metric_mode(metric)
    sweep_dir = Path(sweep_dir).resolve()
    earlier = earlier_rows(sweep_dir)
    todo = prepare_folder(sweep_dir, trials, command)
    result = SweepResult([], None)
    recorder = Recorder()
    if todo:
        result.stopped, result.ray_start_s = _fit(todo, sweep_dir, recorder, metric, mode, address, num_cpus,
                                                  gpus_per_trial, cpus_per_trial, scheduler, grace_steps,
                                                  max_failures, max_concurrent, report_steps, trial_fn, verbose)
    for name, start in recorder.start.items():
        result.trial_times[name] = round(recorder.end.get(name, time.time()) - start, 3)
    rows = []
    for t in trials:
        reported = recorder.last.get(t.name)
        _record_outcome(t, reported, recorder.errors.get(t.name), recorder.retries.get(t.name, 0))
        rows.append(trial_row(t, reported, earlier.get(t.name)))
    result.rows = rows
    result.best = write_summary(sweep_dir, trials, rows, metric, mode, command)
    return result


def _fit(todo, sweep_dir, recorder, metric, mode, address, num_cpus, gpus_per_trial, cpus_per_trial, scheduler,
         grace_steps, max_failures, max_concurrent, report_steps, trial_fn, verbose) -> tuple[bool, float]:
    started, ray_start_s = connect(address, num_cpus)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        per_trial = gpus_per_trial if gpus_per_trial is not None else (1 if gpus else 0)
        if per_trial > gpus and not address:
            raise UserError(f"--gpus-per-trial {per_trial:g}, but this machine's Ray sees {gpus:g} GPUs: use "
                            "--gpus-per-trial 0 for CPU trials, or join a cluster with GPUs (--address)")
        resources = {"cpu": cpus_per_trial, "gpu": per_trial}
        _class_images(todo, resources)
        stop_file = sweep_dir / STOP_FILE
        trainable = tune.with_resources(
            tune.with_parameters(tune_trial, trials={t.name: t for t in todo}, stop_file=str(stop_file),
                                 report_steps=report_steps, trial_fn=trial_fn), resources)
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search([t.name for t in todo])},
            tune_config=tune.TuneConfig(scheduler=scheduler_for(scheduler, metric, mode, todo, grace_steps),
                                        max_concurrent_trials=max_concurrent, reuse_actors=True,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=".ray", storage_path=str(sweep_dir), callbacks=[recorder],
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      verbose=verbose))
        # Ours, not Tune's, SIGINT handler: Tune's would end trials without their checkpoint.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        # A trial's last report (failed, stopped) may lack the metric: that is an answer, not a mistake.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        with StopOnSignal(stop_file) as stop:
            tuner.fit()
        return stop.requested or stop_file.exists(), ray_start_s
    finally:
        if started:
            ray.shutdown()


def _trial_name(trial) -> str:
    """Tune's name and folder for a trial: ours (module-level, so Tune can pickle the experiment state)."""
    return trial.config["trial"]


def _class_images(todo: list[Trial], resources: dict) -> None:
    """Top up class images (prior preservation) once per subject, on the trials' kind of worker, before trials."""
    jobs = class_image_jobs(todo)
    if jobs:
        log.info("topping up class images for %d subject folder(s) before the trials", len(jobs))
        task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(prepare_class_images)
        ray.get([task.remote(t) for t in jobs])


def _record_outcome(trial: Trial, last: dict | None, error: str | None, retries: int) -> None:
    """Write what only the driver knows into the trial's record: stopped early by the scheduler, or failed for good."""
    if last is None and error is None:
        return  # not run now (skipped as finished, or never started)
    path = Path(trial.dir) / RECORD
    record = read_json(path, {})
    if error is not None:
        record.update(status="error", error=f"failed {retries + 1} times; Ray's error file: {error}")
    elif last is not None and "status" not in last and record.get("status") == "running":
        record.update(status="early_stopped")  # the scheduler ended it: its last report had no final status
    else:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
