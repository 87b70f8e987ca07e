"""Aspect-ratio buckets: the bucket set, which bucket an image gets, whole-width crops, one bucket per batch, and
an epoch as long as the plan says."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import two_subjects
from PIL import Image

from dreambooth.config import Machine, resolve
from dreambooth.config.compile_plan import why_not_compile
from dreambooth.data.buckets import Buckets, bucket_sizes, class_picks, epoch_slots
from dreambooth.data.dataset import ImageTransform, collate
from dreambooth.data.subjects import resolve_subjects
from dreambooth.data.training_set import TrainingSet
from dreambooth.errors import UserError

BUCKETS = {"buckets": True, "bucket_step": 8}  # the tiny model trains at 32 px: steps of 8 give 24x40, 32x32, 40x24


def edged(size, seed=0):
    """Noise with a red first column and a blue last column, so a crop that cuts the sides shows."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(60, 200, (size[1], size[0], 3), dtype=np.uint8)
    arr[:, :12] = (255, 0, 0)
    arr[:, -12:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_bucket_set_keeps_pixels_steps_and_ratio():
    sizes = bucket_sizes(512, 64, 2.0)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) <= 2 * min(w, h)
        assert w * h >= 0.9 * 512 * 512  # about the square's pixel count
    assert bucket_sizes(32, 8, 2.0) == [(40, 24), (32, 32), (24, 40)]


def test_wide_and_tall_photos_get_their_own_buckets_whole_width():
    buckets = Buckets(32, 8, 2.0)
    assert buckets.assign(64, 48) == (40, 24) and buckets.assign(48, 64) == (24, 40)
    assert buckets.assign(1920, 1080) == (40, 24) and buckets.assign(50, 50) == (32, 32)
    assert buckets.assign(20, 12) == (16, 8)  # smaller than its bucket: its own size, never upscaled
    transform = ImageTransform(32, random_flip=False, buckets=buckets)
    for img, (w, h) in ((edged((64, 48)), (40, 24)), (edged((48, 64)), (24, 40))):
        for seed in range(4):  # random crops: only along the side that is too long for the bucket
            x = transform(img, torch.Generator().manual_seed(seed))
            assert x.shape == (3, h, w)
            assert (x[0, :, 0] > 0.8).all() and (x[2, :, -1] > 0.8).all()  # both sides of the photo kept
    square = ImageTransform(32)(edged((64, 48)), torch.Generator().manual_seed(0))
    assert not ((square[0, :, 0] > 0.8).all() and (square[2, :, -1] > 0.8).all())  # the square crop cuts them


def write_folder(folder, sizes, prompt="a photo of sks toy", class_prompt="a photo of a toy"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        edged(size, seed=i).save(folder / f"im{i}.png")
    (folder / "dataset_info.json").write_text(json.dumps({"instance_prompt": prompt, "class_prompt": class_prompt}))
    return folder


def check_epoch(training_set, dataset, batches, batch_size):
    """Every batch holds one instance bucket and one class bucket; the epoch is as long as the plan assumed."""
    assert len(batches) * batch_size == training_set.epoch_items()
    for slots in batches:
        batch = collate([dataset[s] for s in slots])  # stacking fails if sizes are mixed
        buckets = {training_set.buckets.assign(*dataset_of(dataset, s).instance_images[s.image].size) for s in slots}
        assert len(buckets) == 1 and batch["pixel_values"].shape[-2:] == (lambda w, h: (h, w))(*buckets.pop())
        if batch["has_class"]:
            klass = {dataset_of(dataset, s).class_images[s.class_image].size for s in slots}
            assert len({training_set.buckets.assign(*size) for size in klass}) == 1


def dataset_of(dataset, slot):
    return dataset.datasets[slot.subject] if hasattr(dataset, "datasets") else dataset


def test_batches_hold_one_bucket_and_the_epoch_matches_the_plan(make_cfg, tmp_path):
    folder = write_folder(tmp_path / "mixed", [(64, 48), (64, 48), (64, 48), (48, 64), (48, 64), (40, 40)])
    class_dir = folder / "class_data_dir"
    class_dir.mkdir()
    for i, size in enumerate([(32, 32), (64, 48), (32, 32), (48, 64), (32, 32), (32, 32), (64, 48)]):
        edged(size, seed=10 + i).save(class_dir / f"c{i}.png")
    cfg = make_cfg(**{"data.dir": str(folder)}, **BUCKETS, batch_size=2, with_prior_preservation=True,
                   num_class_images=7, center_crop=False, random_flip=True)
    ts = TrainingSet(cfg, resolve_subjects(cfg))
    dataset = ts.build()
    epochs = [epoch_slots(dataset, e, cfg.seed, 2) for e in range(4)]
    assert epochs[0] == epoch_slots(dataset, 0, cfg.seed, 2) and epochs[0] != epochs[1]  # drawn from (seed, epoch)
    for epoch, batches in enumerate(epochs):
        dataset.set_epoch(epoch)
        check_epoch(ts, dataset, batches, 2)
        # 7 items (the class set is larger): each instance image once, the first wrapping round once more
        assert sorted(Counter(s.image for b in batches for s in b).values()) == [1, 1, 1, 1, 1, 2]
        assert {ts.buckets.assign(*dataset.class_images[s.class_image].size) for b in batches for s in b} == {
            (32, 32), (40, 24), (24, 40)}  # every class bucket takes turns
    assert {s.class_image for e in epochs for b in e for s in b} == set(range(7))
    plan = resolve(cfg, Machine(cuda=True, gpu_gib=80.0, triton=True), ts.epoch_items())
    assert plan.steps_per_epoch == len(epochs[0])
    assert "buckets" in why_not_compile(cfg, plan.memory, 10_000, Machine(cuda=True, gpu_gib=80.0, triton=True))


def test_one_class_bucket_shows_every_class_image_each_pass():
    square = [Image.new("RGB", (32, 32)) for _ in range(7)]
    picks = class_picks(Buckets(32, 8, 2.0), square, [2, 1, 2, 2], torch.Generator().manual_seed(0))
    assert [len(p) for p in picks] == [2, 1, 2, 2] and sorted(sum(picks, [])) == list(range(7))


def test_several_subjects_bucket_their_own_batches(make_cfg, subject_dir, tmp_path):
    wide = write_folder(tmp_path / "wide", [(64, 48), (48, 64), (64, 48)], prompt="a photo of zwx toy")
    cfg = two_subjects(make_cfg, subject_dir, wide, **BUCKETS, batch_size=2)
    ts = TrainingSet(cfg, resolve_subjects(cfg))
    dataset = ts.build()
    for epoch in range(2):
        batches = dataset.epoch_batches(epoch, cfg.seed)
        assert len(batches) == dataset.batches_per_epoch
        check_epoch(ts, dataset, batches, 2)
        assert all(len({s.subject for s in b}) == 1 for b in batches)


def test_bucket_settings_are_checked(make_cfg):
    with pytest.raises(UserError, match="'bucket_step' must be a positive multiple of 8"):
        make_cfg(buckets=True, bucket_step=12)
    with pytest.raises(UserError, match="'bucket_step' .* must not exceed resolution"):
        make_cfg(buckets=True, bucket_step=64)
    with pytest.raises(UserError, match="'bucket_max_ratio' must be >= 1"):
        make_cfg(bucket_max_ratio=0.5)
    make_cfg(bucket_step=64)  # the SD default is fine while buckets are off, whatever the resolution
