"""The offline demo: a synthetic subject in JumpStart format, a tiny random-weight model, train, generate."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from dreambooth.config.schema import load_config
from dreambooth.errors import UserError
from dreambooth.models.pipeline import load_pipeline
from dreambooth.serve.generate import Request, generate
from dreambooth.training.trainer import run_training

DEMO_MARKER = ".dreambooth-demo"
INSTANCE_PROMPT = "a photo of riobugger toy"
CLASS_PROMPT = "a photo of a toy"


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "demo-tiny.yaml"


def write_demo_dataset(folder: Path, n: int = 5, size: int = 96, seed: int = 0) -> Path:
    """A JumpStart-format folder: n pictures of one 'toy' (red body, yellow hat) on varied backgrounds."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg = tuple(rng.randint(60, 230) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        cx, cy, r = size // 2 + rng.randint(-12, 12), size // 2 + rng.randint(-8, 12), size // 4
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 30, 40))
        d.polygon([(cx - r, cy - r + 4), (cx + r, cy - r + 4), (cx, cy - 2 * r)], fill=(240, 210, 40))
        d.ellipse([cx - r // 2, cy - 4, cx - r // 2 + 5, cy + 1], fill=(255, 255, 255))
        d.ellipse([cx + r // 2 - 5, cy - 4, cx + r // 2, cy + 1], fill=(255, 255, 255))
        img.save(folder / f"toy_{i:02d}.png")
    (folder / "dataset_info.json").write_text(json.dumps({"instance_prompt": INSTANCE_PROMPT,
                                                          "class_prompt": CLASS_PROMPT}, indent=2))
    return folder


def run_demo(out: Path, quiet: bool = False) -> dict:
    """Write data, train the tiny model on it, generate two images; prints where everything is."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise UserError(f"{out} is not empty and is not a demo folder: pass --out to a new folder")
        shutil.rmtree(out)  # a previous demo run: start clean so the demo always shows the same thing
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `dreambooth demo`; safe to delete\n")
    data = write_demo_dataset(out / "data")
    cfg = load_config(demo_config_path(), [f"data.dir={data}", f"output_dir={out / 'model'}", f"quiet={quiet}"])
    summary = run_training(cfg)
    pipe = load_pipeline(str(out / "model"), device="cpu")
    request = Request(prompt=[INSTANCE_PROMPT, f"{INSTANCE_PROMPT} on the beach"], width=cfg.resolution,
                      height=cfg.resolution, num_inference_steps=10, seed=0)
    images = generate(pipe, request, out / "images", quiet=quiet)
    print(f"demo: trained {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
          f"loss {summary['mean_loss']:.4f} mean, {summary['final_loss']:.4f} last")
    print(f"demo: data   {data}")
    print(f"demo: model  {out / 'model'}  (a diffusers StableDiffusionPipeline folder)")
    print(f"demo: report {out / 'model' / 'report.html'}  (validation sweep, loss curve; open in a browser)")
    for p in images:
        print(f"demo: image  {p}")
    return {"summary": summary, "images": images, "model": out / "model"}
