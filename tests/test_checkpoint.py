"""Checkpoints: exact resume after an interruption, atomic writes, pruning, refusals, disk full and NaN steps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cuda, final_unet, max_diff
from safetensors.torch import load_file, save_file

from dreambooth.training import checkpoint, checkpoint_store, resume, signals
from dreambooth.training.step import TrainStep
from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.training.trainer import Trainer, run_training

# Random crops and flips, a warm-up plus cosine schedule and runs longer than an epoch (4 images), so a resume
# has a data position, an LR schedule and RNG streams to get right.
EXACT = {"center_crop": False, "random_flip": True, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "max_steps": 7}


def trained(out: Path) -> dict:
    """Every tensor of the final output (pipeline weights, LoRA files), keyed by file and name."""
    files = [f for f in sorted(out.rglob("*.safetensors")) if "checkpoints" not in f.relative_to(out).parts]
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(f).items()}


def interrupt_at(monkeypatch, step: int, sig=signal.SIGINT):
    """Send ourselves `sig` at the end of optimisation step `step`, as a user's Ctrl-C would arrive."""
    original = Trainer.after_step

    def after_step(self, logs):
        original(self, logs)
        if self.state.step == step:
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(Trainer, "after_step", after_step)


def steps_on_disk(out: Path) -> list[int]:
    return [step for step, _ in checkpoint_store.list_checkpoints(out)[0]]


# ----------------------------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("finetune,sig", [("full", signal.SIGINT), ("lora", signal.SIGTERM)],
                         ids=["full-SIGINT", "lora-SIGTERM"])
def test_interrupted_then_resumed_equals_uninterrupted(finetune, sig, make_cfg, tmp_path, monkeypatch):
    extra = dict(EXACT, finetune=finetune)
    straight = make_cfg(output_dir=str(tmp_path / "straight"), **extra)
    run_training(straight)

    cfg = make_cfg(output_dir=str(tmp_path / "stopped"), checkpoint_steps=2, **extra)
    interrupt_at(monkeypatch, 3, sig)
    with pytest.raises(signals.Interrupted) as stop:
        run_training(cfg)
    monkeypatch.undo()
    assert stop.value.step == 3 and stop.value.path.name == "step-000003" and stop.value.signal_name == sig.name
    assert steps_on_disk(cfg.output_dir) == [2, 3]
    assert not (Path(cfg.output_dir) / "unet").exists()  # no final model from a stopped run
    written = {p.suffix for p in stop.value.path.iterdir()}
    assert written <= {".safetensors", ".json"}  # never pickle

    resumed = make_cfg(output_dir=str(tmp_path / "stopped"), checkpoint_steps=2, resume="latest", **extra)
    summary = run_training(resumed)
    assert summary["steps"] == 7
    assert max_diff(trained(tmp_path / "straight"), trained(tmp_path / "stopped")) <= 1e-6


@cuda
@pytest.mark.gpu
def test_resume_equals_uninterrupted_with_8bit_adamw(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # same kernels both runs
    try:
        extra = dict(EXACT, optimizer="adamw8bit", mixed_precision="fp16")
        run_training(make_cfg(output_dir=str(tmp_path / "straight"), **extra))
        interrupt_at(monkeypatch, 3)
        with pytest.raises(signals.Interrupted):
            run_training(make_cfg(output_dir=str(tmp_path / "stopped"), **extra))
        monkeypatch.undo()
        state = json.loads((tmp_path / "stopped/checkpoints/step-000003" / resume.STATE).read_text())
        assert state["optimizer_name"] == "adamw8bit" and state["scaler"]
        run_training(make_cfg(output_dir=str(tmp_path / "stopped"), resume="latest", **extra))
        assert max_diff(final_unet(tmp_path / "straight"), final_unet(tmp_path / "stopped")) <= 1e-5
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def test_sigint_to_cli_subprocess_then_resume(subject_dir, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    # Enough micro-batches per step that the run is still going when the signal lands; the checkpoint at step 3
    # tells the test that the training loop (and its signal handler) is running.
    config.write_text(yaml.safe_dump({
        "model": "builtin:tiny", "output_dir": str(out), "data": {"dir": str(subject_dir)}, "resolution": 32,
        "max_steps": 18, "gradient_accumulation_steps": 4, "checkpoint_steps": 3, "learning_rate": 1e-3,
        "center_crop": True, "gradient_checkpointing": False, "validation": {"enabled": False}, "quiet": True}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth.cli", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not checkpoint_store.is_complete(out / "checkpoints" / "step-000003") and proc.poll() is None:
            assert time.time() < deadline, "training never wrote its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "resume with: dreambooth train" in err and "resume=latest" in err
    stopped_at = steps_on_disk(out)[-1]
    assert 3 <= stopped_at < 18 and f"checkpoint written: {out / 'checkpoints'}" in err
    assert main(["train", str(config), "resume=latest"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 18


# ----------------------------------------------------------------------------------------------- atomic writes

def test_failure_mid_save_leaves_previous_checkpoint_loadable(make_cfg, monkeypatch, caplog):
    cfg = make_cfg(checkpoint_steps=2, max_steps=4)
    real_save_file, calls = checkpoint.save_file, []

    def failing_save_file(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 4:  # the second checkpoint: weights written, optimizer state not
            raise RuntimeError("injected failure")
        real_save_file(tensors, path, **kw)
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(RuntimeError, match="injected"):
        run_training(cfg)
    monkeypatch.undo()
    root = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # the temp folder went too
    # A hard kill mid-write leaves a temp folder; a damaged folder has no marker: both are skipped, with a word.
    (root / ".step-000004.tmp-killed").mkdir()
    (root / "step-000006").mkdir()
    with caplog.at_level("WARNING"):
        assert checkpoint_store.latest_checkpoint(cfg.output_dir).name == "step-000002"
    assert "incomplete checkpoint" in caplog.text
    summary = run_training(make_cfg(checkpoint_steps=2, max_steps=4, resume="latest"))
    assert summary["steps"] == 4 and steps_on_disk(cfg.output_dir)[-2:] == [2, 4]


def test_keep_last_prunes_only_after_the_new_checkpoint_is_complete(make_cfg, monkeypatch):
    cfg = make_cfg(checkpoint_steps=1, max_steps=5, keep_last=2)
    real_prune, seen = checkpoint_store.prune, []

    def spy(out, keep_last):
        seen.append(steps_on_disk(out))
        return real_prune(out, keep_last)
    monkeypatch.setattr(checkpoint_store, "prune", spy)
    run_training(cfg)
    assert seen == [[1], [1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]  # each new one complete before pruning
    assert steps_on_disk(cfg.output_dir) == [4, 5]


def test_prune_spares_checkpoints_marked_keep(tmp_path):
    for step in (1, 2, 3):
        checkpoint_store.write_atomic(checkpoint_store.root_of(tmp_path) / f"step-{step:06d}", lambda tmp: None,
                                      {"format": checkpoint_store.FORMAT, "step": step, "keep": step == 1})
    (checkpoint_store.root_of(tmp_path) / ".step-000004.tmp-stale").mkdir()
    checkpoint_store.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in checkpoint_store.root_of(tmp_path).iterdir()) == ["step-000001", "step-000003"]


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    """The layout of an 8-bit optimizer's state: int keys, tuples, uint8 tensors, one qmap shared by all."""
    qmap = torch.linspace(-1, 1, 256)
    state = {"state": {0: {"step": 3, "state1": torch.arange(8, dtype=torch.uint8), "qmap1": qmap,
                           "absmax1": torch.rand(2)},
                       1: {"step": 3, "state1": torch.rand(4), "qmap1": qmap, "absmax1": torch.rand(1)}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]}
    tensors = {}
    packed = json.loads(json.dumps(checkpoint_store.pack(state, "optimizer", tensors, {})))
    save_file(tensors, tmp_path / "t.safetensors")
    back = checkpoint_store.unpack(packed, load_file(tmp_path / "t.safetensors"))
    assert set(back["state"]) == {0, 1} and back["param_groups"][0]["betas"] == (0.9, 0.999)
    for i in (0, 1):
        for key, value in state["state"][i].items():
            assert torch.equal(torch.as_tensor(back["state"][i][key]), torch.as_tensor(value))
    assert len(tensors) == 5  # the shared qmap stored once


# ----------------------------------------------------------------------------------------------- refusals

def test_resume_refuses_changed_training_settings(make_cfg, tmp_path, capsys):
    run_training(make_cfg(checkpoint_steps=2, max_steps=2))
    out = Path(make_cfg().output_dir)
    config_before = (out / "config.yaml").read_text()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "builtin:tiny", "output_dir": str(out), "data": {"dir": make_cfg().data.dir}, "resolution": 32,
        "max_steps": 2, "learning_rate": 1e-3, "center_crop": True, "gradient_checkpointing": False,
        "validation": {"enabled": False}, "quiet": True, "checkpoint_steps": 2}))
    assert main(["train", str(config), "resume=latest", "learning_rate=5e-4", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.001 -> 0.0005" in err and "seed: 0 -> 3" in err and "resume_force" in err
    assert (out / "config.yaml").read_text() == config_before  # nothing written
    # A fresh run must not mix with (or prune) the old run's checkpoints.
    assert main(["train", str(config)]) == 2
    assert "resume=latest" in capsys.readouterr().err
    # Cadence, logging and patience do not change the math; resume_force overrides the rest.
    assert main(["train", str(config), "resume=latest", "checkpoint_steps=5", "nan_patience=3", "keep_last=4"]) == 0
    assert main(["train", str(config), "resume=latest", "max_steps=3", "resume_force=true"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3


def test_disk_full_stops_cleanly_or_continues(make_cfg, tmp_path, monkeypatch):
    real_free = checkpoint_store.free_bytes
    monkeypatch.setattr(checkpoint_store, "free_bytes",
                        lambda path: 0 if steps_on_disk(path.parent) else real_free(path))
    cfg = make_cfg(checkpoint_steps=2, max_steps=4)
    with pytest.raises(UserError, match="not enough disk space.*step-000002 is intact.*on_disk_full"):
        run_training(cfg)
    assert steps_on_disk(cfg.output_dir) == [2] and not (Path(cfg.output_dir) / "unet").exists()

    monkeypatch.setattr(checkpoint_store, "free_bytes", lambda path: 0)
    cfg = make_cfg(output_dir=str(tmp_path / "go-on"), checkpoint_steps=2, max_steps=4, on_disk_full="continue")
    assert run_training(cfg)["steps"] == 4
    assert steps_on_disk(cfg.output_dir) == [] and (Path(cfg.output_dir) / "unet").is_dir()


def test_disk_full_while_staging_a_process_state_follows_on_disk_full(make_cfg, tmp_path, monkeypatch):
    import errno

    from dreambooth.training import checkpoint_ranks

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_ranks, "save_file", full)
    cfg = make_cfg(output_dir=str(tmp_path / "go-on"), checkpoint_steps=2, max_steps=4, on_disk_full="continue")
    assert run_training(cfg)["steps"] == 4
    assert steps_on_disk(cfg.output_dir) == [] and (Path(cfg.output_dir) / "unet").is_dir()
    assert not any(p.name.endswith(".ranks") for p in (Path(cfg.output_dir) / "checkpoints").glob(".*"))
    with pytest.raises(UserError, match="not enough disk space.*could not write its state.*on_disk_full"):
        run_training(make_cfg(output_dir=str(tmp_path / "stop"), checkpoint_steps=2, max_steps=4))


# ----------------------------------------------------------------------------------------------- bad numbers

def test_nan_steps_stop_with_advice_and_no_nan_weights(make_cfg, monkeypatch):
    original, steps = TrainStep.forward_loss, []

    def poisoned(self, batch, generator):
        losses = original(self, batch, generator)
        steps.append(1)
        if len(steps) > 2:  # from the third step on (one batch a step), every loss (so every gradient) is NaN
            losses["loss"] = losses["loss"] * float("nan")
        return losses
    monkeypatch.setattr(TrainStep, "forward_loss", poisoned)
    cfg = make_cfg(checkpoint_steps=2, max_steps=20, nan_patience=3)
    with pytest.raises(UserError) as err:
        run_training(cfg)
    message = str(err.value)
    assert "NaN" in message and "bf16" in message and "learning_rate" in message and "step-000002" in message
    assert "\n" not in message
    assert steps_on_disk(cfg.output_dir) == [2]  # no checkpoint written inside the NaN streak
    weights = load_file(Path(cfg.output_dir) / "checkpoints/step-000002" / checkpoint.WEIGHTS)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (Path(cfg.output_dir) / "unet").exists()


def test_nan_weights_are_never_written(make_cfg):
    trainer = Trainer(make_cfg(max_steps=1)).setup()
    try:
        trainer.train()
        name, param = trainer.checkpoints.named[0]
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        with pytest.raises(UserError, match=f"NaN/inf.*{name}"):
            trainer.checkpoints.save(trainer.state)
        assert steps_on_disk(trainer.out) == []
    finally:
        trainer.runlog.close()


def test_half_precision_trainable_weights_are_upcast(make_cfg, monkeypatch):
    import dreambooth.training.trainer as train_module
    original = train_module.load_components

    def half(cfg):
        c = original(cfg)
        c.unet.half()
        return c
    monkeypatch.setattr(train_module, "load_components", half)
    dtypes, real_setup = [], Trainer.setup

    def setup(trainer):  # setup is where the trainable weights take their dtype
        real_setup(trainer)
        dtypes.append({p.dtype for p in trainer.step.params})
        return trainer
    monkeypatch.setattr(Trainer, "setup", setup)
    assert run_training(make_cfg(max_steps=1))["steps"] == 1
    assert dtypes == [{torch.float32}]


def test_a_checkpoint_from_before_a_new_key_resumes_at_its_default(make_cfg):
    """Keys added to the schema after a checkpoint was written are absent from its settings: at their defaults
    they change nothing, so the resume goes ahead; set to anything else, it is refused as a change."""
    run_training(make_cfg(checkpoint_steps=2, max_steps=2))
    folder = checkpoint_store.latest_checkpoint(make_cfg().output_dir)
    state = json.loads((folder / resume.STATE).read_text())
    assert state["settings"].pop("random_flip") is False  # as if written before random_flip existed
    (folder / resume.STATE).write_text(json.dumps(state))
    marker = folder / checkpoint_store.COMPLETE  # and before checksums: its marker records no files
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    assert run_training(make_cfg(checkpoint_steps=2, max_steps=2, resume="latest"))["steps"] == 2
    with pytest.raises(UserError, match="random_flip: False -> True"):
        Trainer(make_cfg(checkpoint_steps=2, max_steps=2, resume="latest", random_flip=True))


def test_checkpoint_from_before_a_new_key_resumes_as_its_default():
    old = resume.default_settings()
    for key in ("noise_offset", "loss_weighting"):  # keys a checkpoint written before them lacks
        del old[key]
    assert resume.settings_differences(old, resume.default_settings()) == []
    assert resume.settings_differences(old, {**resume.default_settings(), "noise_offset": 0.1}) == \
        ["noise_offset: 0.0 -> 0.1"]
