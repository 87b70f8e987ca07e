"""Inference: JumpStart's request parameters, and PNGs written with their prompt, seed and settings embedded.
Loading the pipeline and choosing its scheduler: models/pipeline.py."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dreambooth.errors import UserError
from dreambooth.files import save_png, slug


@dataclass
class Request:
    """JumpStart's endpoint parameters, same names and defaults."""
    prompt: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    num_images_per_prompt: int = 1
    seed: int | None = None

    def check(self) -> "Request":
        if not self.prompt or not all(isinstance(p, str) and p.strip() for p in self.prompt):
            raise UserError("give at least one non-empty prompt (--prompt 'a photo of riobugger cat')")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 8 or v % 8:
                raise UserError(f"{name} must be a positive multiple of 8 (got {v}), e.g. 512")
        if self.num_inference_steps < 1 or self.num_images_per_prompt < 1:
            raise UserError("num_inference_steps and num_images_per_prompt must be >= 1")
        return self


def read_payload(path: str | Path) -> dict:
    """A JumpStart JSON request as is: `prompt` (or `text_inputs`) plus endpoint parameters."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"payload file {path} does not exist: check the path") from None
    except json.JSONDecodeError as e:
        raise UserError(f"payload {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise UserError(f"payload {path} must be a JSON object like {{\"prompt\": \"...\"}}")
    if "text_inputs" in data and "prompt" not in data:
        data["prompt"] = data.pop("text_inputs")
    known = set(Request.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"payload {path} has unknown keys {unknown}; known: {sorted(known)}")
    if isinstance(data.get("prompt"), str):
        data["prompt"] = [data["prompt"]]
    return data


def generate(pipe, request: Request, out_dir: str | Path, quiet: bool = False) -> list[Path]:
    """Generate every prompt's images, one seed per image (seed, seed+1, ...), and save them as PNG."""
    request.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
    device = pipe.device.type
    paths, k = [], 0
    for n, prompt in enumerate(request.prompt, 1):
        pipe.set_progress_bar_config(disable=quiet, leave=False, desc=f"generating {n}/{len(request.prompt)}")
        seeds = [base_seed + k + i for i in range(request.num_images_per_prompt)]
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        images = pipe(prompt, negative_prompt=request.negative_prompt, width=request.width, height=request.height,
                      num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                      num_images_per_prompt=len(seeds), generator=gens).images
        for image, seed in zip(images, seeds):
            settings = {**asdict(request), "prompt": prompt, "seed": seed,
                        "scheduler": type(pipe.scheduler).__name__}
            paths.append(save_png(image, out / f"{len(paths):04d}-{slug(prompt)}-seed{seed}.png", settings))
        k += len(seeds)
    return paths
