"""The adapter types peft offers (finetune: lora, dora, loha, lokr) and the adapter file of DoRA, LoHa and LoKr runs:
peft's own tensor names under "unet." / "text_encoder.", with peft's config of each part in the header and in
adapter_config.json beside it. diffusers' LoRA loader reads LoRA keys only (and loads a text-encoder DoRA wrongly in
diffusers 0.42), so these files are loaded, scaled and merged through peft here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth.errors import UserError, first_line
from dreambooth.files import save_safetensors_atomic, write_json_atomic

ADAPTER_FILE = "adapter_model.safetensors"  # peft's file name for adapter weights
CONFIG_FILE = "adapter_config.json"
CONFIG_KEY = "dreambooth.adapter_config"  # header entry: {"unet": peft config, "text_encoder": peft config}
PARAM_MARKERS = ("lora_", "hada_", "lokr_")  # LoRA/DoRA, LoHa and LoKr parameter names in peft


def peft_config(kind: str, rank: int, alpha: float, targets: list[str]):
    """peft's config for adapter type `kind`; each starts as the identity, so the wrapped model equals the base."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    targets = list(targets)
    if kind in ("lora", "dora"):  # gaussian A, zero B; DoRA adds a magnitude vector that starts at the weight norms
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                          use_dora=kind == "dora")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    raise ValueError(f"unknown adapter type {kind!r}")


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name belongs to a peft adapter layer (of any of our types)."""
    return any(marker in name for marker in PARAM_MARKERS)


def json_safe(d: dict) -> dict:
    """peft's config dict with sets turned into sorted lists, as JSON needs."""
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


# ------------------------------------------------------------------------------------- the adapter file
def save_adapter(path: str | Path, states: dict[str, dict | None], configs: dict[str, dict],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write `states` (part -> peft state dict, or None) as one adapter file with the parts' peft configs, plus
    adapter_config.json beside it; atomically."""
    path = Path(path)
    tensors = {f"{part}.{k}": v for part, state in states.items() if state for k, v in state.items()}
    used = {part: json_safe(configs[part]) for part, state in states.items() if state}
    save_safetensors_atomic(tensors, path, {**(metadata or {}), CONFIG_KEY: json.dumps(used)})
    write_json_atomic(path.parent / CONFIG_FILE, used)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, dict], dict[str, dict]] | None:
    """(part -> peft state dict, part -> peft config dict) of an adapter file; None for any other file."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
        if CONFIG_KEY not in header:
            return None
        states: dict[str, dict] = {}
        for key in f.keys():
            part, name = key.split(".", 1)
            states.setdefault(part, {})[name] = f.get_tensor(key)
    return states, json.loads(header[CONFIG_KEY])


def adapter_file_kind(path: str | Path) -> str | None:
    """dora, loha or lokr for one of our adapter files; None for any other file (a diffusers or kohya LoRA)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except Exception:  # not readable as safetensors: the LoRA loader says what is wrong with it
        return None
    if CONFIG_KEY not in header:
        return None
    configs = json.loads(header[CONFIG_KEY])
    return adapter_kind(configs.get("unet") or next(iter(configs.values())))


def is_adapter_file(path: str | Path) -> bool:
    """Whether `path` is one of our DoRA/LoHa/LoKr adapter files."""
    return adapter_file_kind(path) is not None


def adapter_kind(config: dict) -> str:
    """The finetune value that made a saved peft config: lora, dora, loha or lokr."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    return peft_type.lower()


def load_adapter(pipe, path: str | Path, scale: float = 1.0, adapter_name: str = "adapter") -> None:
    """Add the adapter file's layers to `pipe`'s UNet (and text encoder) at strength `scale` (for DoRA, the scale
    applies to the direction update; the learnt magnitudes stay)."""
    from peft import PeftConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict
    states, configs = read_adapter(path)
    for part, state in states.items():
        model = getattr(pipe, part)
        try:
            config = PeftConfig.from_peft_type(**configs[part])
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"cannot apply adapter {path} to the {part}: {first_line(e)} "
                            "(is it an adapter for this base model?)") from None
        if result.unexpected_keys:
            raise UserError(f"adapter {path} has weights this {part} lacks (e.g. {result.unexpected_keys[0]}): "
                            "is it an adapter for this base model?")
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_scale(adapter_name, scale)


@torch.no_grad()
def merge_adapters_(model: torch.nn.Module) -> None:
    """Fold every adapter layer of `model` into its base weight and put the plain base module back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # left by the injection; a plain module again
        if attr in vars(model):
            delattr(model, attr)
