"""Validation images: default prompts and steps, grid sizes, that validating leaves training untouched,
the log file and the TensorBoard tracker."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal, cuda
from PIL import Image

from dreambooth.config.schema import ValidationConfig
from dreambooth.errors import UserError
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.training.trainer import Trainer
from dreambooth.training.validation import config_prompts, default_prompts, label_bands, make_grid, validation_steps

FAST = {"validation.enabled": True, "validation.num_inference_steps": 2}


def test_default_prompts_follow_jumpstart_guide():
    assert default_prompts([("a photo of sks dog", "a photo of a dog")]) == [
        "a photo of sks dog", "a photo of sks dog on the beach", "a pencil sketch of sks dog", "a photo of a dog"]
    # No class prompt: three prompts; a prompt without "a photo of" is sketched as written.
    assert default_prompts([("sks dog", None)]) == ["sks dog", "sks dog on the beach", "a pencil sketch of sks dog"]
    # Several subjects: each subject's prompts, a shared class prompt once.
    two = default_prompts([("a photo of sks dog", "a photo of a dog"), ("a photo of zwx dog", "a photo of a dog")])
    assert len(two) == 7 and two.count("a photo of a dog") == 1 and "a pencil sketch of zwx dog" in two


def test_config_prompts_read_dataset_info_and_overrides(make_cfg):
    assert config_prompts(make_cfg()) == ["a photo of riobugger toy", "a photo of riobugger toy on the beach",
                                          "a pencil sketch of riobugger toy", "a photo of a toy"]
    assert config_prompts(make_cfg(**{"data.class_prompt": "a toy"}))[-1] == "a toy"
    assert config_prompts(make_cfg(**{"validation.prompts": ["x", "y"]})) == ["x", "y"]


def test_validation_steps():
    v = ValidationConfig()
    assert validation_steps(v, 1000) == [50, 100, 200, 400, 800, 1000]
    assert validation_steps(v, 300) == [50, 100, 200, 300]  # clipped to the run, final step added
    assert validation_steps(v, 800) == [50, 100, 200, 400, 800]
    assert validation_steps(v, 4) == [4]
    assert validation_steps(ValidationConfig(every_n_steps=3), 10) == [3, 6, 9, 10]
    assert validation_steps(ValidationConfig(steps=[7, 2, 99]), 10) == [2, 7]  # as given, beyond the run dropped


def test_grid_has_rows_by_cols_cells_of_image_size():
    w, h = 40, 30
    colors = [[(r * 100, c * 80, 50) for c in range(3)] for r in range(2)]
    rows = [[Image.new("RGB", (w, h), col) for col in row] for row in colors]
    plain = make_grid(rows)
    assert plain.size == (3 * w, 2 * h)
    for r in range(2):
        for c in range(3):
            assert plain.getpixel((c * w + w // 2, r * h + h // 2)) == colors[r][c]
    _, top, left = label_bands(w)
    labelled = make_grid(rows, col_labels=["step 1", "step 2", "step 3"], row_labels=["a", "b"])
    assert labelled.size == (left + 3 * w, top + 2 * h)
    assert labelled.getpixel((left + 2 * w + 1, top + h + 1)) == colors[1][2]
    rows[0][1] = None  # a missing image leaves a grey cell, same size
    assert make_grid(rows).getpixel((w + 1, 1)) == (200, 200, 200)


def _train(cfg):
    trainer = Trainer(cfg).setup()
    trainer.train()
    trainer.runlog.close()
    return trainer


def test_validation_leaves_training_unchanged(make_cfg, tmp_path):
    """Same final weights, losses and RNG streams with and without validation; images and grids written."""
    common = dict(max_steps=4, center_crop=False, random_flip=True)  # random crops: the data RNG matters too
    plain = _train(make_cfg(output_dir=str(tmp_path / "plain"), **common))
    cfg = make_cfg(output_dir=str(tmp_path / "val"), **common, **FAST,
                   **{"validation.steps": [1, 3, 4], "validation.num_images": 2})
    validated = _train(cfg)
    assert_bits_equal(plain.accelerator.unwrap_model(plain.unet).state_dict(),
                      validated.accelerator.unwrap_model(validated.unet).state_dict())
    assert plain.state.losses == validated.state.losses
    assert torch.equal(plain.state.generator.get_state(), validated.state.generator.get_state())
    assert validated.unet.training and not validated.components.vae.training

    out = validated.out / "validation"
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["done"], key=int) == ["1", "3", "4"]
    n_prompts, r = len(index["prompts"]), TINY_RESOLUTION
    assert n_prompts == 4
    for step, done in index["done"].items():
        assert len(done["images"]) == n_prompts and all(len(per) == 2 for per in done["images"])
        for path in (p for per in done["images"] for p in per):
            assert Image.open(validated.out / path).size == (r, r)
        _, top, left = label_bands(r)
        assert Image.open(validated.out / done["grid"]).size == (left + 2 * r, top + n_prompts * r)
    _, top, left = label_bands(r)
    assert Image.open(out / "sweep.png").size == (left + 3 * r, top + n_prompts * r)  # prompts x steps
    # Fixed seeds: the same prompt and seed give the same image at a given step, whichever run made it.
    first = Image.open(validated.out / index["done"]["4"]["images"][0][0])
    settings = json.loads(first.text["parameters"])
    assert settings["seed"] == 0 and settings["step"] == 4 and settings["prompt"] == index["prompts"][0]


def test_scored_validation_leaves_training_unchanged(make_cfg, tmp_path, metric_models):
    """Every metric (base scores taken at setup, losses and images scored at each validation): the same final
    weights, losses and RNG streams as a run without validation."""
    clip, dino = metric_models
    common = dict(max_steps=3, center_crop=False, random_flip=True, with_prior_preservation=True,
                  num_class_images=2, class_sampling_steps=1)
    plain = _train(make_cfg(output_dir=str(tmp_path / "plain"), **common))
    scored = _train(make_cfg(output_dir=str(tmp_path / "scored"), **common, **FAST, **{
        "validation.steps": [1, 3], "eval.clip_model": str(clip),
        "eval.dino_model": str(dino), "validation.metrics": ["loss", "drift", "dino", "clip_i", "clip_t"]}))
    assert_bits_equal(plain.accelerator.unwrap_model(plain.unet).state_dict(),
                      scored.accelerator.unwrap_model(scored.unet).state_dict())
    assert plain.state.losses == scored.state.losses
    assert torch.equal(plain.state.generator.get_state(), scored.state.generator.get_state())
    assert scored.unet.training and not scored.components.vae.training
    scores = scored.validator.scoring()["scores"]
    assert list(scores) == ["1", "3"] and all(len(v) == 6 for v in scores.values())


def test_validation_off_writes_nothing(make_cfg):
    trainer = _train(make_cfg(max_steps=2))
    assert trainer.validator is None and not (trainer.out / "validation").exists()


def test_log_file_content(make_cfg):
    trainer = _train(make_cfg(max_steps=3, **FAST))
    text = (trainer.out / "train.log").read_text()
    lines = text.splitlines()
    assert sum("training builtin:tiny for 3 steps (4 per epoch)" in line for line in lines) == 1
    assert sum(" step " in line and "/3  loss " in line for line in lines) == 3
    assert "validation at step 3: 4 prompts x 1 images" in text
    assert lines[-1].endswith("run finished at step 3")
    assert "Traceback" not in text and len(text) < 4000  # concise


def test_log_file_notes_the_error_that_stopped_the_run(make_cfg, monkeypatch):
    """run_training itself hands the error that stopped training to the log."""
    from dreambooth.training.step import TrainStep
    from dreambooth.training.trainer import run_training

    def boom(self, batches, state):
        raise RuntimeError("boom")
    monkeypatch.setattr(TrainStep, "run", boom)
    cfg = make_cfg(max_steps=3)
    with pytest.raises(RuntimeError, match="boom"):
        run_training(cfg)
    text = (Path(cfg.output_dir) / "train.log").read_text()
    assert "run stopped at step 0: RuntimeError: boom" in text and "Traceback" in text


def test_tensorboard_asked_for_but_missing_is_a_user_error(make_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    cfg = make_cfg(log_with="tensorboard")
    with pytest.raises(UserError, match="pip install tensorboard"):
        Trainer(cfg).setup()
    assert not Path(cfg.output_dir).exists()  # refused before anything was written


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_scalars_and_images(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _train(make_cfg(max_steps=2, log_with="tensorboard", **FAST))
    runs = [p.parent for p in (trainer.out / "tensorboard").rglob("events.out.tfevents.*")]
    tags = {"scalars": set(), "images": set()}
    for run in runs:
        acc = EventAccumulator(str(run)).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"train/loss", "train/lr", "train/grad_norm"} <= tags["scalars"]
    assert len(tags["images"]) == 4  # one per validation prompt


def test_kept_validation_checkpoint_exports_that_step(make_cfg, tmp_path):
    """keep_checkpoints: each validated step survives keep_last, and resuming from it with max_steps at that
    step writes the model of that step (constant LR: the same weights as a run of that length)."""
    from diffusers import UNet2DConditionModel

    from dreambooth.training.trainer import run_training
    run = tmp_path / "run"
    _train(make_cfg(output_dir=str(run), max_steps=4, keep_last=1, **FAST,
                    **{"validation.steps": [2, 4], "validation.keep_checkpoints": True}))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    run_training(make_cfg(output_dir=str(tmp_path / "step2"), max_steps=2, resume_force=True,
                          resume=str(run / "checkpoints" / "step-000002")))
    short = _train(make_cfg(output_dir=str(tmp_path / "short"), max_steps=2))
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "step2" / "unet").state_dict()
    reference = short.accelerator.unwrap_model(short.unet).state_dict()
    assert_bits_equal(exported, reference)


def test_a_validated_checkpoint_step_is_written_once(make_cfg, tmp_path, monkeypatch):
    from dreambooth.training import checkpoint_store
    written = []
    real = checkpoint_store.write_atomic
    monkeypatch.setattr(checkpoint_store, "write_atomic",
                        lambda final, *a: written.append(final.name) or real(final, *a))
    run = tmp_path / "run"
    _train(make_cfg(output_dir=str(run), max_steps=4, keep_last=1, checkpoint_steps=2, **FAST,
                    **{"validation.steps": [2, 4], "validation.keep_checkpoints": True}))
    assert written == ["step-000002", "step-000004"]  # once each, though both schedules name them
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.gpu
@cuda
def test_validation_under_fp16_on_cuda(make_cfg, tmp_path):
    """Mixed precision on a GPU (frozen text encoder and cached-latent VAE parked on the CPU): validation
    still leaves the weights alone and gives real images."""
    import numpy as np
    plain = _train(make_cfg(output_dir=str(tmp_path / "plain"), max_steps=3, mixed_precision="fp16"))
    validated = _train(make_cfg(output_dir=str(tmp_path / "val"), max_steps=3, mixed_precision="fp16", **FAST,
                                **{"validation.steps": [2, 3]}))
    assert_bits_equal(plain.accelerator.unwrap_model(plain.unet).state_dict(),
                      validated.accelerator.unwrap_model(validated.unet).state_dict())
    index = json.loads((validated.out / "validation" / "index.json").read_text())
    pixels = np.asarray(Image.open(validated.out / index["done"]["3"]["images"][0][0]))
    assert pixels.std() > 1  # not a flat (NaN-decoded) image


def test_the_final_sweep_is_not_drawn_twice(make_cfg, monkeypatch):
    from dreambooth.training.validation import Validator
    drawn = []
    real = Validator.write_sweep
    monkeypatch.setattr(Validator, "write_sweep", lambda self: drawn.append(1) or real(self))
    trainer = Trainer(make_cfg(**FAST, **{"validation.steps": [2, 4]})).setup()
    trainer.train()
    assert len(drawn) == 2  # after each validation; the end of training finds the sweep current
    assert (trainer.out / "validation" / "sweep.png").is_file()
    trainer.runlog.close(None)
