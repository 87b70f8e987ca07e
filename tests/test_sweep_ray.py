"""Sweeps on a real local Ray (2 CPUs, loopback only, one per module): four trials with a worker killed mid-run,
the summary and best pick, reruns that skip finished trials, and Ctrl-C on the driver."""

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import final_unet, max_diff

from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.sweep import grid, summary
from dreambooth.sweep.trial import RECORD, STOP_FILE, run_trial
from dreambooth.training.trainer import run_training

ray = pytest.importorskip("ray")
from dreambooth.sweep import engine  # noqa: E402  (needs Ray)

KILLED = "learning_rate-1e-3,max_steps-4"  # this trial's worker is killed at step 3, after its step-2 checkpoint


@pytest.fixture(scope="module")
def local_ray():
    # The trial functions below travel by value: the workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def base(out, subject, **extra) -> dict:
    # Random crops and flips and a warm-up + cosine schedule: a resume has data order, RNG and LR to get right.
    return {"model": "builtin:tiny", "output_dir": str(out), "data": {"dir": str(subject)},
            "resolution": TINY_RESOLUTION, "random_flip": True, "lr_scheduler": "cosine", "lr_warmup_steps": 1,
            "gradient_checkpointing": False, "validation": {"enabled": False}, **extra}


def killed_once(trial, report, stop_file, report_steps):
    """The normal trial, except that KILLED's worker process dies (SIGKILL) at step 3 of its first attempt."""
    marker = Path(trial.dir) / "killed-once"

    def report_or_die(metrics):
        report(metrics)
        if trial.name == KILLED and metrics.get("step") == 3 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return run_trial(trial, report_or_die, stop_file, report_steps)


@pytest.fixture(scope="module")
def four_trials(local_ray, tmp_path_factory):
    from dreambooth.demo import write_demo_dataset
    root = tmp_path_factory.mktemp("sweep")
    subject = write_demo_dataset(root / "subject", n=4, size=48)
    trials = grid.expand(base(root / "sweep", subject), grid.parse_grid(["learning_rate=[1e-3,1e-4]",
                                                                          "max_steps=[2,4]"]), checkpoint_steps=2)
    result = engine.run_sweep(trials, root / "sweep", gpus_per_trial=0, report_steps=1, trial_fn=killed_once,
                              command="dreambooth sweep base.yaml", verbose=0)
    return root, trials, result


def test_four_trial_sweep_folders_summary_and_best(four_trials):
    root, trials, result = four_trials
    sweep = root / "sweep"
    assert [t.name for t in trials] == ["learning_rate-1e-3,max_steps-2", KILLED, "learning_rate-1e-4,max_steps-2",
                                        "learning_rate-1e-4,max_steps-4"]
    for t in trials:  # each a normal run folder
        out = Path(t.dir)
        assert out.parent == sweep
        for name in ("config.yaml", "train_summary.json", "report.html", "model_index.json", "loss_history.json"):
            assert (out / name).is_file(), (t.name, name)
        assert json.loads((out / "train_summary.json").read_text())["steps"] == t.data["max_steps"]
    rows = {r["trial"]: r for r in json.loads((sweep / summary.JSON).read_text())["trials"]}
    assert all(r["status"] == "finished" for r in rows.values())
    assert [rows[t.name]["attempts"] for t in trials] == [1, 2, 1, 1]
    losses = {name: r["final_loss"] for name, r in rows.items()}
    best = min(losses, key=losses.get)
    assert result.best == best and json.loads((sweep / summary.JSON).read_text())["best"] == best
    assert [r["best"] for r in result.rows] == [r["trial"] == best for r in result.rows]
    assert (sweep / summary.CSV).read_text().count("\n") == 5
    assert f"<b>{best}</b>" in (sweep / summary.HTML).read_text()
    assert set(result.trial_times) == set(losses) and all(s > 0 for s in result.trial_times.values())


def test_killed_worker_retries_from_its_checkpoint_to_the_same_weights(four_trials, tmp_path):
    root, trials, result = four_trials
    killed = next(t for t in trials if t.name == KILLED)
    assert (Path(killed.dir) / "killed-once").exists()
    history = json.loads((Path(killed.dir) / "loss_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    alone = dict(killed.data, output_dir=str(tmp_path / "alone"), checkpoint_steps=None)
    run_training(grid.Trial("alone", str(tmp_path / "alone"), {}, alone).config())
    assert max_diff(final_unet(killed.dir), final_unet(tmp_path / "alone")) <= 1e-6


def test_rerun_skips_finished_trials(four_trials):
    root, trials, _ = four_trials
    weights = Path(trials[0].dir) / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.time()
    again = engine.run_sweep(trials, root / "sweep", gpus_per_trial=0, verbose=0)
    assert time.time() - start < 5 and again.trial_times == {}  # no trial was handed to Ray
    assert weights.stat().st_mtime_ns == mtime and again.best == four_trials[2].best
    changed = [grid.Trial(t.name, t.dir, t.settings, dict(t.data, seed=1)) for t in trials]
    with pytest.raises(UserError, match="trained with other settings .*seed: 0 -> 1"):
        engine.run_sweep(changed, root / "sweep", gpus_per_trial=0, verbose=0)


def test_the_command_reruns_a_finished_sweep(four_trials, tmp_path, capsys):
    root, trials, result = four_trials
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in trials[0].data.items()
                                      if k not in ("output_dir", "learning_rate", "max_steps", "checkpoint_steps")}))
    args = ["sweep", str(config), f"output_dir={root / 'sweep'}", "--grid", "learning_rate=[1e-3,1e-4]",
            "--grid", "max_steps=2,4", "--checkpoint-steps", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sweep: 4 trial(s)" in out and out.count(": finished, final_loss") == 4
    assert f"* {result.best}: finished" in out and f"best by final_loss: {root / 'sweep' / result.best}" in out
    assert json.loads((root / "sweep" / summary.JSON).read_text())["command"] == "dreambooth " + shlex.join(args)


def presses_ctrl_c(driver: int):
    """A trial function for the driver's side of Ctrl-C, without training (test_sweep.py checks that a trial
    checkpoints when the STOP file appears): the first trial presses Ctrl-C on the driver and waits for the STOP
    file, as a training trial would before its next step; the rest run as usual and see the STOP file first."""
    def trial_fn(trial, report, stop_file, report_steps):
        if trial.settings["seed"] != 0:
            return run_trial(trial, report, stop_file, report_steps)
        report({"step": 1, "final_loss": 1.0})
        os.kill(driver, signal.SIGINT)
        deadline = time.time() + 60
        while not stop_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        Path(trial.dir).mkdir(parents=True)
        (Path(trial.dir) / RECORD).write_text(json.dumps({"status": "stopped", "attempts": 1}))
        report({"step": 1, "final_loss": 1.0, "status": "stopped"})
        return {"status": "stopped"}
    return trial_fn


def test_ctrl_c_on_the_driver_stops_the_sweep(local_ray, tmp_path, subject_dir):
    trials = grid.expand(base(tmp_path / "sweep", subject_dir, max_steps=6), grid.parse_grid(["seed=[0,1]"]))
    result = engine.run_sweep(trials, tmp_path / "sweep", gpus_per_trial=0, max_concurrent=1,
                              trial_fn=presses_ctrl_c(os.getpid()), verbose=0)
    assert result.stopped and (tmp_path / "sweep" / STOP_FILE).read_text() == "SIGINT"
    assert [r["status"] for r in result.rows] == ["stopped", "not_started"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the driver's handler is put back
    # Rerunning the command goes on: the STOP file of the stopped run is cleared first.
    assert engine.prepare_folder(tmp_path / "sweep", trials, None) == trials
    assert not (tmp_path / "sweep" / STOP_FILE).exists()


def fixed_losses(trial, report, stop_file, report_steps):
    """A trial without training for the scheduler's wiring: losses as its seed says (1.0 or 5.0), steps 1 to 8."""
    Path(trial.dir).mkdir(parents=True)
    (Path(trial.dir) / RECORD).write_text(json.dumps({"status": "running", "attempts": 1}))
    loss = 1.0 if trial.settings["seed"] == 0 else 5.0
    for step in range(1, 9):
        report({"step": step, "final_loss": loss})
    (Path(trial.dir) / RECORD).write_text(json.dumps({"status": "finished", "attempts": 1}))
    report({"step": 8, "final_loss": loss, "status": "finished"})


def test_asha_stops_the_trial_behind_at_its_first_rung(local_ray, tmp_path, subject_dir):
    trials = grid.expand(base(tmp_path / "sweep", subject_dir, max_steps=8), grid.parse_grid(["seed=[0,1]"]))
    result = engine.run_sweep(trials, tmp_path / "sweep", gpus_per_trial=0, max_concurrent=1, scheduler="asha",
                              grace_steps=2, trial_fn=fixed_losses, verbose=0)
    assert [(r["status"], r["steps"]) for r in result.rows] == [("finished", 8), ("early_stopped", 2)]
    assert result.best == trials[0].name


def test_stop_on_signal_first_stops_second_aborts(tmp_path):
    stop_file, before = tmp_path / STOP_FILE, signal.getsignal(signal.SIGTERM)
    with engine.StopOnSignal(stop_file) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop_file.read_text() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
