"""The run's training set: each subject's instance images (with their captions and masks when asked for), its
class images under prior preservation (sampled where missing), their buckets, and the dataset that pairs them."""

from __future__ import annotations

import logging
from contextlib import nullcontext

from dreambooth.config.machine import launched_processes
from dreambooth.config.schema import Config
from dreambooth.data.annotations import read_annotations
from dreambooth.data.buckets import Buckets, bucketed_batches, describe
from dreambooth.data.class_images import ensure_class_images
from dreambooth.data.dataset import DreamBoothDataset, ImageTransform, list_images, load_image_files
from dreambooth.data.subjects import MultiSubjectDataset, Subject
from dreambooth.errors import UserError

log = logging.getLogger(__name__)


class TrainingSet:
    """Loads the subjects' instance images at once (a few photos, so the epoch length is known before the run is
    planned), and their class images when build() is called (which may sample them)."""

    def __init__(self, cfg: Config, subjects: list[Subject]):
        self.cfg, self.subjects = cfg, subjects
        self.buckets = Buckets(cfg.resolution, cfg.bucket_step, cfg.bucket_max_ratio) if cfg.buckets else None
        # Buckets never upscale past the original, so small images need no "will be upscaled" warning.
        self.load_resolution = 0 if self.buckets is not None else cfg.resolution
        self.instance_images, self.annotations = [], []
        for s in subjects:
            files = list_images(s.dir, captions=cfg.captions, masks=cfg.masked_loss)
            images, paths = load_image_files(files, self.load_resolution, s.dir)
            self.instance_images.append(images)
            notes = read_annotations(s.dir, paths, images, s.instance_prompt, cfg.captions, cfg.masked_loss)
            self.annotations.append(notes)
            s.captions = tuple(c for c in notes.captions or () if c)
            self._log_buckets(s.dir, images)
        if cfg.masked_loss and not any(a.masked for a in self.annotations):
            raise UserError(f"masked_loss: true, but no image in {', '.join(str(s.dir) for s in subjects)} has a "
                            "usable mask: add NAME.mask.png beside NAME.jpg (white = subject) or use PNGs with "
                            "transparency, or set masked_loss: false")
        for s, a in zip(subjects, self.annotations):
            if cfg.masked_loss and not a.masked:
                log.warning("masked_loss: %s has no masks: its images count whole", s.dir)

    def epoch_items(self) -> int:
        """Dataset items per epoch, as build()'s dataset will have them (class folders are topped up to exactly
        their num_class_images); with buckets, the items of its batches, short ones padded to a full batch."""
        prior, bs = self.cfg.with_prior_preservation, self.cfg.batch_size
        lengths = [DreamBoothDataset.length(len(images), s.num_class_images if prior else 0)
                   for s, images in zip(self.subjects, self.instance_images)]
        if self.buckets is not None:
            return bs * bucketed_batches(self.buckets, list(zip(self.instance_images, lengths)), bs)
        return lengths[0] if len(lengths) == 1 else MultiSubjectDataset.length(lengths, bs)

    def prompts(self) -> list[str]:
        """Every training prompt: instance prompts, captions, "" under caption dropout, class prompts with prior
        preservation (for the text-embedding cache)."""
        prior = self.cfg.with_prior_preservation
        prompts = [p for s in self.subjects for p in [s.instance_prompt] + ([s.class_prompt] if prior else [])]
        prompts += [c for a in self.annotations for c in a.captions or () if c]
        return prompts + ([""] if self.cfg.caption_dropout else [])

    def build(self) -> DreamBoothDataset | MultiSubjectDataset:
        """Each subject's instance images, paired with its own class images under prior preservation."""
        cfg, subjects = self.cfg, self.subjects
        class_images = self._class_images() if cfg.with_prior_preservation else [[] for _ in subjects]
        transform = ImageTransform(cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                                   buckets=self.buckets)
        datasets = [DreamBoothDataset(images, s.instance_prompt, transform, klass or None,
                                      s.class_prompt if klass else None, seed=cfg.seed + i, name=s.name,
                                      captions=a.captions, masks=a.masks, caption_dropout=cfg.caption_dropout,
                                      buckets=self.buckets)
                    for i, (s, images, klass, a) in enumerate(zip(subjects, self.instance_images, class_images,
                                                                   self.annotations))]
        if len(datasets) == 1:
            return datasets[0]
        weights = [s.weight for s in subjects] if cfg.subject_sampling == "weighted" else [1.0] * len(subjects)
        return MultiSubjectDataset(datasets, weights, cfg.batch_size)

    def _class_images(self) -> list[list]:
        """Each subject's class images: the folders topped up (main process first under accelerate launch; the
        sampler is freed after), then loaded, each file decoded once (checking them decodes most)."""
        decoded: dict = {}  # path -> image, shared by subjects sharing a class folder
        first = nullcontext()
        if launched_processes() > 1:
            from accelerate import PartialState  # only under accelerate launch
            first = PartialState().main_process_first()
        with first:
            paths = ensure_class_images(self.cfg, self.subjects, decoded)
        images = [load_image_files(p, self.load_resolution, s.class_dir, decoded)[0] if p else []
                  for s, p in zip(self.subjects, paths)]
        for s, klass in zip(self.subjects, images):
            self._log_buckets(s.class_dir, klass)
        return images

    def _log_buckets(self, folder, images: list) -> None:
        """Which bucket the folder's images went to, where buckets are on."""
        if self.buckets is not None:
            log.info("buckets of %s: %s", folder, describe([self.buckets.assign(*im.size) for im in images]))
