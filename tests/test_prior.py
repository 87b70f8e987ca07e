"""Class images on demand (top-up, resume, manifest checks, `dreambooth classes`) and the prior loss."""

import dataclasses
import gc
import json
import logging
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.data import class_images as prior
from dreambooth.errors import UserError
from dreambooth.models.base_model import DEFAULT_MODEL, former_ids
from dreambooth.training.trainer import Trainer

PRIOR = {"with_prior_preservation": True, "class_sampling_steps": 2, "sample_batch_size": 2}


def prior_cfg(make_cfg, **overrides):
    return make_cfg(**{**PRIOR, **overrides})


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def user_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"mine_{i}.png")
    return sorted(folder.glob("mine_*.png"))


def count_sampler_calls(monkeypatch):
    """Wrap load_sampler so a test can see how many batches were sampled and whether the pipeline was freed."""
    seen = {"calls": 0, "refs": []}
    real = prior.load_sampler

    class Counting:
        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, **kw):
            seen["calls"] += 1
            if seen.get("interrupt_at") == seen["calls"]:
                raise KeyboardInterrupt
            return self.pipe(**kw)

    def load(cfg):
        pipe = real(cfg)
        seen["refs"].append(weakref.ref(pipe.unet))
        return Counting(pipe)

    monkeypatch.setattr(prior, "load_sampler", load)
    return seen


def test_top_up_samples_only_the_missing_images(make_cfg, subject_dir, monkeypatch):
    folder = subject_dir / "class_data_dir"
    mine = user_images(folder, 3)
    before = [p.read_bytes() for p in mine]
    seen = count_sampler_calls(monkeypatch)
    cfg = prior_cfg(make_cfg, num_class_images=5)

    paths = prior.ensure_class_images(cfg)[0]
    assert len(paths) == 5 and set(mine) <= set(paths)
    records = manifest(folder)["images"]
    assert sorted(records) == ["class-00000.png", "class-00001.png"]  # exactly 2 sampled
    assert all(r["prompt"] == "a photo of a toy" and r["model"] == "builtin:tiny" and r["steps"] == 2
               and r["sampler"] == "dpm++" and r["resolution"] == 32 for r in records.values())
    assert [p.read_bytes() for p in mine] == before  # the user's images are kept as they were
    assert Image.open(folder / "class-00000.png").size == (32, 32)
    gc.collect()
    assert seen["refs"] and seen["refs"][0]() is None  # the sampling pipeline was released

    calls = seen["calls"]
    assert len(prior.ensure_class_images(cfg)[0]) == 5
    assert seen["calls"] == calls and len(seen["refs"]) == 1  # rerun: nothing sampled, no model loaded

    (folder / "class-00001.png").unlink()  # the user deletes a bad one: topped up with a new seed
    assert len(prior.ensure_class_images(cfg)[0]) == 5
    assert sorted(manifest(folder)["images"]) == ["class-00000.png", "class-00002.png"]


def test_interrupted_sampling_resumes_with_the_same_images(make_cfg, tmp_path, monkeypatch):
    whole = prior_cfg(make_cfg, num_class_images=5, **{"data.class_data_dir": str(tmp_path / "whole")})
    prior.ensure_class_images(whole)

    cut = prior_cfg(make_cfg, num_class_images=5, **{"data.class_data_dir": str(tmp_path / "cut")})
    seen = count_sampler_calls(monkeypatch)
    seen["interrupt_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        prior.ensure_class_images(cut)
    assert sorted(manifest(tmp_path / "cut")["images"]) == ["class-00000.png", "class-00001.png"]
    user_images(tmp_path / "cut", 1)[0].rename(tmp_path / "cut" / "class-00002.png")  # written, not yet recorded
    seen["interrupt_at"] = None
    prior.ensure_class_images(cut)
    assert seen["calls"] == 2 + 2  # the resumed run sampled only the 3 missing images (batches of 2)

    names = sorted(manifest(tmp_path / "whole")["images"])
    assert names == sorted(manifest(tmp_path / "cut")["images"]) and len(names) == 5
    for name in names:
        assert np.array_equal(pixels(tmp_path / "whole" / name), pixels(tmp_path / "cut" / name)), name
    assert manifest(tmp_path / "whole")["images"] == manifest(tmp_path / "cut")["images"]


def test_images_named_like_ours_without_a_manifest_are_the_users(make_cfg, subject_dir):
    """A copied-in class folder (or one whose manifest the user deleted) loses nothing and keeps its numbers."""
    folder = subject_dir / "class_data_dir"
    for i, path in enumerate(user_images(folder, 3)):
        path.rename(folder / f"class-{i:05d}.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    paths = prior.ensure_class_images(prior_cfg(make_cfg, num_class_images=4))[0]
    assert len(paths) == 4
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert sorted(manifest(folder)["images"]) == ["class-00003.png"]  # the one sampled image takes a new number


def test_class_folder_lists_like_the_instance_folder_and_names_only_the_users_strays(make_cfg, subject_dir,
                                                                                     caplog):
    """Any image the instance folder takes counts as a class image; each run names the user's non-images in
    one warning, never the manifest or the images we sampled."""
    folder = subject_dir / "class_data_dir"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 100, 50)).save(folder / "a.JPG", format="JPEG")
    Image.new("RGB", (40, 40), (50, 100, 200)).save(folder / "b.webp")
    Image.new("RGB", (40, 40)).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("mine")
    (folder / "old").mkdir()
    cfg = prior_cfg(make_cfg, num_class_images=3)
    for _ in range(2):  # the first run samples one image and writes the manifest; the second finds both
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            paths = prior.ensure_class_images(cfg)[0]
        assert [p.name for p in paths] == ["a.JPG", "b.webp", "class-00000.png"]
        (msg,) = [r.getMessage() for r in caplog.records
                  if r.name.startswith("dreambooth") and r.levelno >= logging.WARNING]
        assert all(name in msg for name in ("notes.txt", ".hidden.png", "old/"))
        assert "manifest" not in msg and "class-" not in msg
    assert sorted(manifest(folder)["images"]) == ["class-00000.png"]


def test_changed_class_prompt_is_refused_unless_regenerating(make_cfg, subject_dir, caplog):
    folder = subject_dir / "class_data_dir"
    mine = user_images(folder, 1)
    prior.ensure_class_images(prior_cfg(make_cfg, num_class_images=3))

    with pytest.raises(UserError, match="regenerate_class_images"):
        prior.ensure_class_images(prior_cfg(make_cfg, num_class_images=3, **{"data.class_prompt": "a photo of a cat"}))
    assert all(r["prompt"] == "a photo of a toy" for r in manifest(folder)["images"].values())  # nothing touched

    with caplog.at_level(logging.WARNING, logger="dreambooth.data.class_images"):  # sampler only: kept, with a warning
        prior.ensure_class_images(prior_cfg(make_cfg, num_class_images=3, class_sampler="ddim"))
    assert any("sampler" in r.getMessage() for r in caplog.records)

    cfg = prior_cfg(make_cfg, num_class_images=3, regenerate_class_images=True,
                    **{"data.class_prompt": "a photo of a cat"})
    paths = prior.ensure_class_images(cfg)[0]
    records = manifest(folder)["images"]
    assert len(paths) == 3 and mine[0] in paths
    assert sorted(records) == ["class-00002.png", "class-00003.png"]  # old ones gone, new seeds
    assert all(r["prompt"] == "a photo of a cat" for r in records.values())
    assert not (folder / "class-00000.png").exists()


def test_images_sampled_under_the_taken_down_default_stay_valid(make_cfg, subject_dir):
    """Class folders sampled before the default moved to its community copy record the old id: same weights."""
    folder = subject_dir / "class_data_dir"
    prior.ensure_class_images(prior_cfg(make_cfg, num_class_images=2))
    data = manifest(folder)
    for record in data["images"].values():
        record["model"] = former_ids(DEFAULT_MODEL)[0]  # the id SD 2.1 base was published under
    (folder / "manifest.json").write_text(json.dumps(data))
    cfg = prior_cfg(make_cfg, num_class_images=2)
    copy = dataclasses.replace(cfg, model=DEFAULT_MODEL)
    plan = prior.plan_folder(folder, prior.settings_for(copy, "a photo of a toy"), wanted=2, regenerate=False)
    assert len(plan.usable) == 2 and not plan.indices  # nothing to sample again, nothing refused
    other = prior.settings_for(dataclasses.replace(cfg, model="someone/else"), "a photo of a toy")
    with pytest.raises(UserError, match="regenerate_class_images"):
        prior.plan_folder(folder, other, wanted=2, regenerate=False)


def count_opens(monkeypatch) -> Counter:
    """Count Image.open per resolved path (every decode of a file starts there)."""
    opened, real = Counter(), Image.open

    def counting(fp, *args, **kwargs):
        if isinstance(fp, (str, Path)):
            opened[Path(fp).resolve()] += 1
        return real(fp, *args, **kwargs)
    monkeypatch.setattr(Image, "open", counting)
    return opened


def test_each_class_image_is_decoded_once_during_setup(make_cfg, subject_dir, monkeypatch):
    folder = subject_dir / "class_data_dir"
    user_images(folder, 2)  # checked before sampling, then trained on
    opened = count_opens(monkeypatch)
    trainer = Trainer(prior_cfg(make_cfg, num_class_images=3)).setup()
    files = sorted(p.resolve() for p in folder.glob("*.png"))
    assert len(files) == 3 and len(trainer.dataset.class_images) == 3  # 2 of the user's, 1 sampled
    sampled = [p for p in files if p.name.startswith("class-")]
    assert len(sampled) == 1  # the user's are opened once (checked, then trained on); the sampled one never
    assert {p.name: opened[p] for p in files} == {p.name: 0 if p in sampled else 1 for p in files}
    on_disk = np.asarray(Image.open(sampled[0]).convert("RGB"))  # the kept image is the file's pixels exactly
    assert any(np.array_equal(np.asarray(im), on_disk) for im in trainer.dataset.class_images)


def test_class_images_past_the_wanted_ones_are_not_opened(make_cfg, subject_dir, monkeypatch):
    mine = user_images(subject_dir / "class_data_dir", 4)
    opened = count_opens(monkeypatch)
    assert prior.ensure_class_images(prior_cfg(make_cfg, num_class_images=2))[0] == mine[:2]
    assert [opened[p.resolve()] for p in mine] == [1, 1, 0, 0]


def test_prior_needs_a_class_prompt(make_cfg, subject_dir):
    (subject_dir / "dataset_info.json").write_text(json.dumps({"instance_prompt": "a photo of sks toy"}))
    with pytest.raises(UserError, match="class_prompt"):
        Trainer(prior_cfg(make_cfg)).setup()


def test_classes_command_samples_and_exits(tmp_path, subject_dir, capsys):
    from dreambooth.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"model: builtin:tiny\ndata:\n  dir: {subject_dir}\nresolution: 32\n"
                      f"output_dir: {tmp_path / 'out'}\nwith_prior_preservation: true\nclass_sampling_steps: 2\n")
    assert main(["classes", str(config), "num_class_images=3", "quiet=true"]) == 0
    out = capsys.readouterr().out
    assert str(subject_dir / "class_data_dir") in out
    assert len(manifest(subject_dir / "class_data_dir")["images"]) == 3
    assert not (tmp_path / "out").exists()  # sampling only: no training


# --- prior loss -------------------------------------------------------------------------------------------


def batch_grads(trainer, batch, step):
    """Gradients of BATCH under `step(batch)`, which must run backward itself."""
    losses = step(batch)
    grads = [p.grad.clone() for p in trainer.step.params]
    trainer.step.optimizer.zero_grad(set_to_none=True)
    return losses, grads


def concat_step(trainer):
    def step(batch):
        losses = trainer.step.forward_loss(batch, trainer.state.generator)
        trainer.accelerator.backward(losses["loss"])
        return {k: v.detach() for k, v in losses.items()}
    return step


def assert_grads_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_prior_weight_zero_equals_no_prior(make_cfg, tmp_path):
    # As many class as instance images, so both runs draw the same instance batches.
    plain = Trainer(make_cfg(batch_size=2, output_dir=str(tmp_path / "a"))).setup()
    zero = Trainer(prior_cfg(make_cfg, batch_size=2, num_class_images=4, prior_loss_weight=0.0,
                             output_dir=str(tmp_path / "b"))).setup()
    plain_losses, plain_grads = batch_grads(plain, next(plain.batches()), concat_step(plain))
    zero_losses, zero_grads = batch_grads(zero, next(zero.batches()), concat_step(zero))
    assert zero_losses["prior_loss"] > 0 and torch.equal(zero_losses["loss"], zero_losses["instance_loss"])
    torch.testing.assert_close(zero_losses["loss"], plain_losses["loss"], rtol=1e-5, atol=1e-7)
    assert_grads_close(zero_grads, plain_grads)


@pytest.mark.parametrize("extra", [{}, {"loss_weighting": "min_snr", "noise_offset": 0.1, "input_perturbation": 0.1}],
                         ids=["plain", "weighted-offset"])
def test_concat_and_sequential_give_the_same_gradient(make_cfg, extra):
    # Weighted too: instance and class losses are weighted alike in both modes.
    trainer = Trainer(prior_cfg(make_cfg, batch_size=2, num_class_images=2, prior_loss_weight=0.7, **extra)).setup()
    batch, state = next(trainer.batches()), trainer.state.generator.get_state()
    concat_losses, concat = batch_grads(trainer, batch, concat_step(trainer))
    trainer.state.generator.set_state(state)  # the same latents, noise and timesteps
    seq_losses, sequential = batch_grads(trainer, batch, lambda b: trainer.step.sequential_backward(b, 1.0, trainer.state.generator))
    for key in ("loss", "instance_loss", "prior_loss"):
        torch.testing.assert_close(seq_losses[key], concat_losses[key], rtol=1e-5, atol=1e-7)
    assert_grads_close(sequential, concat)
    assert any(g.abs().max() > 0 for g in concat)


def test_sequential_prior_run_trains_and_logs_both_losses(make_cfg):
    trainer = Trainer(prior_cfg(make_cfg, num_class_images=2, prior_mode="sequential", max_steps=2)).setup()
    before = [p.detach().clone() for p in trainer.step.params]
    logs = trainer.step.run(trainer.batches(), trainer.state)
    assert {"loss", "instance_loss", "prior_loss"} <= set(logs)
    assert logs["loss"] == pytest.approx(logs["instance_loss"] + logs["prior_loss"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.step.params))
