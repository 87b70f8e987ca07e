"""What a training step consumes, mixed into the Trainer: the subjects' datasets and their batch order, prompt
embeddings (each distinct prompt encoded once when the text encoder is frozen) and image latents (cached or
encoded by the VAE)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from dreambooth.data.dataset import DreamBoothDataset, ImageTransform, collate, load_image_files, load_images
from dreambooth.models.load import launched_processes, on_device
from dreambooth.training.runlog import SubjectStats
from dreambooth.data.subjects import MultiSubjectDataset, resolve_subjects


class TrainerInputs:
    """Datasets, batches and encodings of the Trainer; uses its cfg, accelerator, components and caches."""

    @property
    def _caches_prompts(self) -> bool:
        return self.cfg.cache_prompts and not self.trains_text_encoder

    def _build_dataset(self) -> DreamBoothDataset | MultiSubjectDataset:
        """Each subject's instance images, paired with its own class images under prior preservation."""
        cfg = self.cfg
        subjects = self.subjects = resolve_subjects(cfg)
        class_images = self._class_images(subjects) if cfg.with_prior_preservation else [[] for _ in subjects]
        transform = ImageTransform(cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip)
        datasets, self.prompts = [], []  # every prompt, class prompts included, for the text-embedding cache
        for i, (s, klass) in enumerate(zip(subjects, class_images)):
            images, _ = load_images(s.dir, cfg.resolution)
            datasets.append(DreamBoothDataset(images, s.instance_prompt, transform, klass or None,
                                              s.class_prompt if klass else None, seed=cfg.seed + i, name=s.name))
            self.prompts += [s.instance_prompt] + ([s.class_prompt] if klass else [])
        self.subject_stats = SubjectStats([s.name for s in subjects], cfg)
        if len(datasets) == 1:
            return datasets[0]
        weights = [s.weight for s in subjects] if cfg.subject_sampling == "weighted" else [1.0] * len(subjects)
        return MultiSubjectDataset(datasets, weights, cfg.batch_size)

    def _class_images(self, subjects) -> list[list]:
        """Each subject's class images: the folders topped up (main process first under accelerate launch; the
        sampler is freed after), then loaded, each file decoded once (checking them decodes most)."""
        from dreambooth.data.class_images import ensure_class_images
        decoded: dict = {}  # path -> image, shared by subjects sharing a class folder
        first = nullcontext()
        if launched_processes() > 1:
            from accelerate import PartialState
            first = PartialState().main_process_first()
        with first:
            paths = ensure_class_images(self.cfg, subjects, decoded)
        return [load_image_files(p, self.cfg.resolution, s.class_dir, decoded)[0] if p else []
                for s, p in zip(subjects, paths)]

    def _total_steps(self) -> int:
        micro_per_epoch = math.ceil(len(self._shard(list(range(len(self.dataset))))) / self.cfg.batch_size)
        self.steps_per_epoch = max(1, math.ceil(micro_per_epoch / self.cfg.gradient_accumulation_steps))
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch

    def _shard(self, order: list[int]) -> list[int]:
        return order[self.accelerator.process_index::self.accelerator.num_processes]

    def batches(self):
        """Batches forever, in an order drawn from (seed, epoch) so any position can be reproduced."""
        while True:
            self.dataset.set_epoch(self.epoch)
            if isinstance(self.dataset, MultiSubjectDataset):  # one subject per batch, subjects taking turns
                groups = self._shard(self.dataset.epoch_batches(self.epoch, self.cfg.seed))
            else:
                g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch)
                order = self._shard(torch.randperm(len(self.dataset), generator=g).tolist())
                groups = [order[i:i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]
            # A resumed run starts mid-epoch: skip the batches its checkpoint had already used.
            while self.batch_in_epoch < len(groups):
                group = groups[self.batch_in_epoch]
                self.batch_in_epoch += 1  # counted before the yield: the consumer owns the batch from here
                yield collate([self.dataset[j] for j in group])
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------------------------------ encoding
    def _tokens(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.accelerator.device)

    def _encode_prompts_once(self) -> None:
        """Frozen text encoder: fill text_cache with each distinct training prompt, then move the encoder off the
        GPU."""
        self.encode_prompts(sorted(set(self.prompts)))
        self.components.text_encoder.to("cpu")

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[B, 77, D] embeddings; a frozen encoder's are computed once per distinct prompt and kept."""
        te = self.components.text_encoder
        if not self._caches_prompts:
            return te(self._tokens(prompts))[0]
        new = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        if new:  # training prompts at setup; validation's own prompts when first seen (encoder brought back)
            with torch.no_grad(), on_device(te, self.accelerator.device):
                self.text_cache.update({p: te(self._tokens([p]))[0][0] for p in new})
        return torch.stack([self.text_cache[p] for p in prompts])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.sample(pixels, self.gen)
        vae = self.components.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.accelerator.device, self.weight_dtype)).latent_dist
            return dist.sample(generator=self.gen).float() * vae.config.scaling_factor
