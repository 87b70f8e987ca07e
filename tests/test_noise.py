"""Noise offset and input perturbation: what they change in a step's draws, and that default runs draw as before."""

import dataclasses

import torch

from dreambooth.training.trainer import Trainer


def draws(trainer, pixels, seed: int = 5, **options):
    """The Noised parts of `pixels` from a fresh generator, with the step's config changed by `options`."""
    step = trainer.step
    step.cfg = dataclasses.replace(trainer.cfg, **options)
    g = torch.Generator().manual_seed(seed)
    part = step.noised(pixels, g)
    step.cfg = trainer.cfg
    return part, g


def first_pixels(trainer):
    return next(trainer.batches())["pixel_values"]


def test_noise_offset_moves_each_channel_mean_and_nothing_else(make_cfg):
    trainer = Trainer(make_cfg(batch_size=2)).setup()
    pixels = first_pixels(trainer)
    plain, _ = draws(trainer, pixels)
    offset, _ = draws(trainer, pixels, noise_offset=0.1)
    assert torch.equal(offset.latents, plain.latents) and torch.equal(offset.t, plain.t)
    shift = offset.noise - plain.noise
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(shift, per_channel.expand_as(shift), rtol=0, atol=1e-6)  # a constant per channel
    assert per_channel.flatten().unique().numel() == shift.shape[0] * shift.shape[1]  # its own per sample, channel
    assert 0 < per_channel.abs().max() < 1  # ~ 0.1 x N(0, 1)
    assert offset.input_noise is offset.noise  # the input is noised with it as well


def test_input_perturbation_changes_only_the_input_noise(make_cfg):
    trainer = Trainer(make_cfg()).setup()
    pixels = first_pixels(trainer)
    plain, _ = draws(trainer, pixels)
    perturbed, _ = draws(trainer, pixels, input_perturbation=0.1)
    assert torch.equal(perturbed.noise, plain.noise) and torch.equal(perturbed.t, plain.t)
    extra = perturbed.input_noise - perturbed.noise
    assert 0.05 < extra.std() < 0.2  # 0.1 x N(0, 1) per element


def test_default_run_draws_exactly_what_it_always_drew(make_cfg):
    # Off by default, the options draw nothing: after a step's noising the generator stands where the three
    # draws (VAE/cache sample, noise, timesteps) leave it, so every later number is as before.
    trainer = Trainer(make_cfg()).setup()
    pixels = first_pixels(trainer)
    _, g = draws(trainer, pixels)
    ref = torch.Generator().manual_seed(5)
    latents = trainer.inputs.encode_images(pixels, ref)
    torch.randn(latents.shape, generator=ref)
    torch.randint(0, 1000, (latents.shape[0],), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    _, on = draws(trainer, pixels, noise_offset=0.1, input_perturbation=0.1)
    assert not torch.equal(on.get_state(), ref.get_state())
    assert trainer.step.weights(torch.tensor([0, 999])) is None  # loss_weighting none: the plain MSE


def test_quality_options_train(make_cfg):
    cfg = make_cfg(max_steps=2, loss_weighting="min_snr", noise_offset=0.05, input_perturbation=0.1)
    trainer = Trainer(cfg).setup()
    summary = trainer.train()
    assert summary["steps"] == 2 and all(0 < loss < 10 for loss in trainer.state.losses)
