"""Damaged files and two runs in one folder: checksummed checkpoints (resume falls back past a damaged one, an
explicit damaged one is refused, pruning keeps an intact one), the output-folder and class-folder locks, and
damaged model, single-file, LoRA and class-image files."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import max_diff
from safetensors.torch import load_file

from dreambooth import checksums
from dreambooth.cli import main
from dreambooth.data import class_images as prior
from dreambooth.errors import UserError
from dreambooth.export.formats import save_single_file
from dreambooth.files import save_safetensors_atomic
from dreambooth.locks import LOCK, lock_folder
from dreambooth.models.builtin import TINY_RESOLUTION, build_tiny_pipeline
from dreambooth.models.lora import resolve_lora_file
from dreambooth.models.single_file import load_single_file
from dreambooth.training import checkpoint_store as store
from dreambooth.training.trainer import run_training

UNET = "unet/diffusion_pytorch_model.safetensors"
BASE = {"model": "builtin:tiny", "resolution": TINY_RESOLUTION, "learning_rate": 1e-3, "center_crop": True,
        "gradient_checkpointing": False, "validation": {"enabled": False}, "quiet": True}


def write_config(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump({**BASE, **settings}))
    return path


def flip_bit(path: Path, at: int | None = None) -> None:
    """Flip one bit in the middle of a file (or at byte `at`): same size, other content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def one_line_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error:"), err
    return err.splitlines()[-1]


def fake_checkpoint(out: Path, step: int, size: int = 10_000) -> Path:
    """A complete checkpoint folder holding one file of random bytes (what verification and pruning look at)."""
    def write(tmp: Path):
        (tmp / "weights.safetensors").write_bytes(os.urandom(size))
    return store.write_atomic(store.root_of(out) / f"step-{step:06d}", write,
                              {"format": store.FORMAT, "step": step, "keep": False})


# ----------------------------------------------------------------------------------------------- checkpoints

def test_truncated_newest_checkpoint_falls_back_and_ends_as_uninterrupted(make_cfg, caplog):
    cfg = make_cfg(max_steps=4, checkpoint_steps=2, keep_last=None, center_crop=False, random_flip=True)
    run_training(cfg)
    out = Path(cfg.output_dir)
    straight = load_file(out / UNET)
    truncate(out / "checkpoints/step-000004/weights.safetensors")
    with caplog.at_level(logging.INFO):
        assert run_training(make_cfg(max_steps=4, checkpoint_steps=2, keep_last=None, center_crop=False,
                                     random_flip=True, resume="latest"))["steps"] == 4
    assert "skipping damaged checkpoint" in caplog.text and "step-000004: weights.safetensors is" in caplog.text
    assert "resumed from" in caplog.text and "step-000002 at step 2" in caplog.text
    assert max_diff(straight, load_file(out / UNET)) <= 1e-6
    assert store.damage(out / "checkpoints/step-000004") is None  # written again, whole

    # A checkpoint from before checksums (no file records) still resumes, saying it could not be verified.
    marker = out / "checkpoints/step-000004" / store.COMPLETE
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("files", "checksum")}
    marker.write_text(json.dumps(old))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_training(make_cfg(max_steps=4, checkpoint_steps=2, center_crop=False, random_flip=True,
                              resume="latest"))
    assert "records no checksums" in caplog.text and "could not be verified" in caplog.text


def test_a_flipped_bit_is_caught_and_resume_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(checksums, "PIECE", 4096)  # several pieces in a small file
    older, newer = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    assert store.damage(newer) is None
    flip_bit(newer / "weights.safetensors", at=5000)
    assert store.damage(newer, full=False) is None  # same size: only the checksum tells
    assert store.damage(newer) == "weights.safetensors fails its checksum in bytes 4,096-8,192"
    with caplog.at_level(logging.WARNING):
        assert store.newest_intact(tmp_path) == older
    assert f"skipping damaged checkpoint {newer}: weights.safetensors fails its checksum" in caplog.text


def test_resume_from_a_damaged_path_is_refused_in_one_line(tmp_path, subject_dir, capsys):
    out = tmp_path / "out"
    damaged = fake_checkpoint(tmp_path / "earlier", 2)
    flip_bit(damaged / "weights.safetensors")
    config = write_config(tmp_path / "run.yaml", output_dir=str(out), data={"dir": str(subject_dir)}, max_steps=2)
    line = one_line_error(["train", str(config), f"resume={damaged}"], capsys)
    assert f"checkpoint {damaged} is damaged (weights.safetensors fails its checksum" in line
    assert "resume=latest" in line
    assert not out.exists()  # nothing written: the lock's file and the folder it made went with it


def test_prune_never_deletes_the_only_intact_checkpoint(tmp_path, caplog):
    paths = [fake_checkpoint(tmp_path, step) for step in (1, 2, 3)]
    for path in paths[1:]:
        truncate(path / "weights.safetensors")
    with caplog.at_level(logging.WARNING):
        assert store.prune(tmp_path, keep_last=1) == [paths[1]]
    assert [p.name for p in sorted(store.root_of(tmp_path).iterdir())] == ["step-000001", "step-000003"]
    assert "keeping checkpoint" in caplog.text
    fake_checkpoint(tmp_path, 4)  # an intact newer one: the old one may go now
    store.prune(tmp_path, keep_last=1)
    assert [p.name for p in store.root_of(tmp_path).iterdir()] == ["step-000004"]


# ----------------------------------------------------------------------------------------------- one run per folder

# The first run stops after its first step until the test creates GO (or kills it), so the timing is the test's.
PAUSED = """
import pathlib, sys, time
from dreambooth.training.trainer import Trainer
original = Trainer.after_step
def after_step(self, logs):
    original(self, logs)
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.05)
Trainer.after_step = after_step
from dreambooth.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_paused(config: Path, go: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", PAUSED, str(go), "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, out: Path) -> None:
    """Until the paused run is training (its log has a step) while holding the lock."""
    deadline = time.time() + 90
    while not ((out / "train.log").is_file() and "step 1/" in (out / "train.log").read_text()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the first run never started training"
        time.sleep(0.05)
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid


def hold_lock(folder: Path, until: Path) -> subprocess.Popen:
    """Another process holding FOLDER's lock (as a run does) until the file `until` exists; returns once it holds."""
    code = ("import os, sys, time; from dreambooth.locks import lock_folder; held = lock_folder(sys.argv[1], 'f', '')\n"
            "print('held', flush=True)\nwhile not os.path.exists(sys.argv[2]): time.sleep(0.02)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(until)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_while_the_first_finishes(tmp_path, subject_dir, capsys):
    run = {"data": {"dir": str(subject_dir)}, "max_steps": 2}
    first, go = tmp_path / "first", tmp_path / "go"
    proc = start_paused(write_config(tmp_path / "first.yaml", output_dir=str(first), seed=1, **run), go)
    try:
        wait_for_step(proc, first)
        # Another run into the busy folder (this process): refused in one line naming the first, nothing written.
        second = write_config(tmp_path / "second.yaml", output_dir=str(first), seed=2, **run)
        line = one_line_error(["train", str(second)], capsys)
        assert f"output_dir {first} is in use by process {proc.pid}" in line and "train" in line
        go.touch()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-2000:]
    finally:
        proc.kill()
    assert yaml.safe_load((first / "config.yaml").read_text())["seed"] == 1
    assert json.loads((first / "train_summary.json").read_text())["steps"] == 2
    assert not (first / LOCK).exists()


def test_a_run_after_a_killed_one_is_not_refused(tmp_path, subject_dir):
    out = tmp_path / "out"
    holder = hold_lock(out, tmp_path / "never")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK).exists()  # the file stays behind; the kernel let go of its lock
    config = write_config(tmp_path / "run.yaml", output_dir=str(out), data={"dir": str(subject_dir)}, max_steps=1)
    assert main(["train", str(config)]) == 0


def test_a_class_folder_in_use_refuses_classes_and_waits_in_training(subject_dir, tmp_path, capsys, caplog):
    folder, done = tmp_path / "classes", tmp_path / "done"
    holder = hold_lock(folder, done)
    try:
        config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), max_steps=1,
                              data={"dir": str(subject_dir), "class_data_dir": str(folder)}, num_class_images=1)
        line = one_line_error(["classes", str(config)], capsys)
        assert f"class folder {folder} is in use by process {holder.pid}" in line
        threading.Timer(0.3, done.touch).start()
        with caplog.at_level(logging.WARNING):
            lock_folder(folder, "class folder", "", wait=True).release()  # as training does: waits its turn
        assert f"is in use by process {holder.pid}" in caplog.text and "waiting for it to finish" in caplog.text
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()


# ----------------------------------------------------------------------------------------------- damaged files

def test_a_damaged_model_file_gets_the_damaged_file_message(tiny_model_dir, subject_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    truncate(model / UNET)
    config = write_config(tmp_path / "run.yaml", model=str(model), output_dir=str(tmp_path / "out"),
                          data={"dir": str(subject_dir)}, max_steps=1)
    size = f"{(model / UNET).stat().st_size:,} bytes"
    for args in (["train", str(config)], ["generate", str(model), "--prompt", "x", "--out-dir", str(tmp_path)]):
        line = one_line_error(args, capsys)
        assert f"model file {model / UNET} is damaged ({size};" in line and "download or copy it again" in line
        assert "pickle" not in line
    assert not (tmp_path / "out").exists()


def test_exported_single_and_lora_files_are_verified_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "PIECE", 4096)
    single = save_single_file(build_tiny_pipeline(seed=0), tmp_path / "model.safetensors")
    flip_bit(single)
    with pytest.raises(UserError, match=r"model file .* is damaged \(.* bytes; it fails its checksum in bytes"):
        load_single_file(single)
    lora = save_safetensors_atomic({"unet.a.lora_A.weight": torch.ones(4, 64)}, tmp_path / "lora.safetensors")
    assert resolve_lora_file(lora) == lora
    flip_bit(lora, at=lora.stat().st_size - 10)
    with pytest.raises(UserError, match="LoRA file .* is damaged .* download or copy it again"):
        resolve_lora_file(lora)


def test_a_damaged_class_image_is_sampled_again(make_cfg, subject_dir, caplog):
    cfg = make_cfg(with_prior_preservation=True, class_sampling_steps=1, num_class_images=2, sample_batch_size=2)
    first = prior.ensure_class_images(cfg)[0]
    folder = first[0].parent
    record = json.loads((folder / "manifest.json").read_text())["images"][first[0].name]
    assert record["size"] == first[0].stat().st_size and len(record["crc32"]) == 8
    flip_bit(first[0])
    with caplog.at_level(logging.WARNING):
        again = prior.ensure_class_images(cfg)[0]
    assert f"class image {first[0]} is damaged ({first[0].name} fails its checksum" in caplog.text
    assert first[0] not in again and first[1] in again and len(again) == 2 and not (folder / LOCK).exists()
