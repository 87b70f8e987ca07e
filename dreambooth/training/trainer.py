"""The Trainer: setup() loads model and data, train() runs the loop, save() writes a diffusers pipeline."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth.training import checkpoint
from dreambooth.data.latent_cache import build_latent_cache, image_sources, should_cache
from dreambooth.training.compiling import check_compile, compile_unet, resolve_compile
from dreambooth.config.schema import Config, resolve_key, save_config
from dreambooth.training.hooks import TrainerHooks
from dreambooth.training.inputs import TrainerInputs
from dreambooth.models.lora import add_lora_layers, learning_rate, require_peft, trains_text_encoder_lora
from dreambooth.training.loss import add_noise, dreambooth_loss, mse, training_target
from dreambooth.training.memory import apply_memory_profile
from dreambooth.models.load import load_components, resolve_precision
from dreambooth.training.optim import make_optimizer, resolve_optimizer
from dreambooth.export.output_dir import TrainerOutput, check_output_dir, mark_output_dir
from dreambooth.training.runlog import RunLog, tracker_kwargs
from dreambooth.training.validation import Validator

log = logging.getLogger(__name__)


class Trainer(TrainerInputs, TrainerHooks, TrainerOutput):
    """DreamBooth fine-tuning of one SD pipeline: setup() -> train() -> save()."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = check_output_dir(cfg.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` already used: with (seed, epoch) it fixes the data position
        self.bad_steps = 0  # consecutive steps skipped for non-finite loss or gradients
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step: int | None = None
        # The memory profile fills in its settings first, so checkpoints see the same resolved config.
        self.memory = apply_memory_profile(cfg)
        check_compile(cfg)  # after the profile, which fills in prior_mode
        if cfg.finetune == "lora":
            require_peft()
            # The resolved rate (1e-4 when unset) goes into the config, so config.yaml, logs and exports tell the truth.
            cfg.learning_rate = learning_rate(cfg)
            cfg.provided.add("learning_rate")
        # Checked before anything is written: a bad resume (or old checkpoints in a fresh run) leaves no trace.
        self.resume_from = checkpoint.resolve_resume(cfg, self.out)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.precision = resolve_precision(cfg)
        self.optimizer_name = resolve_optimizer(cfg)
        self.dataset = self._build_dataset()  # samples missing class images first, then frees the sampler
        # accelerate keeps one mixed precision per process; a later run in the same process may use another.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available(),
                                       **tracker_kwargs(cfg, self.out))
        set_seed(cfg.seed)
        c = self.components = load_components(cfg)

        mark_output_dir(self.out)
        sources = image_sources(self.dataset)
        caching = should_cache(cfg.cache_latents, True, sources)  # the VAE is never trained (frozen below)
        for key, value, why in (("mixed_precision", self.precision, ""), ("optimizer", self.optimizer_name, ""),
                                ("cache_latents", *caching)):
            if getattr(cfg, key) == "auto":  # recorded like the memory profile's choices, cfg left as given
                resolve_key(cfg, key, value, why, apply=False)
        self.total_steps = self._total_steps()
        auto_compile = cfg.compile == "auto"
        resolve_compile(cfg, self.memory, self.total_steps, processes=self.accelerator.num_processes)
        save_config(cfg, self.out / "config.yaml")  # auto keys stay auto; this machine's choices in comments
        self.runlog = RunLog(self)  # output_dir/train.log, loss history, TensorBoard

        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        c.vae.requires_grad_(False).eval().to(device, self.weight_dtype)
        c.text_encoder.requires_grad_(cfg.train_text_encoder)
        c.text_encoder.to(device, self.memory.master_dtype if cfg.train_text_encoder else self.weight_dtype)
        # Trainable weights take the master dtype on the way to the device: fp32 (half-precision weights would
        # break the fp16 grad scaler), or bf16 in the low profiles without an fp32 copy ever on the GPU.
        # nn.Module.to, because diffusers' own .to warns on every dtype cast.
        torch.nn.Module.to(c.unet.requires_grad_(True).train(), device, self.memory.master_dtype)
        if cfg.finetune == "lora":  # frozen base in compute precision; only the LoRA layers train (lora.py)
            add_lora_layers(c, cfg, device, self.weight_dtype)
        if cfg.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                c.text_encoder.gradient_checkpointing_enable()
        if torch.cuda.is_available() and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if torch.cuda.is_available() and not (self.memory.fused_backward or torch.backends.cudnn.deterministic):
            torch.backends.cudnn.benchmark = True  # fixed shapes: time conv kernels once (not in low profiles)
        if cfg.compile:
            if self.memory.fused_backward:  # a compiled backward hands every gradient over at once
                log.warning("compile: true with memory_profile %s holds all gradients at once, which the optimizer "
                            "step fused into backward exists to avoid: expect more memory", self.memory.profile)
            compile_unet(c.unet, cfg.compile_mode, fall_back=auto_compile)

        self.text_cache: dict[str, torch.Tensor] = {}  # prompt -> embedding, filled by encode_prompts
        if self._caches_prompts:
            self._encode_prompts_once()
        self.latent_cache = build_latent_cache(sources, caching, c.vae, device, self.weight_dtype, cfg.seed,
                                               cfg.latent_cache_views, quiet=cfg.quiet)
        params = [p for m in self._trainable() for p in m.parameters() if p.requires_grad]
        self.params = params
        optimizer = make_optimizer(params, cfg, self.optimizer_name, plan=self.memory)  # LoRA's rate set in __init__
        self.paramwise = optimizer if self.memory.paramwise else None  # bf16 weights and/or steps inside backward
        from diffusers.optimization import get_scheduler
        schedule = cfg.lr_scheduler
        if schedule == "constant" and cfg.lr_warmup_steps:  # diffusers' plain constant would drop the warm-up
            schedule = "constant_with_warmup"
        self.lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        prepared = self.accelerator.prepare(*self._trainable(), optimizer)
        self.unet, self.optimizer = prepared[0], prepared[-1]
        if self.trains_text_encoder:
            c.text_encoder = prepared[1]
        # Noise and timesteps come from our own generator so a checkpoint can restore the stream exactly.
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + self.accelerator.process_index)
        self.alphas_cumprod = c.noise_scheduler.alphas_cumprod.to(device)
        if self.resume_from is not None:  # last, so everything it restores (RNG streams above all) stays put
            checkpoint.restore(self, self.resume_from)
        self.validator = Validator(self) if cfg.validation.enabled else None
        self.runlog.start()
        return self

    @property
    def _fused(self) -> bool:
        """The optimizer steps inside backward (memory profiles 8gb/6gb)."""
        return self.paramwise is not None and self.paramwise.fused

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder trains: fully (train_text_encoder) or through LoRA layers (finetune: lora)."""
        return self.cfg.train_text_encoder or trains_text_encoder_lora(self.cfg)

    def _trainable(self) -> list[torch.nn.Module]:
        c = self.components
        return [c.unet, c.text_encoder] if self.trains_text_encoder else [c.unet]

    # ------------------------------------------------------------------------------------------ loop
    def _noised(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents of `pixels` with their noise and timesteps, drawn in this order from the trainer's generator.

        Instances are drawn before class images, so a prior run's instance part sees a no-prior run's draws."""
        latents = self.encode_images(pixels)
        noise = torch.randn(latents.shape, generator=self.gen, device=latents.device)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=self.gen,
                          device=latents.device)
        return latents, noise, t

    def _predict(self, latents, noise, t, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's prediction for the noised latents, and its training target."""
        embeds = self.encode_prompts(prompts)
        noisy = add_noise(latents, noise, t, self.alphas_cumprod)
        with self.accelerator.autocast():
            # A trained text encoder's fp32 output keeps its precision into the UNet; cached ones use the compute dtype.
            embeds = embeds if self.cfg.train_text_encoder else embeds.to(self.weight_dtype)
            pred = self.unet(noisy, t, embeds).sample
        target = training_target(latents, noise, t, self.alphas_cumprod,
                                 self.components.noise_scheduler.config.prediction_type)
        return pred, target

    def forward_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Score the UNet on the batch's noised latents, class images joined to the instances in one forward."""
        parts = [self._noised(batch["pixel_values"])]
        prompts = list(batch["prompts"])
        if batch.get("has_class"):
            parts.append(self._noised(batch["class_pixel_values"]))
            prompts += batch["class_prompts"]
        latents, noise, t = (torch.cat(x) for x in zip(*parts))
        pred, target = self._predict(latents, noise, t, prompts)
        total, instance, prior = dreambooth_loss(pred, target, len(batch["prompts"]), self.cfg.prior_loss_weight)
        return {"loss": total, "instance_loss": instance, **({"prior_loss": prior} if prior is not None else {})}

    def sequential_backward(self, batch: dict, scale: float) -> dict[str, torch.Tensor]:
        """prior_mode sequential: instance and class passes backpropagate one after the other into the same
        gradients, so activations of only one half are alive at a time; same gradient as forward_loss. A fused
        step checks the loss before each pass (see _fused_loss_finite)."""
        instance_part, class_part = self._noised(batch["pixel_values"]), self._noised(batch["class_pixel_values"])
        with self.no_sync():  # gradients sync once, after the second pass
            instance = mse(*self._predict(*instance_part, batch["prompts"]))
            go_on = self._fused_loss_finite({"loss": instance})
            if go_on:
                self.accelerator.backward(instance * scale)
        weight = self.cfg.prior_loss_weight
        if go_on:
            prior = mse(*self._predict(*class_part, batch["class_prompts"]))
        else:  # a fused step that failed its check ends here: the class pass would be wasted
            prior = torch.full_like(instance, math.nan)
        losses = {"loss": instance.detach() + weight * prior.detach(), "instance_loss": instance.detach(),
                  "prior_loss": prior.detach()}
        if go_on and self._fused_loss_finite(losses):  # the micro-batch's whole loss, before the pass that steps
            self.accelerator.backward(prior * (weight * scale))
        return losses

    def train_step(self, batches) -> dict[str, float]:
        """One optimisation step: accumulate micro-batches, clip, step optimizer and schedule. With the step fused
        into backward, a non-finite loss ends the step before its backward, and nothing of the step is applied."""
        accum = self.cfg.gradient_accumulation_steps
        if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's CUDA-graph outputs may be reused
        logs: dict[str, float] = {}
        dropped = False
        for i in range(accum):
            batch = next(batches)  # drawn even when dropped, so the data position never depends on a NaN
            if dropped:
                continue
            # Only the last micro-batch syncs gradients across processes.
            ctx = nullcontext() if i == accum - 1 else self.no_sync()
            with ctx:
                if batch.get("has_class") and self.cfg.prior_mode == "sequential":
                    losses = self.sequential_backward(batch, 1 / accum)
                else:
                    losses = self.forward_loss(batch)
                    loss = losses["loss"]
                    if self._fused_loss_finite(losses):
                        self.accelerator.backward(loss / accum)
            values = {k: v.item() for k, v in losses.items()}  # one device sync per loss (fused: already on host)
            for k, v in values.items():
                logs[k] = logs.get(k, 0.0) + v / accum
            self.subject_stats.track(batch, values)
            dropped = self._fused and not math.isfinite(values["loss"])  # then its backward did not run
        logs.update(self.subject_stats.step_means())
        if dropped:  # forget the gradients earlier passes left for the step's last one, which never came
            self.paramwise.discard_step()
            logs["grad_norm"] = math.nan
        else:
            logs["grad_norm"] = self.clip_gradients()
        finite = math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])
        if finite or self.accelerator.scaler is not None:  # the fp16 scaler skips bad steps itself (and backs off)
            self.optimizer.step()
        skipped = not finite or self.accelerator.optimizer_step_was_skipped
        if not skipped:  # a skipped step leaves weights, moments and the schedule where they were
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logs["skipped"] = float(skipped)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        return logs

    @contextmanager
    def no_sync(self):
        """Hold back the gradient all-reduce of every trained module (accelerate's no_sync takes one model):
        a trained text encoder left out would all-reduce on every micro-batch."""
        trained = [self.unet] + ([self.components.text_encoder] if self.trains_text_encoder else [])
        with ExitStack() as stack:
            for model in trained:  # the prepared (DDP-wrapped) modules, which own no_sync
                stack.enter_context(self.accelerator.no_sync(model))
            yield

    def _fused_loss_finite(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether backward may run on losses["loss"]. With the step fused into backward a non-finite loss would move
        weights before the step could be skipped, so the losses come to the host first, in place (the one sync a
        micro-batch pays anyway, moved before backward). Unfused: True, and they are read after backward as ever."""
        if not self._fused:
            return True
        losses.update({k: v.detach().cpu() for k, v in losses.items()})
        return bool(losses["loss"].isfinite())

    def clip_gradients(self) -> float:
        """Clip to max_grad_norm and return the global norm. With the step fused into backward the update is done:
        this closes the step (its norm clips the next step's gradients)."""
        if self._fused:
            return self.paramwise.close_step()
        return float(self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm))

    def train(self) -> dict:
        cfg = self.cfg
        start, batches = time.time(), self.batches()
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="training", unit="step",
                   disable=cfg.quiet or not self.accelerator.is_local_main_process)
        # Ctrl-C / SIGTERM: finish the step, write a checkpoint, stop (a second one aborts at once).
        with checkpoint.StopSignals() as stop, bar:
            while self.global_step < self.total_steps:
                logs = self.train_step(batches)
                self.global_step += 1
                self.bad_steps = self.bad_steps + 1 if logs.get("skipped") else 0
                self.after_step(logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                bar.update(1)
                if self.bad_steps >= cfg.nan_patience:
                    self._stop_non_finite()
                if self._stop_requested(stop):
                    saved = self.last_checkpoint_step == self.global_step
                    path = self.last_checkpoint if saved else checkpoint.save(self)
                    raise checkpoint.Interrupted(self.global_step, path, stop.requested or "SIGINT")
        checkpoint.assert_finite(self, "final model")  # never hand NaN weights to save()
        self.end_of_training()
        self.wall_time = time.time() - start
        return self.summary()


def run_training(cfg: Config) -> dict:
    """setup -> train -> save -> report.html; returns the summary."""
    trainer = Trainer(cfg).setup()
    error = None
    try:
        summary = trainer.train()
        trainer.save(summary)
        if trainer.accelerator.is_main_process:
            from dreambooth.report.page import write_report
            write_report(trainer.out)
    except BaseException as e:
        error = e
        raise
    finally:
        trainer.runlog.close(error)  # the log file says how the run ended
    return summary
