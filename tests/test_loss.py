"""Loss targets against hand-computed values and diffusers' own DDPM scheduler."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.training.loss import add_noise, dreambooth_loss, training_target


def schedule():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_epsilon_target_is_the_noise():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(training_target(x0, eps, t, schedule().alphas_cumprod, "epsilon"), eps)


def test_v_target_hand_computed():
    ac = torch.tensor([0.25, 0.64])
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 3.0)
    v = training_target(x0, eps, torch.tensor([1]), ac, "v_prediction")
    # v = sqrt(0.64) * 3 - sqrt(0.36) * 2 = 2.4 - 1.2
    assert v.item() == pytest.approx(1.2)
    noisy = add_noise(x0, eps, torch.tensor([0]), ac)
    assert noisy.item() == pytest.approx(math.sqrt(0.25) * 2 + math.sqrt(0.75) * 3)


def test_matches_diffusers_scheduler():
    s = schedule()
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(add_noise(x0, eps, t, s.alphas_cumprod), s.add_noise(x0, eps, t))
    torch.testing.assert_close(training_target(x0, eps, t, s.alphas_cumprod, "v_prediction"),
                               s.get_velocity(x0, eps, t))


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="sample"):
        training_target(torch.zeros(1), torch.zeros(1), torch.tensor([0]), torch.ones(2), "sample")


def test_instance_plus_weighted_prior():
    pred = torch.tensor([[1.0], [3.0]])
    target = torch.zeros(2, 1)
    total, inst, prior = dreambooth_loss(pred, target, n_instance=1, prior_loss_weight=0.5)
    assert (inst.item(), prior.item(), total.item()) == (1.0, 9.0, 5.5)
    total, inst, prior = dreambooth_loss(pred[:1], target[:1], n_instance=1, prior_loss_weight=0.5)
    assert prior is None and total.item() == 1.0
