"""Latent cache: encode every training image with the frozen VAE once, then draw each step's latents from the
cached distribution (mean + std * noise, the trainer's generator), so the VAE can leave the GPU.

Deterministic transforms (centre crop, no flip) give one entry per image. Random crops or flips are replaced by
`latent_cache_views` fixed augmented views per image, drawn from the seed; each item picks one of them with its
own generator. Batches are matched to entries by a hash of their pixels, so the training loop is unchanged.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import ImageTransform
from .errors import UserError
from .models import on_device

log = logging.getLogger(__name__)

ENCODE_BATCH = 4  # images per VAE call while caching: at 512 px each holds ~0.5 GB of activations


def pixel_key(pixels: torch.Tensor) -> bytes:
    """A digest of one image tensor's exact values."""
    arr = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(arr.data, digest_size=16).digest()


def view_generator(seed: int, image: int, view: int) -> torch.Generator:
    """The generator of augmented view `view` of image number `image`; fixed by the seed."""
    state = np.random.SeedSequence([int(seed), 0x1A7E, int(image), int(view)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class CachedViews:
    """Stands in for a random ImageTransform: each call returns one of `views` fixed views of the image."""

    def __init__(self, transform: ImageTransform, views: int, seed: int):
        self.transform, self.views, self.seed = transform, views, seed
        self.image_ids: dict[int, tuple[object, int]] = {}  # id(img) -> (img, number); img held so ids stay unique

    def register(self, img) -> int:
        if id(img) not in self.image_ids:
            self.image_ids[id(img)] = (img, len(self.image_ids))
        return self.image_ids[id(img)][1]

    def view(self, img, v: int) -> torch.Tensor:
        return self.transform(img, view_generator(self.seed, self.register(img), v))

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        v = int(torch.randint(0, self.views, (1,), generator=generator))
        return self.view(img, v)

    def __getattr__(self, name):  # resolution, center_crop, ... of the wrapped transform
        return getattr(self.transform, name)


def image_sources(dataset) -> list[tuple[object, str, list]] | None:
    """(owner, transform attribute, images) for every image list of the dataset; None if its layout is unknown."""
    if hasattr(dataset, "datasets"):  # several subjects, ConcatDataset-like
        parts = [image_sources(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    transform = getattr(dataset, "transform", None)
    if not hasattr(dataset, "instance_images") or not isinstance(transform, (ImageTransform, CachedViews)):
        return None
    # DreamBoothDataset transforms instance and class images alike, with its one `transform`.
    lists = (dataset.instance_images, getattr(dataset, "class_images", None) or [])
    return [(dataset, "transform", images) for images in lists if images]


def should_cache(setting, vae_frozen: bool, sources) -> tuple[bool, str]:
    """(cache?, why) for `cache_latents` auto/true/false; true when caching is impossible is a user error."""
    if setting is False:
        return False, "cache_latents: false"
    problem = ("the VAE is trained" if not vae_frozen else
               "the dataset's images or transforms are of an unknown kind" if sources is None else None)
    if problem:
        if setting is True:
            raise UserError(f"cache_latents: true cannot work here ({problem}): set cache_latents: auto")
        return False, f"not cached: {problem}"
    return True, "VAE frozen"


class LatentCache:
    """Mean and std of the VAE's latent distribution for every distinct training image tensor."""

    def __init__(self, vae, device, dtype, scaling_factor: float):
        self.vae, self.device, self.dtype, self.scaling = vae, torch.device(device), dtype, scaling_factor
        self.rows: dict[bytes, int] = {}
        self.mean = self.std = None  # [N, C, h, w] float32 on CPU; a step's rows are moved to the device
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # encoded chunks not yet joined to mean/std
        self.misses = 0

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def add(self, pixel_list: list[torch.Tensor], keys: list[bytes]) -> None:
        """Encode images (batched) and append their rows."""
        if not pixel_list:
            return
        means, stds = [], []
        for i in range(0, len(pixel_list), ENCODE_BATCH):
            m, s = self._encode(torch.stack(pixel_list[i:i + ENCODE_BATCH]))
            means.append(m)
            stds.append(s)
        start = len(self.rows)
        for j, key in enumerate(keys):
            self.rows[key] = start + j
        self._pending.append((torch.cat(means), torch.cat(stds)))

    def _join(self) -> None:
        """Join the encoded chunks once, not at every add (which would copy the whole cache each time)."""
        if self._pending:
            means = ([self.mean] if self.mean is not None else []) + [m for m, _ in self._pending]
            stds = ([self.std] if self.std is not None else []) + [s for _, s in self._pending]
            self.mean, self.std, self._pending = torch.cat(means), torch.cat(stds), []

    def sample(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of a [B, 3, H, W] batch: a fresh sample of each image's cached distribution."""
        keys = [pixel_key(x) for x in pixels]
        missing = [(k, x) for k, x in zip(keys, pixels) if k not in self.rows]
        if missing:
            self._fill_misses(missing)
        self._join()
        rows = torch.tensor([self.rows[k] for k in keys])
        mean = self.mean[rows].to(self.device)
        std = self.std[rows].to(self.device)
        # Same draw as diffusers' DiagonalGaussianDistribution.sample, so cached and uncached runs match.
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return (mean + std * noise.to(self.device)) * self.scaling

    def _fill_misses(self, missing: list[tuple[bytes, torch.Tensor]]) -> None:
        """An image not seen at build time: bring the VAE back to encode it (slow, so warn once)."""
        if not self.misses:
            log.warning("an image was not in the latent cache; encoding it now (the dataset changed after caching?)")
        self.misses += len(missing)
        unique = dict(missing)
        with on_device(self.vae, self.device):
            self.add(list(unique.values()), list(unique))


def build_latent_cache(dataset, vae, device, dtype, seed: int, views: int, setting="auto",
                       quiet: bool = False, offload: bool = True) -> LatentCache | None:
    """Cache the latents of every image the dataset can produce (installing CachedViews for random transforms),
    then move the VAE to the CPU. Returns None when caching is off or not valid."""
    sources = image_sources(dataset)
    on, why = should_cache(setting, not any(p.requires_grad for p in vae.parameters()), sources)
    if not on:
        log.info("latent cache off: %s", why)
        return None
    cache = LatentCache(vae, device, dtype, vae.config.scaling_factor)
    wrappers: dict[int, CachedViews] = {}
    jobs = []  # (transform or wrapper, image)
    for owner, attr, images in sources:
        transform = getattr(owner, attr)
        if isinstance(transform, CachedViews):
            wrappers[id(transform.transform)] = transform
        elif not transform.is_deterministic:
            wrapper = wrappers.setdefault(id(transform), CachedViews(transform, views, seed))
            setattr(owner, attr, wrapper)
            transform = wrapper
        jobs += [(transform, img) for img in images]
    total = sum(t.views if isinstance(t, CachedViews) else 1 for t, _ in jobs)
    pending, keys = [], []
    with tqdm(total=total, desc="caching latents", unit="view", disable=quiet) as bar:
        for transform, img in jobs:
            outs = ([transform.view(img, v) for v in range(transform.views)] if isinstance(transform, CachedViews)
                    else [transform(img)])
            for x in outs:
                key = pixel_key(x)
                # Views that come out identical (an image already at the training size, no flip) share a row.
                if key not in cache.rows and key not in keys:
                    pending.append(x)
                    keys.append(key)
            if len(pending) >= ENCODE_BATCH:
                cache.add(pending, keys)
                pending, keys = [], []
            bar.update(len(outs))
        cache.add(pending, keys)
    cache._join()
    if offload:
        vae.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("latent cache: %d entries for %d images (%s)", len(cache), len(jobs), why)
    return cache
