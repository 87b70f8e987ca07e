"""Scores that need no extra model: the denoising loss on fixed latents, noise and timesteps (the subject's
images: how well it is learned; the class images: how far the class moved from the base model)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dreambooth.data.dataset import ImageTransform
from dreambooth.models.load import on_device

PROBE_IMAGES = 8  # images per subject (first by name): enough for a stable mean, cheap at every validation
PROBE_TIMESTEPS = 4  # spread over the schedule: (i + 0.5) / 4 of it
CHUNK = 8  # latents per UNet call


@dataclass
class Probe:
    """Fixed inputs of the denoising loss: latents with their prompts, and noise per timestep."""
    latents: torch.Tensor  # [n, C, h, w], float32 on the CPU
    prompts: list[str]
    timesteps: list[int]
    noise: torch.Tensor  # [len(timesteps), n, C, h, w]

    def __len__(self) -> int:
        return len(self.prompts)


def fixed_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


@torch.no_grad()
def make_probe(images: list, prompts: list[str], vae, resolution: int, num_train_timesteps: int, seed: int = 0,
               timesteps: int = PROBE_TIMESTEPS, device="cpu", dtype=torch.float32) -> Probe:
    """Centre-cropped `images` encoded by `vae` (the latent mean), with noise drawn from `seed` on the CPU."""
    transform = ImageTransform(resolution, center_crop=True)
    pixels = torch.stack([transform(im) for im in images])
    latents = []
    with on_device(vae, torch.device(device)):
        for i in range(0, len(pixels), CHUNK):
            dist = vae.encode(pixels[i:i + CHUNK].to(device, dtype)).latent_dist
            latents.append(dist.mean.float().cpu() * vae.config.scaling_factor)
    latents = torch.cat(latents)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((timesteps, *latents.shape), generator=generator)
    return Probe(latents, list(prompts), fixed_timesteps(timesteps, num_train_timesteps), noise)


@torch.no_grad()
def probe_loss(unet, probe: Probe, embeds: torch.Tensor, scheduler, device, dtype=torch.float32,
               autocast=nullcontext) -> float:
    """Mean squared error of the UNet's prediction (epsilon or v, as `scheduler` says) over the probe's latents
    and timesteps; `embeds` [n, 77, D] are the prompts' embeddings, row for row."""
    n, total = len(probe), 0.0
    pairs = [(k, i) for k in range(len(probe.timesteps)) for i in range(n)]  # every (timestep, latent), CHUNK a call
    for start in range(0, len(pairs), CHUNK):
        ks, rows = (torch.tensor(x) for x in zip(*pairs[start:start + CHUNK]))
        latents = probe.latents[rows].to(device)
        noise = probe.noise[ks, rows].to(device)
        steps = torch.tensor(probe.timesteps)[ks].to(device)
        noisy = scheduler.add_noise(latents, noise, steps)
        target = noise if scheduler.config.prediction_type == "epsilon" else \
            scheduler.get_velocity(latents, noise, steps)
        with autocast():
            pred = unet(noisy.to(dtype), steps, embeds[rows.to(embeds.device)].to(device, dtype)).sample
        total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
    return total / (len(pairs) * probe.latents[0].numel())
