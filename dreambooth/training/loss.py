"""Pure loss functions: forward diffusion, the epsilon / v-prediction target, per-timestep loss weights, masks,
instance + prior loss."""

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


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each sample's timestep: SNR(t) = a_t / (1 - a_t)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


DEBIAS_MAX_SNR = 1000.0  # SNR near t = 0 is huge; capped as kohya-ss sd-scripts does


def loss_weights(kind: str, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str,
                 gamma: float = 5.0) -> torch.Tensor | None:
    """Per-sample weights of the squared error by timestep; None for "none" (plain MSE).

    min_snr (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): the x_0-space weight
    min(SNR, gamma), which is min(SNR, gamma) / SNR on the epsilon loss and min(SNR, gamma) / (SNR + 1) on the v loss
    (the v loss is (SNR + 1) times the x_0 loss, the epsilon loss SNR times). debiased (Yu et al. 2023, "Debias the
    Training of Diffusion Models", as kohya-ss sd-scripts offers it): 1 / sqrt(SNR) on the epsilon loss, SNR capped
    at 1000; on the v loss the same objective, sqrt(SNR) / (SNR + 1) (sd-scripts uses 1 / (SNR + 1) there).
    """
    if kind == "none":
        return None
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"loss weighting needs epsilon or v_prediction, not {prediction_type!r}")
    s = snr(alphas_cumprod, timesteps)
    v = prediction_type == "v_prediction"
    if kind == "min_snr":
        clipped = torch.minimum(s, torch.full_like(s, gamma))
        return clipped / (s + 1) if v else clipped / s
    if kind == "debiased":
        s = s.clamp(max=DEBIAS_MAX_SNR)
        return s.sqrt() / (s + 1) if v else 1 / s.sqrt()
    raise ValueError(f"unknown loss weighting {kind!r}: use none, min_snr or debiased")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32. MASK [B, 1, h, w] (masked_loss) makes it a mean over the weighted pixels only;
    WEIGHTS [B] (loss_weighting) scale each sample's mean. Plain mse when both are None."""
    if weights is None:
        return masked_mse(pred, target, mask)
    err = (pred.float() - target.float()).square()
    dims = tuple(range(1, pred.ndim))
    if mask is None:
        per_sample = err.mean(dim=dims)
    else:
        w = mask.to(err.device, torch.float32).expand_as(err)
        per_sample = (err * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-12)
    return (per_sample * weights.to(per_sample.device, torch.float32)).mean()


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


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_loss_weight: float,
                    weights: torch.Tensor | None = None, instance_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss of a joined batch (instances first, then class examples): instance MSE + weight x prior MSE, each
    sample weighted by `weights` when given (instances and class examples alike). INSTANCE_MASK [n_instance, 1, h, w]
    (masked_loss) weights the instance pixels; the prior loss is untouched.

    Returns (total, instance, prior); prior is None when the batch holds no class examples.
    """
    part = (lambda s: None) if weights is None else (lambda s: weights[s])
    instance = weighted_mse(pred[:n_instance], target[:n_instance], part(slice(None, n_instance)), instance_mask)
    if pred.shape[0] == n_instance:
        return instance, instance, None
    prior = weighted_mse(pred[n_instance:], target[n_instance:], part(slice(n_instance, None)))
    return instance + prior_loss_weight * prior, instance, prior
