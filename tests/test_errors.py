"""Every bad input of `dreambooth train`: one line naming the input and the fix, exit code 2, nothing written."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dreambooth.cli import main
from dreambooth.models.builtin import TINY_RESOLUTION, build_tiny_pipeline

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def base_config(tmp_path, subject_dir) -> dict:
    return {"model": "builtin:tiny", "output_dir": str(tmp_path / "out"), "data": {"dir": str(subject_dir)},
            "resolution": TINY_RESOLUTION, "max_steps": 1, "gradient_checkpointing": False,
            "validation": {"enabled": False}, "quiet": True}


def info(text: str):
    def change(cfg, tmp_path, subject_dir):
        (subject_dir / "dataset_info.json").write_text(text)
    return change


def setting(**values):
    def change(cfg, tmp_path, subject_dir):
        cfg.update(values)
    return change


def empty_folder(cfg, tmp_path, subject_dir):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"instance_prompt": "a photo of sks toy"}))
    cfg["data"]["dir"] = str(folder)


def not_a_pipeline(cfg, tmp_path, subject_dir):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    cfg["model"] = str(tmp_path / "weights")


def pickle_file(cfg, tmp_path, subject_dir):
    (tmp_path / "sd21.ckpt").write_bytes(b"not opened")
    cfg["model"] = str(tmp_path / "sd21.ckpt")


def output_in_file(cfg, tmp_path, subject_dir):
    (tmp_path / "a-file").write_text("x")
    cfg["output_dir"] = str(tmp_path / "a-file" / "out")


def case(name, change, expected, *marks):
    return pytest.param(change, expected, id=name, marks=marks)


CASES = [
    case("missing data folder", setting(data={"dir": "/nonexistent/cats"}), "/nonexistent/cats does not exist"),
    case("folder without images", empty_folder, "no usable images"),
    case("dataset_info invalid JSON", info('{"instance_prompt": "a photo'), "is not valid JSON"),
    case("dataset_info wrong type", info('{"instance_prompt": 3}'), "'instance_prompt' must be a string"),
    case("dataset_info empty prompt", info('{"instance_prompt": "  "}'), "'instance_prompt' is empty"),
    case("dataset_info extra key", info('{"instance_prompt": "a sks toy", "seed": 1}'), "unknown key 'seed'"),
    case("yaml wrong type", setting(max_steps="many"), "'max_steps' expected a whole number"),
    case("yaml unknown key", setting(learning_rat=1e-4), "did you mean 'learning_rate'"),
    case("negative learning rate", setting(learning_rate=-1e-4), "'learning_rate' must be > 0"),
    case("max_steps 0", setting(max_steps=0), "'max_steps' must be >= 1"),
    case("resolution not multiple of 8", setting(resolution=30), "'resolution' must be a positive multiple of 8"),
    case("model not a diffusers folder", not_a_pipeline, "not a diffusers pipeline folder"),
    case("unknown hub id offline", setting(model="nobody/no-such-model-xyz"), "HF_HUB_OFFLINE"),
    case("pickle model file", pickle_file, "set allow_pickle: true if you trust it"),
    case("output_dir inside a file", output_in_file, "which is a file"),
    case("resume not a checkpoint", setting(resume="/nonexistent/step-000100"), "not a complete checkpoint folder"),
    case("adamw8bit without CUDA", setting(optimizer="adamw8bit"), "adamw8bit needs a CUDA GPU", no_cuda),
    case("fp16 without CUDA", setting(mixed_precision="fp16"), "fp16 needs a CUDA GPU", no_cuda),
    case("CUDA graphs with accumulation", setting(compile=True, compile_mode="reduce-overhead",
                                                 gradient_accumulation_steps=2), "set compile_mode: auto"),
]


def assert_refused(args, capsys, expected: str, out: Path):
    code = main(args)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(ours) == 1 and expected in ours[0], err
    assert err.strip().splitlines()[-1] == ours[0] and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"


@pytest.mark.parametrize("change,expected", CASES)
def test_bad_input_one_line_exit_2(change, expected, tmp_path, subject_dir, capsys):
    cfg = base_config(tmp_path, subject_dir)
    change(cfg, tmp_path, subject_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert_refused(["train", str(path)], capsys, expected, tmp_path / "out")


def test_invalid_yaml_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: builtin:tiny\ndata: [unclosed\n")
    assert_refused(["train", str(path)], capsys, "is not valid YAML", tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode folders")
def test_read_only_output_folder(tmp_path, subject_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        cfg = dict(base_config(tmp_path, subject_dir), output_dir=str(locked / "out"))
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        assert_refused(["train", str(tmp_path / "run.yaml")], capsys, "read-only", locked / "out")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_output_folder_on_read_only_filesystem(tmp_path, subject_dir, capsys):
    """/proc refuses new folders even to root, which os.access alone would wave through."""
    cfg = dict(base_config(tmp_path, subject_dir), output_dir="/proc/dreambooth-out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(["train", str(tmp_path / "run.yaml")], capsys, "read-only", Path("/proc/dreambooth-out"))


def test_pickle_weights_load_only_when_allowed(tmp_path, subject_dir, capsys):
    model = tmp_path / "pickled-model"
    build_tiny_pipeline().save_pretrained(model, safe_serialization=False)  # unet/vae as .bin (pickle)
    cfg = dict(base_config(tmp_path, subject_dir), model=str(model))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(["train", str(tmp_path / "run.yaml")], capsys, "allow_pickle: true", tmp_path / "out")
    # Allowed: diffusers and transformers then read .bin files with torch.load(weights_only=True).
    assert main(["train", str(tmp_path / "run.yaml"), "allow_pickle=true"]) == 0
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pkl")]


def test_override_mistake_names_the_command_line(tmp_path, subject_dir, capsys):
    """A bad value typed as key=value is the command line's, not the config file's it was applied to."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, subject_dir)))
    assert_refused(["train", str(path), "mixed_precision=maybe"], capsys,
                   "error: the command line (mixed_precision=maybe): 'mixed_precision' got 'maybe'", tmp_path / "out")
