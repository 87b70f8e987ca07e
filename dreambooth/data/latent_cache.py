"""Latent cache: encode every training image with the frozen VAE once, then draw each step's latents from the
cached distribution (mean + std * noise, the trainer's generator), so the VAE can leave the GPU.

Deterministic transforms (centre crop, no flip) give one entry per image. Random crops or flips are replaced by
`latent_cache_views` fixed augmented views per image, drawn from the seed; each item picks one of them with its
own generator. Once cached, items carry their view's cache row instead of pixels (data.CacheRows in a batch), so
a training step does no image work; a pixel tensor is still matched to its entry by a hash of its values.
With buckets, views of each size are kept (and encoded) apart; a batch is of one size. Masks need no VAE: an
item's mask is cut like the view it got.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from tqdm.auto import tqdm

from dreambooth.data.dataset import CacheRows, ImageTransform, mixed_seed
from dreambooth.models.load import on_device

log = logging.getLogger(__name__)

ENCODE_BATCH = 4  # images per VAE call while caching: at 512 px each holds ~0.5 GB of activations


def pixel_key(pixels: torch.Tensor) -> bytes:
    """A digest of one image tensor's exact values."""
    arr = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(arr.data, digest_size=16).digest()


def view_generator(seed: int, image: int, view: int) -> torch.Generator:
    """The generator of augmented view `view` of image number `image`; fixed by the seed."""
    return torch.Generator().manual_seed(mixed_seed(seed, 0x1A7E, image, view))


class CachedViews:
    """Stands in for an ImageTransform once latents are cached: each call returns the cache row of one of the
    image's `views` fixed views (one for a deterministic transform), picked with the item's generator."""

    def __init__(self, transform: ImageTransform, views: int, seed: int, cache: LatentCache):
        self.transform, self.views, self.seed, self.cache = transform, views, seed, cache
        # id(img) -> (img, row of each view, its number); img is held so its id stays unique.
        self.rows: dict[int, tuple[object, list[int], int]] = {}

    def add(self, img, late: bool = False) -> list[int]:
        """Give IMG's views their cache rows: queued for the VAE while caching, encoded at once when LATE."""
        if id(img) not in self.rows:
            number = len(self.rows)
            pixels = [self.transform(img, view_generator(self.seed, number, v)) for v in range(self.views)]
            self.rows[id(img)] = (img, (self.cache.lookup if late else self.cache.rows_of)(pixels), number)
        return self.rows[id(img)][1]

    def __call__(self, img, generator: torch.Generator | None = None, mask=None):
        """The cache row of one of IMG's views; with MASK, (row, the mask cut like that view)."""
        rows = self.add(img, late=True)  # late: only an image added after caching is not in self.rows yet
        # A deterministic transform draws nothing from the generator, so neither does its single view.
        view = int(torch.randint(0, len(rows), (1,), generator=generator)) if len(rows) > 1 else 0
        if mask is None:
            return rows[view]
        place = self.transform.placement(img, view_generator(self.seed, self.rows[id(img)][2], view))
        return rows[view], self.transform.cut_mask(img, mask, place)


def image_sources(dataset) -> list[tuple[object, str, list]]:
    """(owner, transform attribute, images) for every image list of the dataset: each subject's instance and class
    images (a DreamBoothDataset transforms both with its one `transform`)."""
    datasets = dataset.datasets if hasattr(dataset, "datasets") else [dataset]
    return [(d, "transform", images) for d in datasets for images in (d.instance_images, d.class_images) if images]


class LatentCache:
    """Mean and std of the VAE's latent distribution for every distinct training view."""

    def __init__(self, vae, device, dtype, scaling_factor: float):
        self.vae, self.device, self.dtype, self.scaling = vae, torch.device(device), dtype, scaling_factor
        self.rows: dict[bytes, int] = {}  # pixel digest -> row
        self.places: list[tuple[tuple, int]] = []  # row -> (pixel shape, its index in that shape's page)
        self.counts: dict[tuple, int] = {}  # pixel shape -> its rows so far
        # pixel shape -> [mean, std], each [N, C, h, w] float32 on CPU; a step's rows are moved to the device
        self.pages: dict[tuple, list[torch.Tensor]] = {}
        self._queued: dict[tuple, list[torch.Tensor]] = {}  # views given a row, not yet encoded, by shape
        self._pending: dict[tuple, list] = {}  # encoded (mean, std) chunks not yet joined to their page
        self.misses = 0

    def __len__(self) -> int:
        return len(self.rows)

    def _page(self, part: int) -> torch.Tensor | None:
        self._join()
        if len(self.pages) > 1:
            raise ValueError("this latent cache holds several image sizes (buckets): read its pages")
        return next(iter(self.pages.values()))[part] if self.pages else None

    @property
    def mean(self) -> torch.Tensor | None:
        """[N, C, h, w] latent means of a cache of one image size, row by row."""
        return self._page(0)

    @property
    def std(self) -> torch.Tensor | None:
        return self._page(1)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def rows_of(self, views: list[torch.Tensor]) -> list[int]:
        """The row of each view (a pixel tensor); new ones are queued for encoding, identical ones share a row."""
        out = []
        for x in views:
            key = pixel_key(x)
            if key not in self.rows:
                shape = tuple(x.shape)
                # A shape's page follows its queue's order, which encoding keeps.
                self.counts[shape] = self.counts.get(shape, 0) + 1
                self.places.append((shape, self.counts[shape] - 1))
                self.rows[key] = len(self.rows)
                self._queued.setdefault(shape, []).append(x)
            out.append(self.rows[key])
        return out

    def encode_queued(self, full_only: bool = False) -> None:
        """Encode the queued views, ENCODE_BATCH of one shape per VAE call (with FULL_ONLY, only whole batches)."""
        for shape, queue in self._queued.items():
            while len(queue) >= (ENCODE_BATCH if full_only else 1):
                chunk, queue[:] = queue[:ENCODE_BATCH], queue[ENCODE_BATCH:]
                self._pending.setdefault(shape, []).append(self._encode(torch.stack(chunk)))

    def lookup(self, views: list[torch.Tensor]) -> list[int]:
        """Rows of VIEWS; ones not seen at build time bring the VAE back to be encoded (slow, so warn once)."""
        known = len(self.rows)
        rows = self.rows_of(views)
        if len(self.rows) > known:
            if not self.misses:
                log.warning("an image was not in the latent cache; encoding it now (the dataset changed after "
                            "caching?)")
            self.misses += len(self.rows) - known
            with on_device(self.vae, self.device):
                self.encode_queued()
        return rows

    def _join(self) -> None:
        """Join the encoded chunks once, not at every encode (which would copy the whole cache each time)."""
        for shape, chunks in self._pending.items():
            page = self.pages.get(shape, [])
            self.pages[shape] = [torch.cat(page[i:i + 1] + [c[i] for c in chunks]) for i in (0, 1)]
        self._pending = {}

    def sample(self, pixels: CacheRows | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of a batch, given by its CacheRows or as a [B, 3, H, W] tensor (matched by its values):
        a fresh sample of each image's cached distribution."""
        places = [self.places[r] for r in (pixels if isinstance(pixels, CacheRows) else self.lookup(list(pixels)))]
        self._join()
        if any(shape != places[0][0] for shape, _ in places):
            raise ValueError("a batch mixes image sizes: bucketed batches hold one bucket")
        page = self.pages[places[0][0]]
        rows = torch.tensor([i for _, i in places])
        mean = page[0][rows].to(self.device)
        std = page[1][rows].to(self.device)
        # Same draw as diffusers' DiagonalGaussianDistribution.sample, so cached and uncached runs match.
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return (mean + std * noise.to(self.device)) * self.scaling


def build_latent_cache(sources, vae, device, dtype, seed: int, views: int, quiet: bool = False) -> LatentCache:
    """Cache the latents of every view the dataset's items can get (SOURCES, from image_sources), installing
    CachedViews so that items carry cache rows instead of pixels; then move the VAE to the CPU."""
    cache = LatentCache(vae, device, dtype, vae.config.scaling_factor)
    wrappers: dict[int, CachedViews] = {}  # one per transform, so images it shares keep one numbering
    jobs = []  # (wrapper, image)
    for owner, attr, images in sources:
        transform = getattr(owner, attr)
        # An owner's class images come after its instance images, whose loop turn already installed the wrapper.
        transform = transform.transform if isinstance(transform, CachedViews) else transform
        count = 1 if transform.is_deterministic else views
        wrapper = wrappers.setdefault(id(transform), CachedViews(transform, count, seed, cache))
        setattr(owner, attr, wrapper)
        jobs += [(wrapper, img) for img in images]
    with tqdm(total=sum(w.views for w, _ in jobs), desc="caching latents", unit="view", disable=quiet) as bar:
        for wrapper, img in jobs:
            wrapper.add(img)  # views that come out identical (e.g. no flip at the training size) share a row
            cache.encode_queued(full_only=True)
            bar.update(wrapper.views)
        cache.encode_queued()
    cache._join()
    vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("latent cache: %d entries for %d images", len(cache), len(jobs))
    return cache
