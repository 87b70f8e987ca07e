"""Loss targets and per-timestep loss weights against hand-computed values and diffusers' own DDPM scheduler."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.training.loss import add_noise, dreambooth_loss, loss_weights, snr, training_target, weighted_mse


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


# --- loss weighting by timestep ---------------------------------------------------------------------------------

AC = torch.tensor([0.5, 0.8, 0.2])  # SNR = a / (1 - a) = 1, 4, 0.25
T = torch.tensor([0, 1, 2])


def test_snr_hand_computed():
    torch.testing.assert_close(snr(AC, T), torch.tensor([1.0, 4.0, 0.25]))


def test_min_snr_weights_hand_computed():
    # min(SNR, 2) = 1, 2, 0.25; epsilon divides by SNR, v by SNR + 1.
    torch.testing.assert_close(loss_weights("min_snr", AC, T, "epsilon", gamma=2.0), torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(loss_weights("min_snr", AC, T, "v_prediction", gamma=2.0),
                               torch.tensor([0.5, 0.4, 0.2]))


def test_min_snr_weights_at_sd_timesteps():
    ac = schedule().alphas_cumprod
    t = torch.tensor([0, 250, 500, 999])
    for prediction_type, denominator in (("epsilon", 0), ("v_prediction", 1)):
        want = []
        for i in t.tolist():
            a = float(ac[i])
            s = a / (1 - a)
            want.append(min(s, 5.0) / (s + denominator))
        got = loss_weights("min_snr", ac, t, prediction_type, gamma=5.0)
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=0)
    assert loss_weights("min_snr", ac, torch.tensor([999]), "epsilon").item() == pytest.approx(1.0)  # SNR < 5


def test_min_snr_with_infinite_gamma():
    ac, t = schedule().alphas_cumprod, torch.arange(1000)
    assert torch.equal(loss_weights("min_snr", ac, t, "epsilon", gamma=math.inf), torch.ones(1000))
    # v: SNR / (SNR + 1) = a_t, which turns the v loss into the epsilon loss of the same prediction.
    torch.testing.assert_close(loss_weights("min_snr", ac, t, "v_prediction", gamma=math.inf), ac)


def epsilon_of(v_pred, x0, eps, t, ac):
    """The epsilon a v prediction implies: eps = sqrt(a) v + sqrt(1 - a) x_t."""
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * v_pred + (1 - a).sqrt() * add_noise(x0, eps, t, ac)


@pytest.mark.parametrize("kind", ["min_snr", "debiased"])
def test_v_weights_give_the_epsilon_objective(kind):
    # The same weighting on either target is the same objective for the same prediction (the v form of min_snr
    # is the one that long went wrong elsewhere).
    ac, t = schedule().alphas_cumprod, torch.tensor([1, 100, 500, 999])
    g = torch.Generator().manual_seed(0)
    x0, eps, v_pred = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    v = training_target(x0, eps, t, ac, "v_prediction")
    on_v = weighted_mse(v_pred, v, loss_weights(kind, ac, t, "v_prediction"))
    on_eps = weighted_mse(epsilon_of(v_pred, x0, eps, t, ac), eps, loss_weights(kind, ac, t, "epsilon"))
    torch.testing.assert_close(on_v, on_eps, rtol=1e-5, atol=0)


def test_debiased_weights_hand_computed():
    torch.testing.assert_close(loss_weights("debiased", AC, T, "epsilon"), torch.tensor([1.0, 0.5, 2.0]))
    torch.testing.assert_close(loss_weights("debiased", AC, T, "v_prediction"), torch.tensor([0.5, 0.4, 0.4]))
    # SNR at t = 0 of SD's schedule is about 1175: capped at 1000.
    assert loss_weights("debiased", schedule().alphas_cumprod, torch.tensor([0]), "epsilon").item() == \
        pytest.approx(1000 ** -0.5)


def test_no_weighting_is_the_plain_loss():
    assert loss_weights("none", AC, T, "epsilon") is None
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(weighted_mse(pred, target, None), torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(weighted_mse(pred, target, torch.ones(3)), weighted_mse(pred, target))


def test_instance_and_prior_weighted_alike():
    pred, target = torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1)
    total, inst, prior = dreambooth_loss(pred, target, n_instance=1, prior_loss_weight=0.5,
                                         weights=torch.tensor([2.0, 0.5]))
    assert (inst.item(), prior.item(), total.item()) == (2.0, 4.5, 4.25)
