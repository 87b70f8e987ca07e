"""Pure loss functions: forward diffusion, the epsilon / v-prediction target, instance + prior loss, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients shaped to broadcast over a latent batch."""
    return coef.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with a_t the cumulative alpha product."""
    a = alphas_cumprod.to(timesteps.device)[timesteps]
    return _expand(a.sqrt(), latents) * latents + _expand((1 - a).sqrt(), latents) * noise


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity v = sqrt(a) eps - sqrt(1-a) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(timesteps.device)[timesteps]
        return _expand(a.sqrt(), latents) * noise - _expand((1 - a).sqrt(), latents) * latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: use epsilon or v_prediction")


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32, so half-precision predictions do not lose the small differences."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_loss_weight: float,
                    instance_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss of a joined batch (instances first, then class examples): instance MSE + weight x prior MSE.
    INSTANCE_WEIGHT [n_instance, 1, h, w] (masked_loss) weights the instance pixels; the prior loss is untouched.

    Returns (total, instance, prior); prior is None when the batch holds no class examples.
    """
    instance = masked_mse(pred[:n_instance], target[:n_instance], instance_weight)
    if pred.shape[0] == n_instance:
        return instance, instance, None
    prior = mse(pred[n_instance:], target[n_instance:])
    return instance + prior_loss_weight * prior, instance, prior


def mask_weight(masks: torch.Tensor, size, floor: float = 0.0) -> torch.Tensor:
    """Loss weights [B, 1, h, w] at latent SIZE (h, w) from pixel masks [B, 1, H, W] in [0, 1]: each latent
    pixel's share of mask over its area, at least FLOOR (so a background is not ignored entirely)."""
    return F.interpolate(masks.float(), size=tuple(size), mode="area").clamp(min=floor)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mse, or with WEIGHT (broadcast over channels) the weighted mean: only weighted pixels count, and the loss
    keeps its scale whatever the masked area (all-zero weights give 0)."""
    if weight is None:
        return mse(pred, target)
    w = weight.to(pred.device, torch.float32).expand_as(pred)
    return ((pred.float() - target.float()).square() * w).sum() / w.sum().clamp_min(1e-12)
