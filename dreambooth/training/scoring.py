"""Scored validation (validation.metrics): each validation step's images and model scored with dreambooth.eval;
the base model's scores and the real photos' embeddings are taken once, before the first step."""

from __future__ import annotations

import logging

import torch

from dreambooth.config.schema import Config
from dreambooth.data.dataset import list_images, load_image_files
from dreambooth.data.subjects import Subject
from dreambooth.errors import UserError
from dreambooth.eval import metrics
from dreambooth.eval.denoise import PROBE_IMAGES, make_probe, probe_loss
from dreambooth.eval.models import Clip, Dino, require
from dreambooth.eval.prompts import SubjectText
from dreambooth.training.compiling import eager

log = logging.getLogger(__name__)

IMAGE_METRICS = ("dino", "clip_i", "clip_t")
HOW = "eval.clip_model / eval.dino_model"


def check_scoring(cfg: Config, subjects: list[Subject], prompts: list[str]) -> None:
    """Refuse, before a run writes anything, metrics it could not compute: models that are not there, a subject
    without class noun or class images."""
    wanted = set(cfg.validation.metrics) if cfg.validation.enabled else set()
    models = {}
    if wanted & {"clip_i", "clip_t"}:
        models["CLIP"] = cfg.eval.clip_model
    if "dino" in wanted:
        models["DINO"] = cfg.eval.dino_model
    require(models, HOW)
    if wanted & set(IMAGE_METRICS):
        texts = [SubjectText.from_prompts(s.instance_prompt, s.class_prompt) for s in subjects]
        if not any(t.names(p) for t in texts for p in prompts):
            log.warning("validation.metrics %s: no validation prompt names a subject (%s), so no image is scored",
                        "/".join(sorted(wanted & set(IMAGE_METRICS))), ", ".join(t.phrase for t in texts))
    if "drift" in wanted:
        for s in subjects:
            if not s.class_prompt:
                raise UserError(f"validation.metrics drift needs the class prompt of {s.dir}: add \"class_prompt\" "
                                "to its dataset_info.json or set the subject's class_prompt")
            if not cfg.with_prior_preservation and not (s.class_dir.is_dir() and _class_files(s)):
                raise UserError(f"validation.metrics drift needs class images in {s.class_dir}: sample them with "
                                "`dreambooth classes CONFIG`, or train with with_prior_preservation: true")


def _class_files(subject: Subject) -> list:
    return list_images(subject.class_dir)[:PROBE_IMAGES]


class ValidationScorer:
    """Scores the live model of a run: the UNet and text encoder it trains, the frozen VAE, at fixed inputs."""

    def __init__(self, cfg: Config, subjects: list[Subject], instance_images: list[list], accelerator, components,
                 unet, unet_embeds, weight_dtype):
        self.cfg, self.metrics, self.subjects = cfg, list(cfg.validation.metrics), subjects
        self.instance_images = instance_images
        self.accelerator, self.components, self.unet = accelerator, components, unet
        self.unet_embeds, self.weight_dtype = unet_embeds, weight_dtype
        self.texts = [SubjectText.from_prompts(s.instance_prompt, s.class_prompt) for s in subjects] \
            if set(self.metrics) & set(IMAGE_METRICS) else []
        self.base: dict[str, float] = {}  # the model before training, on the same inputs
        self.reference: dict[str, float | None] = {}  # real photos against each other
        self.probes: dict = {}
        self.clip = self.dino = None
        self.real: dict[str, list[torch.Tensor]] = {}  # model -> each subject's real-image embeddings

    @property
    def device(self):
        return self.accelerator.device

    # ------------------------------------------------------------------------------------------ before training
    def prepare(self) -> None:
        """The fixed inputs, the base model's losses and the real photos' embeddings (main process; call while the
        UNet is still the base model, under preserved_training_state)."""
        cfg, c = self.cfg, self.components
        T = c.noise_scheduler.config.num_train_timesteps
        if "loss" in self.metrics:
            images = [im for ims in self.instance_images for im in ims[:PROBE_IMAGES]]
            prompts = [s.instance_prompt for s, ims in zip(self.subjects, self.instance_images)
                       for _ in ims[:PROBE_IMAGES]]
            self.probes["loss"] = make_probe(images, prompts, c.vae, cfg.resolution, T, cfg.seed, device=self.device,
                                             dtype=self.weight_dtype)
        if "drift" in self.metrics:
            images, prompts = [], []
            for s in self.subjects:
                loaded = load_image_files(_class_files(s), cfg.resolution, s.class_dir)[0]
                images += loaded
                prompts += [s.class_prompt] * len(loaded)
            self.probes["class_loss"] = make_probe(images, prompts, c.vae, cfg.resolution, T, cfg.seed + 1,
                                                   device=self.device, dtype=self.weight_dtype)
        self.base = self._losses()
        if set(self.metrics) & {"clip_i", "clip_t"}:
            self.clip = Clip(cfg.eval.clip_model, HOW)
        if "dino" in self.metrics:
            self.dino = Dino(cfg.eval.dino_model, HOW)
        for name, model in (("clip_i", self.clip), ("dino", self.dino)):
            if model is not None and name in self.metrics:
                self.real[name] = [model.images(ims, self.device) for ims in self.instance_images]
                self.reference[name] = metrics.mean_of([metrics.self_similarity(e) for e in self.real[name]])

    def _losses(self) -> dict[str, float]:
        unet = self.accelerator.unwrap_model(self.unet)
        out = {}
        with eager(unet):
            for name, probe in self.probes.items():
                embeds = self.unet_embeds(probe.prompts)  # as training feeds the UNet
                out[name] = probe_loss(unet, probe, embeds, self.components.noise_scheduler, self.device,
                                       self.weight_dtype, self.accelerator.autocast)
        return out

    # ------------------------------------------------------------------------------------------ each validation
    def score(self, images: dict[str, list]) -> dict[str, float]:
        """The scores of the model as it is now and of its validation images {prompt: images}."""
        scores = {}
        losses = self._losses()
        if "loss" in self.metrics:
            scores["loss"] = losses["loss"]
        if "drift" in self.metrics:
            scores["class_loss"] = losses["class_loss"]
            scores["drift"] = losses["class_loss"] - self.base["class_loss"]
        if self.texts:
            scores.update(self._image_scores(images))
        return scores

    def _image_scores(self, images: dict[str, list]) -> dict[str, float]:
        """DINO and CLIP-I over every (image, real photo of its subject) pair; CLIP-T of each image with its
        prompt, the subject named by its class noun. Prompts that name no subject are not scored."""
        per_subject: list[list] = [[] for _ in self.texts]
        neutral: list[list[str]] = [[] for _ in self.texts]
        for prompt, ims in images.items():
            k = next((k for k, t in enumerate(self.texts) if t.names(prompt)), None)
            if k is not None:
                per_subject[k] += ims
                neutral[k] += [self.texts[k].neutral(prompt)] * len(ims)
        generated = [im for ims in per_subject for im in ims]
        if not generated:
            return {}
        counts = [len(ims) for ims in per_subject]
        clip = self.clip.images(generated, self.device) if self.clip is not None else None
        embeds = {"clip_i": clip, "dino": self.dino.images(generated, self.device) if self.dino else None}
        out = {}
        for name in ("dino", "clip_i"):
            if name in self.real:
                split = embeds[name].split(counts)
                out[name] = sum(metrics.mean_pairwise(e, r) * len(e)
                                for e, r in zip(split, self.real[name]) if len(e)) / len(generated)
        if "clip_t" in self.metrics:
            out["clip_t"] = metrics.paired(clip, self.clip.texts([p for ps in neutral for p in ps], self.device))
        return out
