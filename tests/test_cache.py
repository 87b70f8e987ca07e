"""Latent cache: one latent distribution per image (or per fixed augmented view), sampled every step."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_bits_equal, cuda

from dreambooth.data import latent_cache as cache_module
from dreambooth.data.latent_cache import CachedViews
from dreambooth.data.dataset import CacheRows, ImageTransform
from dreambooth.config import Machine, resolve
from dreambooth.training.trainer import Trainer


def _run(make_cfg, tmp_path, name, **overrides):
    trainer = Trainer(make_cfg(output_dir=str(tmp_path / name), max_steps=3, **overrides)).setup()
    trainer.train()
    return trainer


def test_cached_training_matches_uncached_with_deterministic_transforms(make_cfg, tmp_path, monkeypatch):
    # Encoding one image per VAE call, as the batch-1 uncached run does, removes batch-size-dependent rounding.
    monkeypatch.setattr(cache_module, "ENCODE_BATCH", 1)
    cached = _run(make_cfg, tmp_path, "cached", cache_latents=True)
    plain = _run(make_cfg, tmp_path, "plain", cache_latents=False)
    assert cached.inputs.latent_cache is not None and len(cached.inputs.latent_cache) == 4  # one entry per image
    assert plain.inputs.latent_cache is None
    assert cached.state.losses == plain.state.losses  # same seed, same draws: the same run
    assert_bits_equal(list(cached.step.params), list(plain.step.params))


def test_random_transforms_cache_fixed_views_from_the_seed(make_cfg, tmp_path):
    def setup(name):
        return Trainer(make_cfg(output_dir=str(tmp_path / name), center_crop=False, random_flip=True,
                                latent_cache_views=3)).setup()
    a, b = setup("a"), setup("b")
    assert isinstance(a.dataset.transform, CachedViews)
    assert 4 < len(a.inputs.latent_cache) <= 4 * 3  # several views per image; identical ones share an entry
    torch.testing.assert_close(a.inputs.latent_cache.mean, b.inputs.latent_cache.mean)  # the views are fixed by the seed
    batches = a.batches()
    for _ in range(6):
        a.inputs.encode_images(next(batches)["pixel_values"], a.state.generator)
    assert a.inputs.latent_cache.misses == 0  # every crop the data loader produced was a cached view


def count_image_work(monkeypatch) -> dict:
    """Count image transforms and pixel hashes: the per-image work a cached training step must not do."""
    counts = {"transform": 0, "hash": 0}
    transform, key = ImageTransform.__call__, cache_module.pixel_key

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(ImageTransform, "__call__", counted("transform", transform))
    monkeypatch.setattr(cache_module, "pixel_key", counted("hash", key))
    return counts


@pytest.mark.parametrize("overrides", [
    {},
    {"center_crop": False, "random_flip": True, "with_prior_preservation": True, "num_class_images": 2,
     "class_sampling_steps": 2, "sample_batch_size": 2},
], ids=["center-crop", "random-views-with-prior"])
def test_cached_training_steps_do_no_image_work(make_cfg, tmp_path, monkeypatch, overrides):
    cached = Trainer(make_cfg(output_dir=str(tmp_path / "cached"), max_steps=5, **overrides)).setup()
    plain = Trainer(make_cfg(output_dir=str(tmp_path / "plain"), max_steps=5, cache_latents=False,
                             **overrides)).setup()
    counts = count_image_work(monkeypatch)  # after setup: caching itself transforms every view once
    plain.train()
    assert counts["transform"] >= 5  # the counter sees an uncached run's images
    counts.update(transform=0, hash=0)
    cached.train()
    assert counts == {"transform": 0, "hash": 0}
    assert cached.inputs.latent_cache.misses == 0
    side = cached.cfg.resolution
    cached.inputs.latent_cache.rows_of([torch.zeros(3, side, side)])
    assert counts["hash"] == 1  # the hash counter is hooked up: hashing a view counts


def test_latents_are_sampled_each_step_from_the_cached_distribution(make_cfg):
    trainer = Trainer(make_cfg()).setup()
    cache = trainer.inputs.latent_cache
    rows = CacheRows(next(trainer.batches())["pixel_values"][:1])
    first, second = trainer.inputs.encode_images(rows, trainer.state.generator), trainer.inputs.encode_images(rows, trainer.state.generator)
    assert not torch.equal(first, second)  # not one frozen sample
    row = rows[0]
    draws = torch.stack([trainer.inputs.encode_images(rows, trainer.state.generator)[0] for _ in range(400)])
    torch.testing.assert_close(draws.mean(0), cache.mean[row] * cache.scaling, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), cache.std[row] * cache.scaling, atol=0.05, rtol=0.1)


def test_an_image_missing_from_the_cache_is_encoded_on_the_fly(make_cfg, caplog):
    trainer = Trainer(make_cfg()).setup()
    before = len(trainer.inputs.latent_cache)
    stranger = torch.rand(1, 3, 32, 32) * 2 - 1
    with caplog.at_level(logging.WARNING):
        trainer.inputs.encode_images(stranger, trainer.state.generator)
    assert len(trainer.inputs.latent_cache) == before + 1 and trainer.inputs.latent_cache.misses == 1
    assert "not in the latent cache" in caplog.text
    with torch.no_grad():
        mean = trainer.components.vae.encode(stranger).latent_dist.mean
    torch.testing.assert_close(trainer.inputs.latent_cache.mean[-1:], mean, rtol=1e-4, atol=1e-5)


def test_cache_setting_is_planned(make_cfg):
    plan = resolve(make_cfg(), Machine(), epoch_items=4)
    assert plan.cache_latents and plan.choices["cache_latents"].why == "VAE frozen"  # auto: the VAE never trains
    assert not resolve(make_cfg(cache_latents=False), Machine(), epoch_items=4).cache_latents


@cuda
@pytest.mark.gpu
def test_vae_leaves_the_gpu_after_caching(make_cfg):
    trainer = Trainer(make_cfg()).setup()
    assert trainer.inputs.latent_cache is not None
    assert next(trainer.components.vae.parameters()).device.type == "cpu"
    assert next(trainer.components.text_encoder.parameters()).device.type == "cpu"
    logs = trainer.step.run(trainer.batches(), trainer.state)
    assert torch.isfinite(torch.tensor(logs["loss"]))
