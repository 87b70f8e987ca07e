"""The metric models through transformers: CLIP (CLIP-I, CLIP-T) and a DINO ViT (DINO), from a hub id or a local
folder; a missing one is refused in one line that says how to point at a local copy."""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.config.machine import hub_offline
from dreambooth.errors import UserError, first_line
from dreambooth.models.load import on_device

CLIP_DEFAULT = "openai/clip-vit-base-patch32"
DINO_DEFAULT = "facebook/dino-vits16"
BATCH = 16  # images per forward pass


def _local(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.exists() or name.startswith((".", "/", "~")) else None


def available(name: str) -> bool:
    """Whether `name` can load without asking the network for more than it may: a local folder with a
    config.json, or a hub id (offline: only if it is in the Hugging Face cache)."""
    path = _local(name)
    if path is not None:
        return (path / "config.json").is_file()
    if not hub_offline():
        return True  # loading will download it, or fail and say so
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def missing_message(models: dict[str, str], how: str) -> str:
    """One line naming the models that cannot load and how to point at local copies (`how`: the keys or flags)."""
    listed = ", ".join(f"{name} ({what})" for what, name in models.items())
    offline = " with HF_HUB_OFFLINE set" if hub_offline() else ""
    return (f"metric model not available{offline}: {listed}; download once (hf download ID) or point "
            f"{how} at local copies (folders with config.json)")


def require(models: dict[str, str], how: str) -> None:
    """Refuse in one line unless every model in {what: name} is available."""
    absent = {what: name for what, name in models.items() if not available(name)}
    if absent:
        raise UserError(missing_message(absent, how))


def _load(loader, name: str, what: str, how: str):
    try:
        return loader()
    except (OSError, ValueError) as e:
        raise UserError(f"{missing_message({what: name}, how)} ({first_line(e)})") from None


class Clip:
    """A CLIPModel with its image processor and tokenizer: image and text embeddings (projected)."""

    def __init__(self, name: str = CLIP_DEFAULT, how: str = "eval.clip_model"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        self.name = name
        self.model = _load(lambda: CLIPModel.from_pretrained(name), name, "CLIP", how).eval()
        self.processor = _load(lambda: AutoImageProcessor.from_pretrained(name), name, "CLIP", how)
        self.tokenizer = _load(lambda: AutoTokenizer.from_pretrained(name), name, "CLIP", how)

    @torch.no_grad()
    def images(self, images: list, device="cpu") -> torch.Tensor:
        """[n, d] embeddings of PIL images, float32 on the CPU."""
        return _batched(self.model, images, device, lambda batch: _pooled(
            self.model.get_image_features(pixel_values=_pixels(self.processor, batch, device))))

    @torch.no_grad()
    def texts(self, texts: list[str], device="cpu") -> torch.Tensor:
        """[n, d] embeddings of prompts (truncated to CLIP's 77 tokens), float32 on the CPU."""
        limit = self.model.config.text_config.max_position_embeddings
        return _batched(self.model, texts, device, lambda batch: _pooled(self.model.get_text_features(
            **self.tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt").to(device))))


def _pixels(processor, images: list, device) -> torch.Tensor:
    return processor(images=images, return_tensors="pt").pixel_values.to(device)


def _batched(model, items: list, device, embed) -> torch.Tensor:
    """embed(batch) over `items` in batches of BATCH, with `model` on `device` meanwhile; [n, d] float32 on the CPU."""
    with on_device(model, torch.device(device)):
        out = [embed(items[i:i + BATCH]) for i in range(0, len(items), BATCH)]
    return torch.cat(out).float().cpu()


class Dino:
    """A ViT (DINO ViT-S/16 by default): the class token of the last layer is the image's embedding."""

    def __init__(self, name: str = DINO_DEFAULT, how: str = "eval.dino_model"):
        from transformers import AutoImageProcessor, ViTModel
        self.name = name
        self.model = _load(lambda: ViTModel.from_pretrained(name, add_pooling_layer=False), name, "DINO", how).eval()
        self.processor = _load(lambda: AutoImageProcessor.from_pretrained(name), name, "DINO", how)

    @torch.no_grad()
    def images(self, images: list, device="cpu") -> torch.Tensor:
        return _batched(self.model, images, device, lambda batch: self.model(
            pixel_values=_pixels(self.processor, batch, device)).last_hidden_state[:, 0])


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns the projected features as the output's pooler_output; 4.x returned the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output
