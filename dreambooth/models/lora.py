"""LoRA (and DoRA, LoHa, LoKr) fine-tuning via peft: add adapter layers for training, save them (LoRA as diffusers'
LoRA file, the others as our peft adapter file: adapters.py), apply one to a pipeline for inference, and merge one
into a full pipeline."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dreambooth import checksums
from dreambooth.config.machine import require_peft
from dreambooth.errors import UserError, first_line
from dreambooth.files import save_safetensors_atomic
from dreambooth.models.load import trainable_dtype_fix
from dreambooth.models.adapters import (ADAPTER_FILE, is_adapter_file, is_adapter_param, json_safe, load_adapter,
                                        merge_adapters_, peft_config, save_adapter)

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a folder
ADAPTER = "default"  # peft's adapter name while training
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention projections


def lora_config(rank: int, alpha: float, targets: list[str], kind: str = "lora"):
    """The peft config of adapter type `kind` (LoRA: gaussian A, B = 0), so the wrapped model starts equal to the
    base."""
    return peft_config(kind, rank, alpha, targets)


def adapter_file_name(finetune: str) -> str:
    """The file an adapter run writes: diffusers' LoRA file for LoRA, our peft adapter file for the others."""
    return LORA_FILE if finetune == "lora" else ADAPTER_FILE


def _inject(model: torch.nn.Module, config, what: str, key: str) -> None:
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model
    try:
        if isinstance(model, PeftAdapterMixin):
            model.add_adapter(config, adapter_name=ADAPTER)  # diffusers' own hook, so it knows the adapter
        else:
            # transformers' add_adapter insists on a newer peft than diffusers needs; peft's injector is enough.
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:
        first = first_line(e)
        raise UserError(f"'{key}' {sorted(config.target_modules)} matched no layer of the {what} ({first}): use "
                        "attention projection names such as to_q, to_k, to_v, to_out.0") from None


def add_lora_layers(components, cfg, device, dtype: torch.dtype, text_encoder: bool) -> None:
    """Freeze the base UNet (and text encoder) in compute precision and add trainable fp32 adapter layers of type
    cfg.finetune (in the text encoder too when `text_encoder`)."""
    kind = cfg.finetune
    modules = [(components.unet, lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, kind), "UNet",
                "lora.target_modules")]
    if text_encoder:
        modules.append((components.text_encoder,
                        lora_config(cfg.lora.rank, cfg.lora.alpha, TEXT_ENCODER_TARGETS, kind), "text encoder",
                        "lora.text_encoder"))
    for model, config, what, key in modules:
        model.requires_grad_(False).to(device, dtype)
        _inject(model, config, what, key)
        model.to(device)
        # fp16 master weights cannot be unscaled by the grad scaler: only the small LoRA tensors go to fp32.
        trainable_dtype_fix(model)
    components.text_encoder.train(text_encoder)


def lora_state_dicts(unet: torch.nn.Module, text_encoder: torch.nn.Module | None):
    """The adapter tensors (peft names, on CPU, fp32) of the UNet and, if it has any, the text encoder."""
    from peft.utils import get_peft_model_state_dict

    def grab(model):
        if model is None or not any(is_adapter_param(n) for n, _ in model.named_parameters()):
            return None
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    return grab(unet), grab(text_encoder)


def save_lora(path: str | Path, unet, text_encoder, cfg, metadata: dict[str, str] | None = None) -> Path:
    """Write the LoRA file diffusers' load_lora_weights reads (rank and alpha in its header), atomically; DoRA, LoHa
    and LoKr adapters go to our peft adapter file instead (adapters.py)."""
    from diffusers import StableDiffusionPipeline

    unet_state, te_state = lora_state_dicts(unet, text_encoder)
    unet_meta = lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.finetune).to_dict()
    te_meta = lora_config(cfg.lora.rank, cfg.lora.alpha, TEXT_ENCODER_TARGETS, cfg.finetune).to_dict()
    path = Path(path)
    if cfg.finetune != "lora":
        return save_adapter(path, {"unet": unet_state, "text_encoder": te_state},
                            {"unet": unet_meta, "text_encoder": te_meta}, metadata)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_state, text_encoder_lora_layers=te_state, weight_name=LORA_FILE,
            unet_lora_adapter_metadata=json_safe(unet_meta), text_encoder_lora_adapter_metadata=json_safe(te_meta))
        # Re-write with our training metadata added beside diffusers' own header entries.
        tensors, header, _ = read_lora(Path(tmp) / LORA_FILE)
        save_safetensors_atomic(tensors, path, {**(metadata or {}), **header})
    return path


def resolve_lora_file(path: str | Path) -> Path:
    """A LoRA .safetensors file, or a run folder holding pytorch_lora_weights.safetensors (or, from a DoRA, LoHa or
    LoKr run, adapter_model.safetensors)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_FILE if (path / LORA_FILE).is_file() or not (path / ADAPTER_FILE).is_file() \
            else path / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist: pass a .safetensors LoRA file or a LoRA run's output folder")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"LoRA file {path} is not .safetensors: only safetensors LoRA files are loaded (no pickle)")
    checksums.refuse_damaged(path, "LoRA file")
    return path


def apply_lora(pipe, path: str | Path, scale: float = 1.0, adapter_name: str = "lora") -> bool:
    """Load a LoRA (our diffusers file or kohya/A1111 layout, or our DoRA/LoHa/LoKr adapter file) into `pipe` at
    strength `scale`; True when it was such a peft adapter file rather than a LoRA."""
    path = resolve_lora_file(path)
    require_peft()
    if is_adapter_file(path):
        load_adapter(pipe, path, scale, adapter_name)
        return True
    try:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError, OSError) as e:  # diffusers' many ways to fail
        first = first_line(e)
        raise UserError(f"cannot apply LoRA {path}: {first} (is it an SD 2.x LoRA for this base model?)") from None
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        raise UserError(f"LoRA {path} has no layer that matches this model: is it an SD 2.x LoRA for this base model?")
    pipe.set_adapters([adapter_name], adapter_weights=[scale])
    return False


def merged_pipeline(pipe, lora_path: str | Path, scale: float = 1.0):
    """`pipe` with the LoRA (or adapter) folded into its weights and the adapter layers removed (plain modules)."""
    if apply_lora(pipe, lora_path, scale, adapter_name="merge"):  # the file is resolved and checked once
        merge_adapters_(pipe.unet)
        merge_adapters_(pipe.text_encoder)
        return pipe
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)  # strength already set by set_adapters
    pipe.unload_lora_weights()
    return pipe


# ------------------------------------------------------------------------------------- reading LoRA files
def read_lora(path: str | Path) -> tuple[dict, dict[str, str], dict[str, float]]:
    """Tensors, header and per-part alpha of one of our diffusers-layout LoRA files; its callers have checked it
    (resolve_lora_file) or have just written it."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    packed = json.loads(header.get("lora_adapter_metadata", "{}"))
    alphas = {}
    for part in ("unet", "text_encoder"):
        rank = next((v.shape[0] for k, v in tensors.items() if k.startswith(part + ".") and ".lora_A." in k), None)
        if rank is not None:  # no alpha recorded means diffusers' default, alpha = rank
            alphas[part] = float(packed.get(f"{part}.lora_alpha", rank))
    return tensors, header, alphas


def lora_run_config(folder: str | Path, fix: str) -> Path | None:
    """The config.yaml of FOLDER if it is a LoRA run's output (a LoRA file, no model_index.json), else None; a
    LoRA run without one is a UserError that ends with FIX."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or (folder / "model_index.json").is_file() or \
            not ((folder / LORA_FILE).is_file() or (folder / ADAPTER_FILE).is_file()):
        return None
    if not (folder / "config.yaml").is_file():
        raise _no_base_model(folder, fix)
    return folder / "config.yaml"


def _no_base_model(folder: Path, fix: str) -> UserError:
    return UserError(f"{folder} holds a LoRA but no config.yaml naming its base model: {fix}")


def split_lora_run(model: str, lora: str | None) -> tuple[str, str | None, dict]:
    """A LoRA run's output folder (no model_index.json) names its base model in config.yaml: (base, LoRA file,
    the base's revision/variant as trained); anything else comes back as given."""
    folder = Path(model).expanduser()
    fix = f"dreambooth generate BASE_MODEL --lora {folder / LORA_FILE}"
    if lora is not None or (config := lora_run_config(folder, fix)) is None:
        return model, lora, {}
    import yaml
    # Read leniently, not with load_config: generating needs only the base, whatever else the config holds.
    run = yaml.safe_load(config.read_text()) or {}
    if not run.get("model"):
        raise _no_base_model(folder, fix)
    return str(run["model"]), str(resolve_lora_file(folder)), {k: run[k] for k in ("revision", "variant") if run.get(k)}
