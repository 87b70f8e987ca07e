"""Several subjects in one run: subject resolution, batch schedule, pairing with class images, a full run."""

import json
import logging
from collections import Counter

import pytest
from conftest import second_subject, two_subjects
from PIL import Image

from dreambooth.data.dataset import DreamBoothDataset, ImageTransform, collate
from dreambooth.errors import UserError
from dreambooth.models.pipeline import load_pipeline
from dreambooth.serve.generate import Request, generate
from dreambooth.data.subjects import MultiSubjectDataset, resolve_subjects, subject_schedule
from dreambooth.models.builtin import TINY_RESOLUTION
from dreambooth.training.trainer import run_training


def test_single_folder_is_a_one_subject_list(make_cfg, subject_dir):
    a = resolve_subjects(make_cfg())
    b = resolve_subjects(make_cfg(**{"data.dir": None, "subjects": [{"dir": str(subject_dir)}]}))
    assert a == b and len(a) == 1
    assert a[0].instance_prompt == "a photo of riobugger toy" and a[0].class_prompt == "a photo of a toy"
    assert a[0].class_dir == subject_dir / "class_data_dir" and a[0].num_class_images == 100


def test_subject_prompts_must_differ(make_cfg, subject_dir, tmp_path, caplog):
    same = second_subject(tmp_path, prompt="a photo of riobugger toy")
    with pytest.raises(UserError, match="share the instance prompt"):
        resolve_subjects(two_subjects(make_cfg, subject_dir, same))
    (same / "dataset_info.json").write_text(json.dumps({"instance_prompt": "a photo of riobugger toy car"}))
    with caplog.at_level(logging.WARNING, logger="dreambooth.data.subjects"):
        resolve_subjects(two_subjects(make_cfg, subject_dir, same))
    assert any("part of" in r.getMessage() for r in caplog.records)


def test_schedule_round_robin_and_weighted():
    assert subject_schedule([1, 1], 0, 6) == [0, 1, 0, 1, 0, 1]
    weighted = subject_schedule([3, 1], 0, 8)
    assert Counter(weighted) == {0: 6, 1: 2} and weighted[:4].count(1) == 1  # interleaved, not bunched
    assert subject_schedule([3, 1], 4, 4) == weighted[4:]  # any stretch can be reproduced from its start


def one_image_subjects(weights):
    """One single-image subject per weight, batch 1: an epoch is len(weights) batches, shorter than the pattern."""
    t = ImageTransform(32)
    parts = [DreamBoothDataset([image(0, 10 * k)], f"sks{k} toy", t, name=f"s{k}") for k in range(len(weights))]
    return MultiSubjectDataset(parts, weights, batch_size=1)


def test_weighted_shares_hold_over_many_short_epochs():
    weights = [5.0, 2.0, 1.0]  # a pattern 8 batches long, epochs of 3
    ds = one_image_subjects(weights)
    subjects = []
    for epoch in range(40):
        subjects += [indices[0] % 3 for indices in ds.epoch_batches(epoch, seed=0)]
    counts = Counter(subjects)
    for k, w in enumerate(weights):  # each share within one batch of its weight's proportion
        assert abs(counts[k] - len(subjects) * w / sum(weights)) <= 1, counts


def test_a_resumed_run_gets_the_same_epochs():
    weights = [3.0, 1.0, 1.0]
    straight = one_image_subjects(weights)
    epochs = [straight.epoch_batches(e, seed=4) for e in range(12)]
    assert one_image_subjects(weights).epoch_batches(9, seed=4) == epochs[9]  # fresh process, mid-run epoch
    assert straight.epoch_batches(5, seed=4) == epochs[5]  # an earlier epoch asked again
    assert subject_schedule(weights, 9 * 3, 3) == [b[0] % 3 for b in epochs[9]]


def image(seed, gray):
    return Image.new("RGB", (40 + seed, 40), (gray, gray, gray))


def test_batches_hold_one_subject_with_its_own_class_images():
    t = ImageTransform(32, random_flip=True)
    cat = DreamBoothDataset([image(i, 10) for i in range(3)], "sks cat", t, [image(i, 20) for i in range(5)],
                            "a cat", seed=0, name="cat")
    dog = DreamBoothDataset([image(i, 30) for i in range(2)], "zwx dog", t, [image(i, 40) for i in range(2)],
                            "a dog", seed=1, name="dog")
    ds = MultiSubjectDataset([cat, dog], [1.0, 1.0], batch_size=2)
    assert len(ds) == (3 + 1) * 2  # cat: 5 items -> 3 batches, dog: 2 items -> 1 batch
    batches = ds.epoch_batches(0, seed=0)
    assert len(batches) == 4 and batches == ds.epoch_batches(0, seed=0) and batches != ds.epoch_batches(1, seed=0)
    subjects = []
    for indices in batches:
        batch = collate([ds[j] for j in indices])
        (name,) = set(batch["subjects"])
        subjects.append(name)
        prompt, klass = {"cat": ("sks cat", "a cat"), "dog": ("zwx dog", "a dog")}[name]
        assert batch["prompts"] == [prompt] * 2 and batch["class_prompts"] == [klass] * 2
    assert subjects == ["cat", "dog", "cat", "dog"]  # round-robin: the small subject wraps around


def test_two_subject_run_trains_samples_and_generates(make_cfg, subject_dir, tmp_path):
    dog = second_subject(tmp_path)
    cfg = two_subjects(make_cfg, subject_dir, dog, with_prior_preservation=True, num_class_images=2,
                       class_sampling_steps=2, sample_batch_size=2, prior_mode="sequential")
    summary = run_training(cfg)
    for folder, prompt in ((subject_dir, "a photo of a toy"), (dog, "a photo of a dog")):
        records = json.loads((folder / "class_data_dir" / "manifest.json").read_text())["images"]
        assert len(records) == 2 and all(r["prompt"] == prompt for r in records.values())
    per_subject = summary["subjects"]
    assert set(per_subject) == {"subject", "dog"}
    assert [per_subject[k]["steps"] for k in ("subject", "dog")] == [2, 2]
    assert all(s["mean_loss"] > 0 and s["mean_prior_loss"] > 0 for s in per_subject.values())

    pipe = load_pipeline(cfg.output_dir, device="cpu")
    request = Request(prompt=["a photo of zwx dog"], width=TINY_RESOLUTION, height=TINY_RESOLUTION,
                      num_inference_steps=2, seed=0)
    (path,) = generate(pipe, request, tmp_path / "images", quiet=True)
    assert path.is_file()
