"""Random-weight Stable Diffusion 2.1 base pipelines built offline: a tiny one for tests, full-size for benchmarks.

Every model is built from the published SD 2.1 base configs shipped in `assets/sd21-base`, so the classes and
all unlisted settings match the real model; only widths (and, for the tiny pipeline, depth) are changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Image size the tiny pipeline is made for: VAE scale factor 2 gives a 16x16 latent, and a batch-2 training
# step (VAE encode, text encode, UNet forward and backward) takes ~35 ms on 2 CPU cores (64 px: ~110 ms).
TINY_RESOLUTION = 32

SD21_PARTS = ("unet", "vae", "text_encoder")


def asset_path(name: str) -> Path:
    """Path of a folder or file shipped in `dreambooth/assets` (e.g. "tokenizer", "sd21-base")."""
    path = Path(__file__).resolve().parents[1] / "assets" / name
    if not path.exists():
        raise FileNotFoundError(f"no packaged asset {name!r} at {path}")
    return path


def load_tokenizer() -> CLIPTokenizer:
    """The small CLIP tokenizer shipped in assets/tokenizer (CLIP's layout, a tiny vocabulary; no download)."""
    return CLIPTokenizer.from_pretrained(asset_path("tokenizer"))


def _sd21_config(part: str) -> dict[str, Any]:
    """The published SD 2.1 base config of one diffusers model ("unet" or "vae") as a plain dict."""
    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    return dict(cls.load_config(asset_path("sd21-base") / part))


def _text_config(**overrides: Any) -> CLIPTextConfig:
    config = CLIPTextConfig.from_pretrained(asset_path("sd21-base") / "text_encoder")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD 2.1 base classes and tiny random weights, identical for equal seeds."""
    tokenizer = load_tokenizer()
    unet_config = _sd21_config("unet") | {
        "block_out_channels": (32, 64),
        # SD's pattern: attention in all but the lowest-resolution block; SD2 lists heads per block.
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": (2, 4),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "sample_size": TINY_RESOLUTION // 2,
    }
    vae_config = _sd21_config("vae") | {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": TINY_RESOLUTION,
    }
    text_config = _text_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seed the construction without changing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(asset_path("sd21-base") / "scheduler"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it (safetensors only) as a folder `from_pretrained` loads offline."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; add the vocab/merges files older CLIPTokenizers need.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(asset_path("tokenizer") / name, path / "tokenizer" / name)
    return path


def _width(channels: int, scale: float, multiple: int) -> int:
    """`channels * scale` rounded to a positive multiple of `multiple`."""
    return max(multiple, round(channels * scale / multiple) * multiple)


def build_sd21_components(
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parts: tuple[str, ...] = SD21_PARTS,
) -> dict[str, torch.nn.Module]:
    """Random-weight SD 2.1 base models {"unet", "vae", "text_encoder"} (those in `parts`), widths times `scale`.

    scale=1 is exactly SD 2.1 base; device="meta" builds shapes only (no memory, instant).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    unknown = set(parts) - set(SD21_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {SD21_PARTS}")
    unet_config, vae_config = _sd21_config("unet"), _sd21_config("vae")
    text_config = _text_config()
    if scale < 1:
        # SD 2.1 uses 64-dim attention heads everywhere (its attention_head_dim list is really heads per
        # block), so widths stay multiples of 64 with heads = width / 64; 64 is also a multiple of the 32
        # norm groups. The VAE has one single-head attention, so it only needs multiples of its 32 groups.
        head = unet_config["block_out_channels"][0] // unet_config["attention_head_dim"][0]  # 64
        unet_widths = [_width(c, scale, head) for c in unet_config["block_out_channels"]]
        text_head = text_config.hidden_size // text_config.num_attention_heads  # 64 too
        hidden = _width(text_config.hidden_size, scale, text_head)
        unet_config |= {
            "block_out_channels": unet_widths,
            "attention_head_dim": [c // head for c in unet_widths],
            "cross_attention_dim": hidden,
        }
        vae_config["block_out_channels"] = [_width(c, scale, 32) for c in vae_config["block_out_channels"]]
        text_config.hidden_size = hidden
        text_config.num_attention_heads = hidden // text_head
        text_config.intermediate_size = 4 * hidden
        text_config.projection_dim = _width(text_config.projection_dim, scale, text_head)
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(unet_config),
        "vae": lambda: AutoencoderKL.from_config(vae_config),
        "text_encoder": lambda: CLIPTextModel(text_config),
    }
    models = {}
    # Allocating directly on the target device skips a CPU copy of the full-size weights (and with "meta"
    # allocates nothing, which is how tests count parameters of the 866 M-parameter UNet quickly).
    with torch.device(device):
        for part in parts:
            # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns on every dtype cast (even with no fp32
            # modules to keep); a freshly built model has no quantization or offload hooks to care about.
            models[part] = torch.nn.Module.to(builders[part](), dtype=dtype)
    return models
