"""The loaded pipeline behind the server: its LoRA adapters by name, its samplers, and one batch at a time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from dreambooth.errors import UserError
from dreambooth.models.pipeline import SCHEDULERS, load_pipeline, set_scheduler
from dreambooth.serve.jobs import Cancelled, Item, Shape
from dreambooth.serve.options import ModelSpec

def resolve_spec(spec: ModelSpec) -> ModelSpec:
    """Check the paths before the server binds, and turn a LoRA run folder into its base plus a default adapter."""
    from dreambooth.models.load import model_kind
    from dreambooth.models.lora import resolve_lora_file, split_lora_run
    model, lora, base = split_lora_run(spec.model, None)
    loras = {name: str(resolve_lora_file(path)) for name, path in spec.loras.items()}
    default = spec.default_adapter
    if lora is not None:  # a LoRA run: its LoRA is on unless a request asks for another (or "none")
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(spec.model).expanduser().resolve().name).strip("-.") or "run"
        if name in loras or name == "none":
            name = f"{name}-run"
        loras = {name: str(resolve_lora_file(lora)), **loras}
        default = default or name
    if default == "none":  # the base model unless a request names an adapter
        default = None
    elif default is not None and default not in loras:
        raise UserError(f"--adapter {default} is not one of the --lora names ({', '.join(loras) or 'none given'})")
    if spec.scheduler is not None and spec.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{spec.scheduler}': choose one of {', '.join(SCHEDULERS)}")
    model_kind(model, spec.allow_pickle)  # a missing path or a pickle file fails here, not after binding
    return ModelSpec(model, loras, default, spec.scheduler, spec.allow_pickle,
                     spec.revision or base.get("revision"), spec.variant or base.get("variant"), spec.device)


class Engine:
    """Runs one batch of same-shape images; switches adapter and sampler only when a batch needs another."""

    def __init__(self, pipe, adapters: dict[str, str], default_adapter: str | None = None,
                 scheduler: str | None = None):
        self.pipe, self.adapters, self.default_adapter = pipe, adapters, default_adapter
        pipe.set_progress_bar_config(disable=True)
        self._own = pipe.scheduler
        self._schedulers = {}
        if scheduler:
            set_scheduler(pipe, scheduler)
            self._own = pipe.scheduler
        self._active: tuple[str | None, float] | None = None
        self.device = pipe.device.type
        # The size requests get when they name none, as diffusers itself picks it (512 for SD 2.1 base).
        self.native_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    @classmethod
    def load(cls, spec: ModelSpec) -> "Engine":
        from dreambooth.models.lora import apply_lora
        pipe = load_pipeline(spec.model, device=spec.device, allow_pickle=spec.allow_pickle, revision=spec.revision,
                             variant=spec.variant)
        for name, path in spec.loras.items():
            apply_lora(pipe, path, 1.0, adapter_name=name)
        return cls(pipe, spec.loras, spec.default_adapter, spec.scheduler)

    def _scheduler(self, name: str):
        if name == "default":
            return self._own
        if name not in self._schedulers:  # built from the model's own config, once per name
            self.pipe.scheduler = self._own
            set_scheduler(self.pipe, name)
            self._schedulers[name] = self.pipe.scheduler
        return self._schedulers[name]

    def _adapter(self, name: str | None, scale: float) -> None:
        if not self.adapters or self._active == (name, scale):
            return
        if name is None:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name], adapter_weights=[scale])
        self._active = (name, scale)

    def run(self, shape: Shape, items: list[Item], should_stop: Callable[[], bool]) -> tuple[list, str]:
        """PIL images of `items` (one generator per image, so each depends only on its own seed) and the name of
        the scheduler class that made them; raises Cancelled when `should_stop` turns true between steps."""
        self._adapter(shape.adapter, shape.adapter_scale)
        self.pipe.scheduler = self._scheduler(shape.sampler)

        def on_step(pipe, step, timestep, tensors):
            if should_stop():
                raise Cancelled("stopped between denoising steps")
            return tensors
        generators = [torch.Generator(self.device).manual_seed(item.seed) for item in items]
        with torch.inference_mode():
            images = self.pipe([i.prompt for i in items], negative_prompt=[i.negative for i in items],
                               width=shape.width, height=shape.height, num_inference_steps=shape.steps,
                               guidance_scale=shape.guidance, generator=generators,
                               callback_on_step_end=on_step).images
        return images, type(self.pipe.scheduler).__name__
