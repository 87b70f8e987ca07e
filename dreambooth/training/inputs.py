"""What the UNet is fed: batches in a reproducible order, prompt embeddings (cached when the text encoder is frozen)
and image latents (from the latent cache, or the VAE)."""

from __future__ import annotations

import logging

import torch

from dreambooth.config.plan import RunPlan
from dreambooth.data.buckets import epoch_slots
from dreambooth.data.dataset import collate
from dreambooth.data.latent_cache import build_latent_cache, image_sources
from dreambooth.data.subjects import MultiSubjectDataset
from dreambooth.models.load import Components, on_device
from dreambooth.training.state import TrainState

log = logging.getLogger(__name__)

class Inputs:
    """Batches and encodings for one process of a run."""

    def __init__(self, plan: RunPlan, dataset, components: Components, device: torch.device, weight_dtype,
                 process_index: int = 0, num_processes: int = 1):
        self.cfg, self.dataset, self.components = plan.config, dataset, components
        self.device, self.weight_dtype = device, weight_dtype
        self.process_index, self.num_processes = process_index, num_processes
        self.caches_prompts = self.cfg.cache_prompts and not plan.trains_text_encoder
        self.caches_latents = plan.cache_latents
        self.text_cache: dict[str, torch.Tensor] = {}  # prompt -> embedding, filled by encode_prompts
        self.latent_cache = None

    def fill_caches(self, prompts: list[str]) -> None:
        """Encode the training prompts once (then the frozen encoder leaves the GPU) and cache the latents."""
        warn_long_prompts(self.components.tokenizer, sorted(set(prompts)))
        if self.caches_prompts:
            self.encode_prompts(sorted(set(prompts)))
            self.components.text_encoder.to("cpu")
        if self.caches_latents:
            self.latent_cache = build_latent_cache(image_sources(self.dataset), self.components.vae, self.device,
                                                   self.weight_dtype, self.cfg.seed, self.cfg.latent_cache_views,
                                                   quiet=self.cfg.quiet)

    # ------------------------------------------------------------------------------------------ batches
    def _shard(self, order: list[int]) -> list[int]:
        return order[self.process_index::self.num_processes]

    def batches(self, state: TrainState):
        """Batches forever, in an order drawn from (seed, epoch) so any position can be reproduced; `state` holds
        the position (epoch, batch_in_epoch) and is advanced as batches are handed out."""
        cfg = self.cfg
        while True:
            self.dataset.set_epoch(state.epoch)
            if isinstance(self.dataset, MultiSubjectDataset):  # one subject per batch, subjects taking turns
                groups = self._shard(self.dataset.epoch_batches(state.epoch, cfg.seed))
            elif self.dataset.buckets is not None:  # batches of one bucket each
                groups = self._shard(epoch_slots(self.dataset, state.epoch, cfg.seed, cfg.batch_size))
            else:
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + state.epoch)
                order = self._shard(torch.randperm(len(self.dataset), generator=g).tolist())
                groups = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            # A resumed run starts mid-epoch: skip the batches its checkpoint had already used.
            while state.batch_in_epoch < len(groups):
                group = groups[state.batch_in_epoch]
                state.batch_in_epoch += 1  # counted before the yield: the consumer owns the batch from here
                yield collate([self.dataset[j] for j in group])
            state.epoch += 1
            state.batch_in_epoch = 0

    # ------------------------------------------------------------------------------------------ encoding
    def _tokens(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[B, 77, D] embeddings; a frozen encoder's are computed once per distinct prompt and kept."""
        te = self.components.text_encoder
        if not self.caches_prompts:
            return te(self._tokens(prompts))[0]
        new = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        if new:  # training prompts at setup; validation's own prompts when first seen (encoder brought back)
            with torch.no_grad(), on_device(te, self.device):
                self.text_cache.update({p: te(self._tokens([p]))[0][0] for p in new})
        return torch.stack([self.text_cache[p] for p in prompts])

    def unet_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings as the UNet takes them: a trained text encoder's fp32 output keeps its precision, cached
        ones take the compute dtype."""
        embeds = self.encode_prompts(prompts)
        return embeds if self.cfg.train_text_encoder else embeds.to(self.weight_dtype)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of a batch's pixels (or cache rows), sampled with `generator`."""
        if self.latent_cache is not None:
            return self.latent_cache.sample(pixels, generator)
        vae = self.components.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
            return dist.sample(generator=generator).float() * vae.config.scaling_factor


def warn_long_prompts(tokenizer, prompts: list[str]) -> None:
    """The text encoder reads at most model_max_length tokens (77 with start and end): say which prompts lose words."""
    limit = tokenizer.model_max_length
    long = [p for p in prompts if len(tokenizer(p, truncation=False, verbose=False).input_ids) > limit]
    if long:
        log.warning("%d training prompt(s) are longer than the text encoder's %d tokens and are cut there, e.g. "
                    "'%s': shorten the caption, or the words past the limit do not reach the model",
                    len(long), limit, long[0][:80] + ("..." if len(long[0]) > 80 else ""))
