"""Load the Stable Diffusion components (hub id, local folder or the built-in tiny model) and pick precision and
device; the optimizer is built in optim.py."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth import checksums
from dreambooth.config.machine import hub_offline
from dreambooth.config.schema import Config
from dreambooth.errors import UserError, first_line
from dreambooth.models.base_model import DEFAULT_MODEL, check_sd21_base, explain
from dreambooth.models.builtin import asset_path, build_sd21_components, build_tiny_pipeline, load_tokenizer

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SD21 = "builtin:sd21"  # exact SD 2.1 base architecture, random weights; "builtin:sd21/4": widths / 4
_BUILTIN_MEMO: dict[str, dict] = {}  # model name -> prebuilt components, copied per load (benchmarks)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


@dataclass
class Components:
    """The pieces of an SD pipeline that training touches, plus the DDPM schedule used for noising."""
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    scheduler: Any  # the model's own inference scheduler, saved with the output unchanged


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """A pickle-based weight file can run code when loaded: refuse it unless the user opted in."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(f"model {path} is a pickle file, which can run code when loaded: convert it to "
                        ".safetensors, or set allow_pickle: true if you trust it")


def model_kind(model: str, allow_pickle: bool = False) -> str:
    """Classify `model` as 'builtin', 'folder', 'single-file' or 'hub'; refuse paths that cannot work."""
    if model == BUILTIN_TINY:
        return "builtin"
    if model.startswith("builtin:"):
        builtin_sd21_scale(model)  # refuses unknown names
        return "builtin"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"model folder {path} is not a diffusers pipeline folder (no model_index.json): "
                            "pass the folder that holds model_index.json, unet/, vae/, text_encoder/")
        return "folder"
    refuse_pickle(path, allow_pickle)
    if path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"model file {path} does not exist: check the path")
        return "single-file"
    if model.startswith((".", "/", "~")) or os.sep + os.sep in model:
        raise UserError(f"model folder {path} does not exist: check the path, or give a hub id such as "
                        f"{DEFAULT_MODEL}")
    return "hub"


def _cached_snapshot(model: str, revision: str | None) -> Path | None:
    """The Hugging Face cache's folder of a hub model, if it is cached (no network)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not cached, not a repo id: nothing to look at
        return None


def damaged_weights(model: str, revision: str | None, error: BaseException, subfolder: str | None = None):
    """A UserError naming the first damaged .safetensors file of a model that failed to load (in its folder or hub
    cache, `subfolder` or every component's, or named by the error), else None."""
    paths = [Path(p) for p in re.findall(r"[^\s'\"]+\.safetensors", str(error))]
    folder = Path(model).expanduser()
    folder = folder if folder.is_dir() else _cached_snapshot(model, revision)
    if folder is not None:
        paths += sorted(folder.glob(f"{subfolder}/*.safetensors" if subfolder else "*/*.safetensors"))
    for path in dict.fromkeys(paths):
        problem = checksums.safetensors_problem(path) if path.is_file() else None
        if problem:
            cached = "" if Path(model).expanduser().is_dir() else " (from the Hugging Face cache: delete it there)"
            return UserError(checksums.damaged_message("model file", path, problem) + cached)
    return None


def _hub_call(cfg: Config, what: str, fn):
    """Run one load from a folder or hub id, turning its failure into one line that says what to do."""
    try:
        return fn()
    except Exception as e:  # transformers lets safetensors' own error type through for a damaged file
        damaged = damaged_weights(cfg.model, cfg.revision, e, what)
        if damaged:
            raise damaged from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        removed = explain(cfg.model, e)  # a taken-down SD 2.x id: say so, and what to use instead
        if removed:
            raise removed from None
        first = first_line(e)
        hint = ("HF_HUB_OFFLINE is set, so it must already be in the Hugging Face cache"
                if hub_offline() else "check the hub id or pass a local diffusers folder")
        if "safetensors" in first.lower() and not cfg.allow_pickle:
            hint = "it has no .safetensors weights: convert them, or set allow_pickle: true if you trust the files"
        raise UserError(f"cannot load {what} of model '{cfg.model}': {first} ({hint})") from None


def _from_pretrained(cls, cfg: Config, subfolder: str):
    """One weighted component, safetensors only unless the user allowed pickle."""
    kw = {} if subfolder == "tokenizer" else {"use_safetensors": None if cfg.allow_pickle else True,
                                               "variant": cfg.variant}
    return _hub_call(cfg, subfolder, lambda: cls.from_pretrained(
        cfg.model, subfolder=subfolder, revision=cfg.revision, **kw))


def load_frozen(cfg: Config):
    """The base model's VAE and text encoder in fp32, fresh: the training copies were cast to half precision."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    pipe = load_pipeline_source(cfg)
    if pipe is not None:
        return pipe.vae.float(), pipe.text_encoder.float()
    return (_from_pretrained(AutoencoderKL, cfg, "vae").float(),
            _from_pretrained(CLIPTextModel, cfg, "text_encoder").float())


def _scheduler_from(cfg: Config):
    """The model's own inference scheduler, of the class its config names."""
    import diffusers

    config = _hub_call(cfg, "scheduler", lambda: diffusers.DDPMScheduler.load_config(
        cfg.model, subfolder="scheduler", revision=cfg.revision))
    return getattr(diffusers, config.get("_class_name", ""), diffusers.PNDMScheduler).from_config(config)


def load_pipeline_source(cfg: Config):
    """A full StableDiffusionPipeline for the single-file and built-in cases, else None (after checking that a hub
    id naming SD 2.1 base holds SD 2.1 base's configs, before any of its weights load)."""
    kind = model_kind(cfg.model, cfg.allow_pickle)
    if kind == "hub":
        check_sd21_base(cfg.model, cfg.revision)
    if kind == "builtin" and cfg.model != BUILTIN_TINY:
        return build_builtin_sd21(cfg.model)
    if kind == "builtin":
        return build_tiny_pipeline(seed=0)
    if kind == "single-file":
        # Imported here, not above: single_file uses this module's pickle and offline checks (a cycle).
        from dreambooth.models.single_file import load_single_file
        return load_single_file(cfg.model, allow_pickle=cfg.allow_pickle)
    return None


def builtin_sd21_scale(model: str) -> float:
    """Width scale of a `builtin:sd21` or `builtin:sd21/N` name (N = 1, 2, 4, 8 ...)."""
    name, _, div = model.partition("/")
    if name == BUILTIN_SD21 and (not div or (div.isdigit() and int(div) >= 1)):
        return 1.0 / int(div or 1)
    raise UserError(f"unknown built-in model '{model}': use builtin:tiny, builtin:sd21 (SD 2.1 base architecture, "
                    "random weights) or builtin:sd21/N (widths divided by N, e.g. builtin:sd21/4)")


def _build_sd21_parts(model: str) -> dict:
    # Built on the GPU when there is one (initialising 1.3 B parameters on a CPU takes long), kept on the CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []):
        torch.manual_seed(0)
        parts = build_sd21_components(scale=builtin_sd21_scale(model), device=device)
    return {k: torch.nn.Module.to(m, "cpu") for k, m in parts.items()}


def build_builtin_sd21(model: str, remember: bool = False):
    """A StableDiffusionPipeline of the SD 2.1 base architecture with random weights (seed 0), built offline.

    remember=True keeps the built parts so later loads of the same name copy them instead of rebuilding."""
    import copy

    from diffusers import PNDMScheduler

    parts = _BUILTIN_MEMO.get(model)
    if parts is None:
        parts = _build_sd21_parts(model)
        if remember:
            _BUILTIN_MEMO[model] = parts
    parts = {k: copy.deepcopy(m) for k, m in parts.items()} if model in _BUILTIN_MEMO else parts
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(asset_path("sd21-base") / "scheduler"))
    return sd_pipeline(parts["vae"], parts["text_encoder"].eval(), load_tokenizer(), parts["unet"], scheduler)


def forget_builtin() -> None:
    """Drop the parts kept by build_builtin_sd21(remember=True)."""
    _BUILTIN_MEMO.clear()


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline of these parts, without the safety checker (it blacks out ordinary images)."""
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def base_pipeline(cfg: Config):
    """The run's base model (cfg.model, however named) as a full fp32 pipeline on the CPU."""
    c = load_components(cfg)
    return sd_pipeline(c.vae, c.text_encoder, c.tokenizer, c.unet, c.scheduler)


def load_components(cfg: Config) -> Components:
    """Tokenizer, text encoder, VAE, UNet (fp32 for training) and a DDPM noise schedule from the base model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = load_pipeline_source(cfg)
    if pipe is not None:
        parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
                     scheduler=pipe.scheduler)
    else:
        parts = dict(
            tokenizer=_from_pretrained(CLIPTokenizer, cfg, "tokenizer"),
            text_encoder=_from_pretrained(CLIPTextModel, cfg, "text_encoder"),
            vae=_from_pretrained(AutoencoderKL, cfg, "vae"),
            unet=_from_pretrained(UNet2DConditionModel, cfg, "unet"),
            scheduler=_scheduler_from(cfg),
        )
    # Training noises with the DDPM forward process of the model's own beta schedule and prediction type.
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    for name in ("text_encoder", "vae", "unet"):
        parts[name] = parts[name].float()
    return Components(noise_scheduler=noise_scheduler, **parts)


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device):
    """Temporarily move a module that was parked elsewhere (e.g. a frozen encoder on the CPU) to `device`."""
    before = next(module.parameters()).device
    if before == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(before)


def trainable_dtype_fix(module: torch.nn.Module) -> int:
    """Upcast trainable half-precision weights to fp32 (fp16 master weights cannot be unscaled); returns count."""
    n = 0
    for p in module.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            n += 1
    return n
