"""Load a one-file SD 2.x checkpoint (original key layout) as a StableDiffusionPipeline, offline.

diffusers' `from_single_file` does the key conversion; we hand it a local config folder so it never goes to the
hub: the architecture our exports record in their header, else the SD 2.1 base configs in assets/sd21-base."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError, first_line
from .export import CONFIGS_KEY
from .models import PICKLE_SUFFIXES, refuse_pickle


SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"  # OpenCLIP: SD 2.x
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"  # CLIP-L: SD 1.x
HUB_BASE = "stabilityai/stable-diffusion-2-1-base"


def _header_and_keys(path: Path) -> tuple[dict[str, str], dict[str, tuple]]:
    """The safetensors header and {key: shape} without reading any tensor data."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"model file {path} is not a readable .safetensors file ({first_line(e)}): "
                        "re-download or re-export it") from None


def _check_sd2(path: Path, shapes: dict[str, tuple]) -> None:
    if any(k.startswith("conditioner.") for k in shapes):
        raise UserError(f"model file {path} is an SDXL checkpoint: this tool fine-tunes SD 2.x; use an SD 2.x file")
    if SD1_TEXT_KEY in shapes:
        raise UserError(f"model file {path} is an SD 1.x checkpoint (CLIP-L text encoder): this tool fine-tunes "
                        "SD 2.x; use an SD 2.x file such as v2-1_512-ema-pruned.safetensors")
    if SD2_TEXT_KEY not in shapes or not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise UserError(f"model file {path} is not a full SD 2.x checkpoint (no UNet or OpenCLIP text encoder "
                        "weights): pass a checkpoint with UNet, VAE and text encoder")


def _write_config_folder(folder: Path, configs: dict | None, v_prediction: bool) -> None:
    """A diffusers pipeline folder without weights: model_index.json and each part's config."""
    from .tiny import asset_path
    shutil.copytree(asset_path("sd21-base"), folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md"))
    names = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    for part, rel in names.items():
        if configs and part in configs:
            (folder / rel).write_text(json.dumps(configs[part]))
    if v_prediction:  # a 768-v model: the YAML beside it says so, the weights cannot
        sched = json.loads((folder / names["scheduler"]).read_text())
        (folder / names["scheduler"]).write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
        unet = json.loads((folder / names["unet"]).read_text())
        (folder / names["unet"]).write_text(json.dumps({**unet, "sample_size": 96, "upcast_attention": True}))


def _yaml_says_v(path: Path) -> bool:
    """True when the UI-style YAML beside the checkpoint (FILE.yaml) declares v-parameterization."""
    import yaml
    side = path.with_suffix(".yaml")
    if not side.is_file():
        return False
    try:
        params = (yaml.safe_load(side.read_text()) or {}).get("model", {}).get("params", {})
    except yaml.YAMLError:
        return False
    return isinstance(params, dict) and params.get("parameterization") == "v"


def _tokenizer(path: Path, vocab_rows: int):
    """The tokenizer that fits the checkpoint's vocabulary: the shipped tiny one, or SD 2.1's from the HF cache."""
    from transformers import CLIPTokenizer

    from .tiny import _load_tokenizer
    tiny = _load_tokenizer()
    if vocab_rows == len(tiny):
        return tiny
    try:  # one file holds no tokenizer; SD 2.x all share OpenCLIP's, which the hub model carries
        return CLIPTokenizer.from_pretrained(HUB_BASE, subfolder="tokenizer",
                                             local_files_only=os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"))
    except (OSError, ValueError):
        raise UserError(f"model file {path} needs the SD 2.x tokenizer, which is not in the Hugging Face cache: "
                        f"run once online, or `huggingface-cli download {HUB_BASE} --include 'tokenizer/*'`") from None


def load_single_file(path: str | Path, allow_pickle: bool = False, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline from one SD 2.x checkpoint file; no network is used for the configs."""
    from diffusers import StableDiffusionPipeline

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: check the path")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        header, shapes = {}, None  # no cheap look inside a pickle; from_single_file reads it (weights only)
    elif path.suffix.lower() == ".safetensors":
        header, shapes = _header_and_keys(path)
        _check_sd2(path, shapes)
    else:
        raise UserError(f"model file {path} is neither .safetensors nor an allowed pickle file: pass an SD 2.x "
                        ".safetensors checkpoint")
    configs = json.loads(header[CONFIGS_KEY]) if CONFIGS_KEY in header else None
    vocab = shapes[SD2_TEXT_KEY][0] if shapes else 49408
    tokenizer = _tokenizer(path, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        _write_config_folder(Path(tmp), configs, v_prediction=configs is None and _yaml_says_v(path))
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=tmp, local_files_only=True, tokenizer=tokenizer, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = first_line(e)
            raise UserError(f"cannot load model file {path} as an SD 2.x checkpoint: {first}") from None
    return pipe
