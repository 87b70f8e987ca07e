"""A whole StableDiffusionPipeline for sampling: loaded from a trained folder, hub id, single file or built-in
name, and its scheduler chosen by the short names the UIs use."""

from __future__ import annotations

import torch

from dreambooth.config.schema import Config
from dreambooth.errors import UserError, first_line
from dreambooth.models.base_model import check_sd21_base, explain
from dreambooth.models.load import damaged_weights, load_pipeline_source, model_kind
from dreambooth.models.lora import apply_lora, split_lora_run

# Short names users know from the UIs, mapped to diffusers scheduler classes.
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def set_scheduler(pipe, name: str) -> None:
    """Give `pipe` the scheduler SCHEDULERS names, built from its current scheduler's config."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
    import diffusers
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def load_pipeline(model: str, device: str | None = None, allow_pickle: bool = False, revision: str | None = None,
                  variant: str | None = None):
    """A StableDiffusionPipeline from a trained output folder (or any diffusers folder / hub id; a hub id may name
    its revision and weight variant, e.g. fp16)."""
    from diffusers import StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    kind = model_kind(model, allow_pickle)
    if kind in ("builtin", "single-file"):
        pipe = load_pipeline_source(Config(model=model, allow_pickle=allow_pickle)).to(dtype=dtype)
    else:
        if kind == "hub":
            check_sd21_base(model, revision)  # a hub id naming SD 2.1 base: its configs, before its weights
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                           use_safetensors=None if allow_pickle else True,
                                                           revision=revision, variant=variant)
        except Exception as e:  # transformers lets safetensors' own error type through for a damaged file
            damaged = damaged_weights(model, revision, e)
            if damaged or isinstance(e, (OSError, ValueError)):
                raise damaged or explain(model, e) or UserError(f"cannot load pipeline '{model}': {first_line(e)}") \
                    from None
            raise
    return pipe.to(device)


def load_run_pipeline(model: str, lora: str | None = None, scale: float = 1.0, allow_pickle: bool = False,
                      revision: str | None = None, variant: str | None = None):
    """`load_pipeline` for what a user names: a LoRA run's folder means its base model (at the revision/variant it
    trained on) plus its LoRA; `lora`, if given, is applied at `scale`."""
    model, lora, base = split_lora_run(model, lora)
    pipe = load_pipeline(model, allow_pickle=allow_pickle, revision=revision or base.get("revision"),
                         variant=variant or base.get("variant"))
    if lora:
        apply_lora(pipe, lora, scale)
    return pipe
