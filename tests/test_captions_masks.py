"""Per-image captions and masked loss: the prompt each image trains with, mask weights and their gradient, masks
following crops and flips, a messy folder's one warning, and exact resume of a bucketed, captioned, masked run."""

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from conftest import max_diff
from PIL import Image
from test_checkpoint import interrupt_at, trained

from dreambooth.data.annotations import read_annotations
from dreambooth.data.buckets import Buckets
from dreambooth.data.dataset import DreamBoothDataset, ImageTransform, list_images
from dreambooth.data.latent_cache import CachedViews
from dreambooth.data.subjects import resolve_subjects
from dreambooth.data.training_set import TrainingSet
from dreambooth.errors import UserError
from dreambooth.report.page import write_report
from dreambooth.training import signals
from dreambooth.training.loss import mask_weight, masked_mse
from dreambooth.training.trainer import Trainer, run_training
from dreambooth.training.validation import config_prompts

PROMPT = "a photo of riobugger toy"  # the demo subject's instance prompt


def left_black(size) -> Image.Image:
    """A mask that is black (not counted) on the left half and white on the right."""
    arr = np.full((size[1], size[0]), 255, np.uint8)
    arr[:, : size[0] // 2] = 0
    return Image.fromarray(arr, "L")


def red_left(size) -> Image.Image:
    arr = np.full((size[1], size[0], 3), 40, np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------------------------- captions

def test_a_caption_changes_the_prompt_its_image_trains_with(make_cfg, subject_dir, monkeypatch):
    (subject_dir / "toy_01.txt").write_text("[instance] sitting on a red sofa\n")
    (subject_dir / "toy_02.txt").write_text("a pencil drawing of a toy")
    trainer = Trainer(make_cfg(captions=True, batch_size=1)).setup()
    assert trainer.dataset[1]["prompt"] == f"{PROMPT} sitting on a red sofa"  # the placeholder is replaced
    assert trainer.dataset[0]["prompt"] == PROMPT  # no caption: the instance prompt
    assert {f"{PROMPT} sitting on a red sofa", "a pencil drawing of a toy"} <= set(trainer.inputs.text_cache)
    seen = []
    encode = trainer.inputs.encode_prompts
    monkeypatch.setattr(trainer.inputs, "encode_prompts", lambda prompts: seen.extend(prompts) or encode(prompts))
    batches = trainer.batches()
    for _ in range(4):  # one epoch of 4 images, batch 1
        trainer.step.run(batches, trainer.state)
    assert Counter(seen) == {PROMPT: 2, f"{PROMPT} sitting on a red sofa": 1, "a pencil drawing of a toy": 1}


def test_a_caption_past_the_text_encoders_77_tokens_is_named_in_one_warning(make_cfg, subject_dir, caplog):
    long = "a pencil drawing of a toy " + "on a long wooden table " * 20
    (subject_dir / "toy_02.txt").write_text(long)
    (subject_dir / "toy_03.txt").write_text("a short caption")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(make_cfg(captions=True)).setup()
    trainer.close()
    (line,) = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert line.startswith("1 training prompt(s) are longer than the text encoder's 77 tokens")
    assert "'a pencil drawing of a toy on a long" in line and "short caption" not in line


def test_validation_and_report_show_captions(make_cfg, subject_dir, tmp_path):
    (subject_dir / "toy_01.txt").write_text("[instance] on a red sofa")
    cfg = make_cfg(captions=True)
    subjects = resolve_subjects(cfg)
    TrainingSet(cfg, subjects)  # reads the captions
    assert config_prompts(cfg, subjects)[-1] == f"{PROMPT} on a red sofa"
    assert f"{PROMPT} on a red sofa" not in config_prompts(make_cfg(), resolve_subjects(make_cfg()))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"data": {"dir": str(subject_dir)}, "captions": True}))
    assert f"{PROMPT} on a red sofa" in write_report(out).read_text()


def test_caption_dropout_is_drawn_per_item_apart_from_the_crops():
    images = [red_left((40, 32)) for _ in range(4)]

    def dataset(dropout, epoch=0):
        ds = DreamBoothDataset(images, "sks toy", ImageTransform(32, random_flip=True), seed=3,
                               captions=["sks toy on grass", None, None, None], caption_dropout=dropout)
        ds.set_epoch(epoch)
        return ds
    prompts = [dataset(0.5)[i]["prompt"] for i in range(64)]
    assert 10 < prompts.count("") < 54 and "sks toy on grass" in prompts and "sks toy" in prompts
    assert prompts == [dataset(0.5)[i]["prompt"] for i in range(64)]  # a fresh process (resume) drops the same
    assert prompts != [dataset(0.5, epoch=1)[i]["prompt"] for i in range(64)]
    for i in range(8):  # dropout draws nothing from the crop and flip stream
        assert torch.equal(dataset(0.5)[i]["pixel_values"], dataset(0.0)[i]["pixel_values"])


# ----------------------------------------------------------------------------------------------- masks

def test_masked_loss_has_no_gradient_where_the_mask_is_black():
    masks = torch.from_numpy(np.asarray(left_black((32, 32)), dtype=np.float32) / 255).expand(2, 1, 32, 32)
    weight = mask_weight(masks, (16, 16))
    assert weight.shape == (2, 1, 16, 16) and (weight[..., :8] == 0).all() and (weight[..., 8:] == 1).all()
    pred = torch.randn(2, 4, 16, 16, requires_grad=True)
    target = torch.randn(2, 4, 16, 16)
    masked_mse(pred, target, weight).backward()
    assert (pred.grad[..., :8] == 0).all() and (pred.grad[..., 8:] != 0).all()
    torch.testing.assert_close(masked_mse(pred, target, weight),
                               ((pred - target)[..., 8:] ** 2).mean())  # the mean over the counted pixels
    floor = mask_weight(weight, (16, 16), floor=0.1)
    assert (floor[..., :8] == 0.1).all() and (floor[..., 8:] == 1).all()


def test_training_step_gradient_is_zero_on_the_masked_out_half(make_cfg, subject_dir):
    for path in subject_dir.glob("toy_*.png"):
        left_black((48, 48)).save(path.with_name(path.stem + ".mask.png"))
    trainer = Trainer(make_cfg(masked_loss=True, batch_size=2)).setup()
    kept = {}
    predict = trainer.step.predict

    def spy(*args):
        pred, target = predict(*args)
        pred.retain_grad()
        kept["pred"] = pred
        return pred, target
    trainer.step.predict = spy
    losses = trainer.step.forward_loss(next(trainer.batches()), trainer.state.generator)
    losses["loss"].backward()
    grad = kept["pred"].grad
    assert grad.shape[-1] == 16 and (grad[..., :8] == 0).all() and (grad[..., 8:] != 0).any()


def test_class_images_of_another_bucket_get_the_joined_forwards_loss(make_cfg, subject_dir):
    (subject_dir / "class_data_dir").mkdir()
    for i in range(2):
        red_left((48, 48)).save(subject_dir / "class_data_dir" / f"c{i}.png")
    trainer = Trainer(make_cfg(with_prior_preservation=True, num_class_images=2, batch_size=2)).setup()
    step, batch = trainer.step, next(trainer.batches())
    joined = step.forward_loss(batch, torch.Generator().manual_seed(5))  # same sizes: one joined forward
    g = torch.Generator().manual_seed(5)
    parts = [step.noised(batch["pixel_values"], g), step.noised(batch["class_pixel_values"], g)]
    split = step.split_loss(parts, batch, None)  # what a batch with class images of another bucket runs
    assert joined.keys() == split.keys() == {"loss", "instance_loss", "prior_loss"}
    for key in joined:
        torch.testing.assert_close(joined[key], split[key], rtol=1e-5, atol=1e-6)


class Rows:
    """A stand-in latent cache that keeps the pixels of each view it is given."""

    def __init__(self):
        self.views = []

    def rows_of(self, views):
        self.views += views
        return list(range(len(self.views) - len(views), len(self.views)))
    lookup = rows_of


@pytest.mark.parametrize("buckets", [None, Buckets(32, 8, 2.0)], ids=["square", "bucket"])
def test_a_mask_follows_its_images_crop_and_flip(buckets):
    img, mask = red_left((64, 48)), left_black((64, 48))
    transform = ImageTransform(32, random_flip=True, buckets=buckets)
    cache = Rows()
    views = CachedViews(transform, 6, seed=0, cache=cache)
    flips = set()
    for seed in range(12):
        x, m = transform(img, torch.Generator().manual_seed(seed), mask)
        row, cached_m = views(img, torch.Generator().manual_seed(seed), mask)
        for pixels, weights in ((x, m), (cache.views[row], cached_m)):
            assert weights.shape == (1, *pixels.shape[1:])
            sharp = (weights[0] < 0.05) | (weights[0] > 0.95)  # off the one column that straddles the edge
            red = pixels[0] > 0.15  # halfway between the red and the grey half
            assert sharp.float().mean() > 0.9
            assert torch.equal(red[sharp], weights[0][sharp] < 0.5)  # the mask's black half is the red half
            flips.add(bool(red[:, 0].all()))
    assert flips == {True, False}  # both flipped and unflipped crops were drawn


def test_a_messy_folder_gives_one_warning_naming_each_file(tmp_path, caplog):
    for name in "abcd":
        red_left((48, 36)).save(tmp_path / f"{name}.png")
    rgba = red_left((48, 36)).convert("RGBA")
    rgba.putalpha(left_black((48, 36)))
    rgba.save(tmp_path / "d.png")  # its alpha channel is its mask
    (tmp_path / "a.txt").write_text("[instance] on grass")
    left_black((24, 24)).save(tmp_path / "a.mask.png")  # another size than its image
    (tmp_path / "ghost.txt").write_text("a caption for no image")
    left_black((48, 36)).save(tmp_path / "ghost.mask.png")
    (tmp_path / "b.txt").write_text("  \n")
    Image.new("L", (48, 36), 0).save(tmp_path / "c.mask.png")  # all black
    with caplog.at_level(logging.WARNING):
        files = list_images(tmp_path, captions=True, masks=True)
        images = [Image.open(p).convert("RGB") for p in files]
        notes = read_annotations(tmp_path, files, images, "sks toy", captions=True, masks=True)
    assert [p.name for p in files] == ["a.png", "b.png", "c.png", "d.png"]
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("a.mask.png", "ghost.txt", "ghost.mask.png", "b.txt", "c.mask.png"):
        assert name in message
    assert notes.captions == ["sks toy on grass", None, None, None]
    assert notes.masked == 2  # a (stretched) and d (alpha); c's black mask is ignored, b has none
    assert [np.asarray(m).min() for m in notes.masks] == [0, 255, 255, 0]
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png", "c.png", "d.png"]  # masks never train


def test_masked_loss_without_any_mask_is_one_clear_error(make_cfg):
    cfg = make_cfg(masked_loss=True)
    with pytest.raises(UserError, match="masked_loss: true, but no image in .* has a usable mask"):
        TrainingSet(cfg, resolve_subjects(cfg))


def test_new_settings_are_checked(make_cfg):
    with pytest.raises(UserError, match="'caption_dropout' must be in"):
        make_cfg(caption_dropout=1.0)
    with pytest.raises(UserError, match="'mask_min' must be in"):
        make_cfg(mask_min=-0.1)


# ----------------------------------------------------------------------------------------------- resume

def test_resumed_bucketed_captioned_masked_run_equals_uninterrupted(make_cfg, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, size in enumerate([(64, 48), (48, 64), (64, 48), (40, 40)]):
        red_left(size).save(folder / f"p{i}.png")
    left_black((64, 48)).save(folder / "p0.mask.png")
    (folder / "p1.txt").write_text("[instance] on a red sofa")
    (folder / "dataset_info.json").write_text(json.dumps({"instance_prompt": PROMPT, "class_prompt": "a toy"}))
    (folder / "class_data_dir").mkdir()
    for i, size in enumerate([(32, 32), (64, 48), (32, 32)]):  # class images bucket too, apart from instances
        red_left(size).save(folder / "class_data_dir" / f"c{i}.png")
    extra = {"data.dir": str(folder), "buckets": True, "bucket_step": 8, "captions": True, "caption_dropout": 0.3,
             "masked_loss": True, "mask_min": 0.05, "center_crop": False, "random_flip": True, "batch_size": 2,
             "max_steps": 7, "with_prior_preservation": True, "num_class_images": 3}
    run_training(make_cfg(output_dir=str(tmp_path / "straight"), **extra))
    interrupt_at(monkeypatch, 3)
    with pytest.raises(signals.Interrupted):
        run_training(make_cfg(output_dir=str(tmp_path / "stopped"), checkpoint_steps=2, **extra))
    monkeypatch.undo()
    run_training(make_cfg(output_dir=str(tmp_path / "stopped"), checkpoint_steps=2, resume="latest", **extra))
    assert max_diff(trained(tmp_path / "straight"), trained(tmp_path / "stopped")) <= 1e-6
