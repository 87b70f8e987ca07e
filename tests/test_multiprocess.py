"""Runs under `accelerate launch` with several processes: each process's own checkpoint state, the process count
on resume, per-subject stats across a resume, and gradient sync held back for every trained module."""

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import max_diff, second_subject, two_subjects
from safetensors.torch import load_file, save_file

from dreambooth.config import machine
from dreambooth.training import checkpoint, checkpoint_ranks, checkpoint_store
from dreambooth.training.resume import STATE
from dreambooth.cli import main
from dreambooth.errors import UserError
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.training.trainer import Trainer, run_training

BASE = {"model": "builtin:tiny", "resolution": TINY_RESOLUTION, "learning_rate": 1e-3, "gradient_checkpointing": False,
        "validation": {"enabled": False}, "quiet": True}


def fake_rank(monkeypatch, rank: int, count: int) -> None:
    """Make checkpoints see this process as process `rank` of `count`."""
    monkeypatch.setattr(checkpoint_ranks, "process_rank", lambda accelerator: (rank, count))


def write_config(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump({**BASE, **settings}))
    return path


# ----------------------------------------------------------------------------------------------- per-process state

def test_each_process_writes_and_restores_its_own_streams(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg(max_steps=2)).setup()
    streams = {}
    try:
        trainer.train()
        # Two processes played in turn: process 1 stages its state, then the main process writes the checkpoint.
        for rank in (1, 0):
            fake_rank(monkeypatch, rank, 2)
            trainer.state.generator.manual_seed(100 + rank)  # each process draws its own noise and timesteps
            torch.manual_seed(200 + rank)
            streams[rank] = trainer.state.generator.get_state(), torch.get_rng_state()
            path = trainer.checkpoints.save(trainer.state)
    finally:
        trainer.runlog.close()
    ranks = {f"rank-0000{i}.{ext}" for i in (0, 1) for ext in ("json", "safetensors")}
    assert ranks <= {p.name for p in path.iterdir()}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind
    assert json.loads((path / STATE).read_text())["num_processes"] == 2
    assert "rng" not in json.loads((path / STATE).read_text())  # per process only

    monkeypatch.setattr(machine, "launched_processes", lambda: 2)
    for rank in (0, 1):
        fake_rank(monkeypatch, rank, 2)
        resumed = Trainer(make_cfg(max_steps=2, resume="latest")).setup()
        resumed.runlog.close()
        gen, cpu = streams[rank]
        assert torch.equal(resumed.state.generator.get_state(), gen) and torch.equal(torch.get_rng_state(), cpu)


def test_a_checkpoint_from_before_per_process_files_still_resumes(make_cfg):
    """Older checkpoints kept the main process's RNG streams in state.json/state.safetensors."""
    trainer = Trainer(make_cfg(max_steps=2)).setup()
    try:
        trainer.train()
        stream = trainer.state.generator.get_state()
        path = trainer.checkpoints.save(trainer.state)
    finally:
        trainer.runlog.close()
    rank = json.loads((path / "rank-00000.json").read_text())
    state = json.loads((path / STATE).read_text())
    tensors = {**load_file(path / checkpoint.TENSORS), **load_file(path / "rank-00000.safetensors")}
    save_file(tensors, path / checkpoint.TENSORS)
    del state["num_processes"]
    (path / STATE).write_text(json.dumps({**state, "rng": rank["rng"]}))
    for f in path.glob("rank-*"):
        f.unlink()
    marker = path / checkpoint_store.COMPLETE  # nor did their marker record the files' checksums
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    resumed = Trainer(make_cfg(max_steps=2, resume="latest")).setup()
    resumed.runlog.close()
    assert torch.equal(resumed.state.generator.get_state(), stream)


def test_resume_with_another_process_count_is_refused(make_cfg, subject_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", output_dir=str(out), data={"dir": str(subject_dir)},
                          max_steps=2, checkpoint_steps=2, center_crop=True)
    assert main(["train", str(config)]) == 0
    written, _ = (out / "config.yaml").read_text(), capsys.readouterr()
    monkeypatch.setattr(machine, "launched_processes", lambda: 2)
    assert main(["train", str(config), "resume=latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "written by 1 process and this run has 2" in err and "resume_force" in err and "\n" not in err
    assert (out / "config.yaml").read_text() == written  # refused before anything was written
    # A launcher that set no WORLD_SIZE: the accelerator's count is checked when the state is loaded.
    monkeypatch.setattr(machine, "launched_processes", lambda: 1)
    fake_rank(monkeypatch, 0, 3)
    with pytest.raises(UserError, match="written by 1 process and this run has 3"):
        Trainer(make_cfg(output_dir=str(out), max_steps=2, checkpoint_steps=2, resume="latest")).setup()
    monkeypatch.undo()
    monkeypatch.setattr(machine, "launched_processes", lambda: 2)
    assert main(["train", str(config), "resume=latest", "resume_force=true"]) == 0


def test_subject_stats_survive_a_resume(make_cfg, subject_dir, tmp_path, monkeypatch):
    dog = second_subject(tmp_path)

    def cfg(name, **extra):
        return two_subjects(make_cfg, subject_dir, dog, output_dir=str(tmp_path / name), max_steps=5,
                            gradient_accumulation_steps=2, subject_sampling="weighted", **extra)
    straight = run_training(cfg("straight"))["subjects"]

    original = Trainer.after_step

    def killed_after_step_3(self, logs):  # as a hard kill would stop it, after the checkpoint at step 3
        original(self, logs)
        if self.state.step == 3:
            raise RuntimeError("killed")
    monkeypatch.setattr(Trainer, "after_step", killed_after_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_training(cfg("stopped", checkpoint_steps=3))
    monkeypatch.undo()
    saved = json.loads((tmp_path / "stopped/checkpoints/step-000003/rank-00000.json").read_text())["subjects"]
    assert sum(s["batches"] for s in saved.values()) == 3 * 2
    resumed = run_training(cfg("stopped", checkpoint_steps=3, resume="latest"))["subjects"]
    assert resumed.keys() == straight.keys() and sum(s["steps"] for s in resumed.values()) == 5
    for name, s in straight.items():
        assert resumed[name]["steps"] == s["steps"]
        assert resumed[name]["mean_loss"] == pytest.approx(s["mean_loss"], rel=1e-6, abs=0)
        assert resumed[name]["final_loss"] == pytest.approx(s["final_loss"], rel=1e-6, abs=0)


# ----------------------------------------------------------------------------------------------- gradient sync

@pytest.mark.parametrize("extra,held_back", [
    ({"train_text_encoder": True}, 2),
    # Sequential prior passes also hold back the instance pass of the last micro-batch: 2 + 3.
    ({"with_prior_preservation": True, "prior_mode": "sequential", "train_text_encoder": True,
      "num_class_images": 1, "class_sampling_steps": 1}, 5),
    ({"finetune": "lora", "lora.text_encoder": True}, 2),
], ids=["text-encoder", "sequential-prior", "lora-text-encoder"])
def test_no_sync_holds_back_every_trained_module(extra, held_back, make_cfg, monkeypatch):
    trainer = Trainer(make_cfg(gradient_accumulation_steps=3, max_steps=1, **extra)).setup()
    real_no_sync, entered = trainer.accelerator.no_sync, Counter()

    @contextmanager
    def recording_no_sync(model):
        entered[id(model)] += 1
        with real_no_sync(model):
            yield
    monkeypatch.setattr(trainer.accelerator, "no_sync", recording_no_sync)
    try:
        trainer.step.run(trainer.batches(), trainer.state)
    finally:
        trainer.runlog.close()
    # Micro-batches 1 and 2 of 3 hold back both trained modules; the last one syncs.
    assert entered == {id(trainer.unet): held_back, id(trainer.components.text_encoder): held_back}


# ----------------------------------------------------------------------------------------------- two real processes

def launch_two(config: Path) -> None:
    """`dreambooth train CONFIG` in two CPU processes (torchrun, gloo), as accelerate launch runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreambooth.cli", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_resume_exactly(subject_dir, tmp_path):
    """A 2-process run resumed from its step-3 checkpoint ends with the same weights as the run that went on."""
    run = {"data": {"dir": str(subject_dir)}, "max_steps": 6, "checkpoint_steps": 3, "train_text_encoder": True,
           "gradient_accumulation_steps": 2, "center_crop": False, "random_flip": True, "lr_scheduler": "cosine",
           "lr_warmup_steps": 2}
    launch_two(write_config(tmp_path / "straight.yaml", output_dir=str(tmp_path / "straight"), **run))
    step3 = tmp_path / "straight/checkpoints/step-000003"
    assert {"rank-00000.safetensors", "rank-00001.safetensors"} <= {p.name for p in step3.iterdir()}
    gens = [load_file(step3 / f"rank-0000{i}.safetensors")["rng.gen"] for i in (0, 1)]
    assert not torch.equal(*gens)  # each process has its own noise stream

    launch_two(write_config(tmp_path / "resumed.yaml", output_dir=str(tmp_path / "resumed"), resume=str(step3),
                            **run))
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / part), load_file(tmp_path / "resumed" / part)
        assert max_diff(a, b) <= 1e-6, part
    summaries = [json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("straight", "resumed")]
    assert summaries[0]["subjects"] == summaries[1]["subjects"]

