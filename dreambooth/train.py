"""The Trainer: setup() loads model and data, train() runs the loop, save() writes a diffusers pipeline."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import Config, save_config, subjects_of
from .data import DreamBoothDataset, ImageTransform, collate, load_images, resolve_prompts
from .errors import UserError
from .loss import add_noise, dreambooth_loss, training_target
from .models import load_components, make_optimizer, resolve_optimizer, resolve_precision

log = logging.getLogger(__name__)

MARKER = "dreambooth_run.json"  # marks a folder as ours, so a rerun may overwrite it


def check_output_dir(path: str) -> Path:
    """Refuse a non-empty foreign folder or an unwritable place, before anything is written."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a folder path for output_dir")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"output_dir {out} is not empty and was not written by dreambooth: "
                        "choose a new output_dir or empty that folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"output_dir {out} cannot be written ({parent} is read-only): choose a writable output_dir")
    return out


class Trainer:
    """DreamBooth fine-tuning of one SD pipeline: setup() -> train() -> save()."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = check_output_dir(cfg.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.precision = resolve_precision(cfg)
        self.optimizer_name = resolve_optimizer(cfg)
        if cfg.with_prior_preservation:
            raise UserError("with_prior_preservation: true is not supported yet: set it to false")
        self.dataset = self._build_dataset()
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available())
        set_seed(cfg.seed)
        c = self.components = load_components(cfg)

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MARKER).write_text(json.dumps({"tool": "dreambooth", "version": __version__}))
        save_config(cfg, self.out / "config.yaml")

        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        c.vae.requires_grad_(False).eval().to(device, self.weight_dtype)
        c.text_encoder.requires_grad_(cfg.train_text_encoder)
        c.text_encoder.to(device, torch.float32 if cfg.train_text_encoder else self.weight_dtype)
        c.unet.requires_grad_(True).train().to(device)
        if cfg.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                c.text_encoder.gradient_checkpointing_enable()
        if torch.cuda.is_available() and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        self.text_cache = {} if cfg.train_text_encoder else self._encode_prompts_once()
        params = [p for m in self._trainable() for p in m.parameters() if p.requires_grad]
        self.params = params
        optimizer = make_optimizer(params, cfg, self.optimizer_name)
        self.total_steps = self._total_steps()
        from diffusers.optimization import get_scheduler
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        prepared = self.accelerator.prepare(*self._trainable(), optimizer)
        self.unet, self.optimizer = prepared[0], prepared[-1]
        if cfg.train_text_encoder:
            c.text_encoder = prepared[1]
        # Noise and timesteps come from our own generator so a checkpoint can restore the stream exactly.
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + self.accelerator.process_index)
        self.alphas_cumprod = c.noise_scheduler.alphas_cumprod.to(device)
        return self

    def _trainable(self) -> list[torch.nn.Module]:
        c = self.components
        return [c.unet, c.text_encoder] if self.cfg.train_text_encoder else [c.unet]

    def _build_dataset(self) -> DreamBoothDataset:
        cfg = self.cfg
        subject = subjects_of(cfg)[0]
        instance_prompt, class_prompt = resolve_prompts(subject.dir, subject.instance_prompt, subject.class_prompt)
        images, _ = load_images(subject.dir, cfg.resolution)
        self.prompts = [instance_prompt]
        transform = ImageTransform(cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip)
        return DreamBoothDataset(images, instance_prompt, transform, seed=cfg.seed)

    def _total_steps(self) -> int:
        micro_per_epoch = math.ceil(len(self._shard(list(range(len(self.dataset))))) / self.cfg.batch_size)
        self.steps_per_epoch = max(1, math.ceil(micro_per_epoch / self.cfg.gradient_accumulation_steps))
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch

    # ------------------------------------------------------------------------------------------ encoding
    def _tokens(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.accelerator.device)

    @torch.no_grad()
    def _encode_prompts_once(self) -> dict[str, torch.Tensor]:
        """Frozen text encoder: encode each distinct prompt once, then move the encoder off the GPU."""
        prompts = sorted(set(self.prompts))
        te = self.components.text_encoder
        cache = {p: te(self._tokens([p]))[0][0] for p in prompts}
        te.to("cpu")
        return cache

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if self.text_cache:
            return torch.stack([self.text_cache[p] for p in prompts])
        return self.components.text_encoder(self._tokens(prompts))[0]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.accelerator.device, self.weight_dtype)).latent_dist
            return dist.sample(generator=self.gen).float() * vae.config.scaling_factor

    # ------------------------------------------------------------------------------------------ loop
    def _shard(self, order: list[int]) -> list[int]:
        return order[self.accelerator.process_index::self.accelerator.num_processes]

    def batches(self):
        """Batches forever, in an order drawn from (seed, epoch) so any position can be reproduced."""
        while True:
            self.dataset.set_epoch(self.epoch)
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch)
            order = self._shard(torch.randperm(len(self.dataset), generator=g).tolist())
            for i in range(0, len(order), self.cfg.batch_size):
                yield collate([self.dataset[j] for j in order[i:i + self.cfg.batch_size]])
            self.epoch += 1

    def forward_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Noise the batch's latents at random timesteps and score the UNet's prediction."""
        latents = self.encode_images(batch["pixel_values"])
        embeds = self.encode_prompts(batch["prompts"])
        noise = torch.randn(latents.shape, generator=self.gen, device=latents.device)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=self.gen,
                          device=latents.device)
        noisy = add_noise(latents, noise, t, self.alphas_cumprod)
        with self.accelerator.autocast():
            pred = self.unet(noisy, t, embeds.to(self.weight_dtype if not self.cfg.train_text_encoder else embeds.dtype)).sample
        target = training_target(latents, noise, t, self.alphas_cumprod,
                                 self.components.noise_scheduler.config.prediction_type)
        total, instance, prior = dreambooth_loss(pred, target, len(batch["prompts"]), self.cfg.prior_loss_weight)
        return {"loss": total, "instance_loss": instance, **({"prior_loss": prior} if prior is not None else {})}

    def train_step(self, batches) -> dict[str, float]:
        """One optimisation step: accumulate micro-batches, clip, step optimizer and schedule."""
        accum = self.cfg.gradient_accumulation_steps
        logs: dict[str, float] = {}
        for i in range(accum):
            # Only the last micro-batch syncs gradients across processes.
            ctx = nullcontext() if i == accum - 1 else self.accelerator.no_sync(self.unet)
            with ctx:
                losses = self.forward_loss(next(batches))
                self.accelerator.backward(losses["loss"] / accum)
            for k, v in losses.items():
                logs[k] = logs.get(k, 0.0) + v.item() / accum
        logs["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        return logs

    def train(self) -> dict:
        cfg = self.cfg
        start, batches = time.time(), self.batches()
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="training", unit="step",
                   disable=cfg.quiet or not self.accelerator.is_local_main_process)
        while self.global_step < self.total_steps:
            logs = self.train_step(batches)
            self.global_step += 1
            self.after_step(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            bar.update(1)
        bar.close()
        self.wall_time = time.time() - start
        return self.summary()

    def after_step(self, logs: dict[str, float]) -> None:
        """Bookkeeping after each optimisation step (checkpoints, validation and logging hook in here)."""
        self.losses.append(logs["loss"])

    # ------------------------------------------------------------------------------------------ output
    def summary(self) -> dict:
        import accelerate
        import diffusers
        import transformers

        cuda = torch.cuda.is_available()
        samples = self.global_step * self.cfg.batch_size * self.cfg.gradient_accumulation_steps
        return {
            "steps": self.global_step,
            "epochs": round(self.global_step / self.steps_per_epoch, 3),
            "final_loss": self.losses[-1] if self.losses else None,
            "mean_loss": sum(self.losses) / len(self.losses) if self.losses else None,
            "wall_time_s": round(self.wall_time, 3),
            "samples_per_s": round(samples / self.wall_time, 4) if self.wall_time else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else _peak_rss(),
            "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "mixed_precision": self.precision,
            "optimizer": self.optimizer_name,
            "versions": {"dreambooth": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        }

    def pipeline(self):
        """The trained pipeline: our UNet (and text encoder), the base model's other parts in fp32."""
        from diffusers import StableDiffusionPipeline

        from .models import load_frozen
        c, unwrap = self.components, self.accelerator.unwrap_model
        text_encoder = unwrap(c.text_encoder) if self.cfg.train_text_encoder else None
        vae, base_te = load_frozen(self.cfg) if self.weight_dtype != torch.float32 else (c.vae, c.text_encoder)
        return StableDiffusionPipeline(
            vae=vae.to("cpu"), text_encoder=(text_encoder or base_te).to("cpu", torch.float32),
            tokenizer=c.tokenizer, unet=unwrap(self.unet).to("cpu", torch.float32), scheduler=c.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def save(self, summary: dict | None = None) -> Path:
        """Write the pipeline (safetensors) beside config.yaml and train_summary.json; swap in when complete."""
        if not self.accelerator.is_main_process:
            return self.out
        tmp = self.out / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        self.pipeline().save_pretrained(tmp, safe_serialization=True)
        for item in tmp.iterdir():
            target = self.out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        if summary is not None:
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return self.out


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_training(cfg: Config) -> dict:
    """setup -> train -> save; returns the summary."""
    trainer = Trainer(cfg).setup()
    summary = trainer.train()
    trainer.save(summary)
    return summary
