"""LoRA files in the kohya layout A1111 and ComfyUI load natively: our diffusers-layout LoRA file (read by
models/lora.py) converted key by key, with its header kept and kohya's own entries added."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dreambooth.files import save_safetensors_atomic
from dreambooth.models.lora import read_lora

KOHYA_FILE = "lora-kohya.safetensors"


def peft_to_kohya(state: dict, alphas: dict[str, float]) -> dict:
    """diffusers LoRA file keys (`unet.<path>.lora_A.weight`) -> kohya (`lora_unet_<path_with_>.lora_down.weight`
    plus `.alpha`); `alphas` maps "unet"/"text_encoder" to that part's alpha."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(unet|text_encoder)\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ValueError(f"'{key}' is not a diffusers LoRA weight name")
        part, path, ab = m.groups()
        if part == "text_encoder":  # kohya names CLIP layers from the text_model root
            path = "text_model." + path.removeprefix("text_model.")
        name = ("lora_unet_" if part == "unet" else "lora_te_") + path.replace(".", "_")
        out[f"{name}.lora_{'down' if ab == 'A' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alphas[part]))
    return out


def save_kohya(lora_file: str | Path, out: str | Path, half: bool = False) -> Path:
    """Convert our LoRA file to the kohya layout, keeping the header."""
    tensors, header, alphas = read_lora(lora_file)
    meta = {k: v for k, v in header.items() if k not in ("lora_adapter_metadata", "format")}
    rank = next(v.shape[0] for k, v in tensors.items() if ".lora_A." in k)
    # kohya's own keys, which A1111 reads to show the LoRA's base model and size.
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_v2": "True",
                 "ss_network_alpha": str(alphas.get("unet", rank)), "ss_base_model_version": "sd_v2",
                 "modelspec.architecture": "stable-diffusion-v2-512/lora"})
    return save_safetensors_atomic(peft_to_kohya(tensors, alphas), Path(out), meta, half)
