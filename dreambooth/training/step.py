"""One optimisation step: noise the batch's latents, score the UNet (class images joined in or in a second pass),
backpropagate over the micro-batches, clip, and step the optimizer and the LR schedule."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager, nullcontext
from typing import NamedTuple

import torch

from dreambooth.config.plan import RunPlan
from dreambooth.training.inputs import Inputs
from dreambooth.training.loss import add_noise, dreambooth_loss, loss_weights, mask_weight, training_target, weighted_mse
from dreambooth.training.state import TrainState


class Noised(NamedTuple):
    """A batch's latents, the noise the target is made of, its timesteps, and the noise its UNet input is made with
    (the same tensor unless input_perturbation is on)."""
    latents: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    input_noise: torch.Tensor


class TrainStep:
    """The step function of a run, over the prepared (trained) modules and optimizer it is handed."""

    def __init__(self, plan: RunPlan, accelerator, inputs: Inputs, trained: list[torch.nn.Module], optimizer,
                 lr_scheduler, paramwise, params: list[torch.nn.Parameter], noise_scheduler, weight_dtype, ema=None):
        self.plan, self.cfg, self.accelerator, self.inputs = plan, plan.config, accelerator, inputs
        self.unet, self.trained = trained[0], trained  # prepared (DDP-wrapped when launched) modules
        self.optimizer, self.lr_scheduler, self.paramwise, self.params = optimizer, lr_scheduler, paramwise, params
        self.prediction_type = noise_scheduler.config.prediction_type
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
        self.weight_dtype = weight_dtype
        self.ema = ema  # training/ema.py: updated after every step that moved the weights
        self.graphs = plan.compile and plan.compile_mode == "reduce-overhead"

    @property
    def fused(self) -> bool:
        """The optimizer steps inside backward (memory profiles 8gb/6gb)."""
        return self.paramwise is not None and self.paramwise.fused

    def noised(self, pixels, generator: torch.Generator) -> Noised:
        """Latents of `pixels` with their noise and timesteps, drawn in this order from `generator`, then the noise
        offset and input perturbation draws, each only when its option is on (so default runs draw what they
        always drew).

        Instances are drawn before class images, so a prior run's instance part sees a no-prior run's draws."""
        latents = self.inputs.encode_images(pixels, generator)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=generator,
                          device=latents.device)
        if self.cfg.noise_offset:  # one constant per sample and channel: lets the mean brightness be learnt
            shape = (*latents.shape[:2], *[1] * (latents.ndim - 2))
            noise = noise + self.cfg.noise_offset * torch.randn(shape, generator=generator, device=latents.device)
        input_noise = noise
        if self.cfg.input_perturbation:  # the UNet sees slightly other noise than its target is made of
            input_noise = noise + self.cfg.input_perturbation * torch.randn(
                latents.shape, generator=generator, device=latents.device)
        return Noised(latents, noise, t, input_noise)

    def predict(self, part: Noised, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's prediction for the noised latents, and its training target."""
        embeds = self.inputs.unet_embeds(prompts)
        noisy = add_noise(part.latents, part.input_noise, part.t, self.alphas_cumprod)
        with self.accelerator.autocast():
            pred = self.unet(noisy, part.t, embeds).sample
        return pred, training_target(part.latents, part.noise, part.t, self.alphas_cumprod, self.prediction_type)

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights of timesteps `t` (loss_weighting), or None for the plain MSE."""
        return loss_weights(self.cfg.loss_weighting, self.alphas_cumprod, t, self.prediction_type, self.cfg.snr_gamma)

    def forward_loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Score the UNet on the batch's noised latents, class images joined to the instances in one forward."""
        parts = [self.noised(batch["pixel_values"], generator)]
        prompts = list(batch["prompts"])
        if batch.get("has_class"):
            parts.append(self.noised(batch["class_pixel_values"], generator))
            prompts += batch["class_prompts"]
        mask = self.instance_weight(batch, parts[0].latents)
        if len(parts) > 1 and parts[0].latents.shape[1:] != parts[1].latents.shape[1:]:  # class images: other bucket
            return self.split_loss(parts, batch, mask)
        part = Noised(*(torch.cat(x) for x in zip(*parts)))
        pred, target = self.predict(part, prompts)
        total, instance, prior = dreambooth_loss(pred, target, len(batch["prompts"]), self.cfg.prior_loss_weight,
                                                 self.weights(part.t), mask)
        return {"loss": total, "instance_loss": instance, **({"prior_loss": prior} if prior is not None else {})}

    def split_loss(self, parts: list[Noised], batch: dict, mask) -> dict[str, torch.Tensor]:
        """Instance and class images of different sizes (buckets): one forward each, the joined forward's loss."""
        instance = weighted_mse(*self.predict(parts[0], batch["prompts"]), self.weights(parts[0].t), mask)
        prior = weighted_mse(*self.predict(parts[1], batch["class_prompts"]), self.weights(parts[1].t))
        return {"loss": instance + self.cfg.prior_loss_weight * prior, "instance_loss": instance, "prior_loss": prior}

    def instance_weight(self, batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
        """masked_loss: the batch's masks as per-latent-pixel weights of the instance loss; else None."""
        if "masks" not in batch:
            return None
        return mask_weight(batch["masks"].to(latents.device), latents.shape[-2:], self.cfg.mask_min)

    def sequential_backward(self, batch: dict, scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """prior_mode sequential: instance and class passes backpropagate one after the other into the same
        gradients, so activations of only one half are alive at a time; same gradient as forward_loss. A fused
        step checks the loss before each pass (see loss_finite)."""
        instance_part = self.noised(batch["pixel_values"], generator)
        class_part = self.noised(batch["class_pixel_values"], generator)
        with self.no_sync():  # gradients sync once, after the second pass
            instance = weighted_mse(*self.predict(instance_part, batch["prompts"]), self.weights(instance_part.t),
                                    self.instance_weight(batch, instance_part.latents))
            go_on = self.loss_finite({"loss": instance})
            if go_on:
                self.accelerator.backward(instance * scale)
        weight = self.cfg.prior_loss_weight
        if go_on:
            prior = weighted_mse(*self.predict(class_part, batch["class_prompts"]), self.weights(class_part.t))
        else:  # a fused step that failed its check ends here: the class pass would be wasted
            prior = torch.full_like(instance, math.nan)
        losses = {"loss": instance.detach() + weight * prior.detach(), "instance_loss": instance.detach(),
                  "prior_loss": prior.detach()}
        if go_on and self.loss_finite(losses):  # the micro-batch's whole loss, before the pass that steps
            self.accelerator.backward(prior * (weight * scale))
        return losses

    def run(self, batches, state: TrainState) -> dict[str, float]:
        """One optimisation step: accumulate micro-batches, clip, step optimizer and schedule. With the step fused
        into backward, a non-finite loss ends the step before its backward, and nothing of the step is applied."""
        accum = self.cfg.gradient_accumulation_steps
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's CUDA-graph outputs may be reused
        logs: dict[str, float] = {}
        dropped = False
        for i in range(accum):
            batch = next(batches)  # drawn even when dropped, so the data position never depends on a NaN
            if dropped:
                continue
            # Only the last micro-batch syncs gradients across processes.
            with nullcontext() if i == accum - 1 else self.no_sync():
                if batch.get("has_class") and self.plan.prior_mode == "sequential":
                    losses = self.sequential_backward(batch, 1 / accum, state.generator)
                else:
                    losses = self.forward_loss(batch, state.generator)
                    loss = losses["loss"]  # loss_finite may swap the dict's entries for detached host copies
                    if self.loss_finite(losses):
                        self.accelerator.backward(loss / accum)
            values = {k: v.item() for k, v in losses.items()}  # one device sync per loss (fused: already on host)
            for k, v in values.items():
                logs[k] = logs.get(k, 0.0) + v / accum
            state.subjects.track(batch, values)
            dropped = self.fused and not math.isfinite(values["loss"])  # then its backward did not run
        logs.update(state.subjects.step_means())
        if dropped:  # forget the gradients earlier passes left for the step's last one, which never came
            self.paramwise.discard_step()
            logs["grad_norm"] = math.nan
        else:
            logs["grad_norm"] = self.clip_gradients()
        finite = math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])
        if finite or self.accelerator.scaler is not None:  # the fp16 scaler skips bad steps itself (and backs off)
            self.optimizer.step()
        skipped = not finite or self.accelerator.optimizer_step_was_skipped
        if not skipped:  # a skipped step leaves weights, moments, schedule and average where they were
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        logs["skipped"] = float(skipped)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        return logs

    @contextmanager
    def no_sync(self):
        """Hold back the gradient all-reduce of every trained module (accelerate's no_sync takes one model):
        a trained text encoder left out would all-reduce on every micro-batch."""
        with ExitStack() as stack:
            for model in self.trained:  # the prepared (DDP-wrapped) modules, which own no_sync
                stack.enter_context(self.accelerator.no_sync(model))
            yield

    def loss_finite(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether backward may run on losses["loss"]. With the step fused into backward a non-finite loss would move
        weights before the step could be skipped, so the losses come to the host first, in place (the one sync a
        micro-batch pays anyway, moved before backward). Unfused: True, and they are read after backward as ever."""
        if not self.fused:
            return True
        losses.update({k: v.detach().cpu() for k, v in losses.items()})
        return bool(losses["loss"].isfinite())

    def clip_gradients(self) -> float:
        """Clip to max_grad_norm and return the global norm. With the step fused into backward the update is done:
        this closes the step (its norm clips the next step's gradients)."""
        if self.fused:
            return self.paramwise.close_step()
        return float(self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
