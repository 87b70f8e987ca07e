"""Where each model component lives, in which dtype, and what trains, as the run plan asks; torch's backend
settings for the run's fixed shapes."""

from __future__ import annotations

import torch

from dreambooth.config.plan import RunPlan
from dreambooth.config.schema import is_adapter
from dreambooth.models.lora import add_lora_layers


def place_components(c, plan: RunPlan, device, weight_dtype: torch.dtype, master: torch.dtype) -> None:
    """Devices, dtypes and trainability of the loaded components `c`, with gradient checkpointing as planned."""
    cfg = plan.config
    c.vae.requires_grad_(False).eval().to(device, weight_dtype)
    c.text_encoder.requires_grad_(cfg.train_text_encoder)
    c.text_encoder.to(device, master if cfg.train_text_encoder else weight_dtype)
    # Trainable weights take the master dtype on the way to the device: fp32 (half-precision weights would
    # break the fp16 grad scaler), or bf16 in the low profiles without an fp32 copy ever on the GPU.
    # nn.Module.to, because diffusers' own .to warns on every dtype cast.
    torch.nn.Module.to(c.unet.requires_grad_(True).train(), device, master)
    if is_adapter(cfg):  # frozen base in compute precision; only the adapter layers train (lora.py)
        add_lora_layers(c, cfg, device, weight_dtype, text_encoder=plan.trains_text_encoder)
    if plan.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            c.text_encoder.gradient_checkpointing_enable()


def set_backends(plan: RunPlan) -> None:
    """TF32 matmuls where allowed; cuDNN picks its conv kernels once for the run's fixed shapes."""
    if not torch.cuda.is_available():
        return
    if plan.config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not (plan.memory.fused_backward or torch.backends.cudnn.deterministic):
        torch.backends.cudnn.benchmark = True  # fixed shapes: time conv kernels once (not in the low profiles)
