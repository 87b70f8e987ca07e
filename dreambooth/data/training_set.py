"""The run's training set: each subject's instance images, its class images under prior preservation (sampled
where missing), and the dataset that pairs them."""

from __future__ import annotations

from contextlib import nullcontext

from dreambooth.config.machine import launched_processes
from dreambooth.config.schema import Config
from dreambooth.data.class_images import ensure_class_images
from dreambooth.data.dataset import DreamBoothDataset, ImageTransform, load_image_files, load_images
from dreambooth.data.subjects import MultiSubjectDataset, Subject


class TrainingSet:
    """Loads the subjects' instance images at once (a few photos, so the epoch length is known before the run is
    planned), and their class images when build() is called (which may sample them)."""

    def __init__(self, cfg: Config, subjects: list[Subject]):
        self.cfg, self.subjects = cfg, subjects
        self.instance_images = [load_images(s.dir, cfg.resolution)[0] for s in subjects]

    def epoch_items(self) -> int:
        """Dataset items per epoch, as build()'s dataset will have them (class folders are topped up to exactly
        their num_class_images)."""
        prior = self.cfg.with_prior_preservation
        lengths = [DreamBoothDataset.length(len(images), s.num_class_images if prior else 0)
                   for s, images in zip(self.subjects, self.instance_images)]
        return lengths[0] if len(lengths) == 1 else MultiSubjectDataset.length(lengths, self.cfg.batch_size)

    def prompts(self) -> list[str]:
        """Every training prompt, class prompts included (for the text-embedding cache)."""
        prior = self.cfg.with_prior_preservation
        return [p for s in self.subjects for p in [s.instance_prompt] + ([s.class_prompt] if prior else [])]

    def build(self) -> DreamBoothDataset | MultiSubjectDataset:
        """Each subject's instance images, paired with its own class images under prior preservation."""
        cfg, subjects = self.cfg, self.subjects
        class_images = self._class_images() if cfg.with_prior_preservation else [[] for _ in subjects]
        transform = ImageTransform(cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip)
        datasets = [DreamBoothDataset(images, s.instance_prompt, transform, klass or None,
                                      s.class_prompt if klass else None, seed=cfg.seed + i, name=s.name)
                    for i, (s, images, klass) in enumerate(zip(subjects, self.instance_images, class_images))]
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
        return [load_image_files(p, self.cfg.resolution, s.class_dir, decoded)[0] if p else []
                for s, p in zip(self.subjects, paths)]
