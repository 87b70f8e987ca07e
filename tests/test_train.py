"""End-to-end training on the tiny pipeline: weights move where they should, runs repeat, output loads."""

import json

import pytest
import torch
from conftest import max_diff
from diffusers import StableDiffusionPipeline

from dreambooth.errors import UserError
from dreambooth.models.builtin import TINY_RESOLUTION, build_tiny_pipeline
from dreambooth.training.trainer import Trainer, run_training


def state(module):
    return {k: v.detach().clone().float().cpu() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short tiny run shared by the assertions below."""
    from dreambooth.config import config_from_dict
    from dreambooth.demo import write_demo_dataset
    root = tmp_path_factory.mktemp("run")
    data = write_demo_dataset(root / "data", n=4, size=48)
    cfg = config_from_dict({"model": "builtin:tiny", "output_dir": str(root / "out"), "data": {"dir": str(data)},
                            "resolution": TINY_RESOLUTION, "max_steps": 30, "learning_rate": 1e-3,
                            "batch_size": 2, "gradient_checkpointing": True, "validation": {"enabled": False},
                            "quiet": True})
    trainer = Trainer(cfg).setup()
    summary = trainer.train()
    trainer.save(summary)
    return cfg, trainer, summary


def test_loss_finite_and_falls(trained):
    _, trainer, summary = trained
    losses = trainer.state.losses
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5


def test_unet_changes_frozen_parts_do_not(trained):
    cfg, _, _ = trained
    base = build_tiny_pipeline(seed=0)
    out = StableDiffusionPipeline.from_pretrained(cfg.output_dir)
    assert max_diff(state(base.unet), state(out.unet)) > 1e-3
    assert max_diff(state(base.vae), state(out.vae)) == 0
    assert max_diff(state(base.text_encoder), state(out.text_encoder)) == 0


def test_output_is_a_loadable_pipeline_that_generates(trained):
    cfg, _, summary = trained
    out = cfg.output_dir
    files = [p.name for p in __import__("pathlib").Path(out).rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pth"))]
    assert {"model_index.json", "config.yaml", "train_summary.json"} <= set(files)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of riobugger toy", num_inference_steps=2, height=48, width=40,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (40, 48)
    written = json.loads((__import__("pathlib").Path(out) / "train_summary.json").read_text())
    assert written["steps"] == 30 and written["final_loss"] == summary["final_loss"]
    assert {"wall_time_s", "samples_per_s", "peak_memory_bytes", "device", "versions"} <= set(written)


def test_same_seed_same_weights(make_cfg, tmp_path):
    weights = []
    for i in range(2):
        cfg = make_cfg(output_dir=str(tmp_path / f"run{i}"), max_steps=3, center_crop=False, random_flip=True)
        trainer = Trainer(cfg).setup()
        trainer.train()
        weights.append(state(trainer.accelerator.unwrap_model(trainer.unet)))
    assert max_diff(*weights) == 0


def test_epochs_define_steps_when_max_steps_unset(make_cfg):
    cfg = make_cfg(max_steps=None, epochs=2, batch_size=3, gradient_accumulation_steps=1)
    trainer = Trainer(cfg).setup()
    assert trainer.plan.total_steps == 4  # 4 images, batch 3 -> 2 batches per epoch


def test_train_text_encoder_changes_it(make_cfg):
    cfg = make_cfg(train_text_encoder=True, max_steps=2)
    summary = run_training(cfg)
    base = build_tiny_pipeline(seed=0)
    out = StableDiffusionPipeline.from_pretrained(cfg.output_dir)
    assert summary["steps"] == 2
    assert max_diff(state(base.text_encoder), state(out.text_encoder)) > 0


def test_refuses_foreign_nonempty_output_dir(make_cfg, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not empty and was not written by dreambooth"):
        Trainer(make_cfg(output_dir=str(foreign)))
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


def test_runs_with_different_precision_in_one_process(make_cfg, tmp_path):
    # accelerate keeps one mixed precision per process; the trainer must not inherit the previous run's.
    run_training(make_cfg(output_dir=str(tmp_path / "fp32"), max_steps=1, mixed_precision="no"))
    summary = run_training(make_cfg(output_dir=str(tmp_path / "bf16"), max_steps=1, mixed_precision="bf16"))
    assert summary["mixed_precision"] == "bf16"


def test_warmup_applies_to_the_default_constant_schedule(make_cfg):
    trainer = Trainer(make_cfg(lr_warmup_steps=4, max_steps=2)).setup()  # learning_rate 1e-3
    lrs = [trainer.step.run(trainer.batches(), trainer.state)["lr"] for _ in range(2)]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3])  # the rate for the next step: 1/4, then 2/4 of the way up


def test_text_encoder_saved_in_the_published_key_layout(trained):
    from safetensors import safe_open
    cfg, _, _ = trained
    with safe_open(f"{cfg.output_dir}/text_encoder/model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)  # what transformers 4 expects too
