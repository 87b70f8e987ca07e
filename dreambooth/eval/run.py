"""`dreambooth eval`: generate the DreamBench-style prompt set of each subject at fixed seeds, then score it
(DINO, CLIP-I, CLIP-T, the real-vs-real reference, denoising loss and class drift); writes eval.json and eval.md."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from dreambooth.config.schema import Config, DataConfig, load_config
from dreambooth.data.dataset import list_images, load_image_files, load_images
from dreambooth.data.subjects import Subject, resolve_subjects
from dreambooth.errors import UserError
from dreambooth.eval import metrics
from dreambooth.eval.denoise import PROBE_IMAGES, make_probe, probe_loss
from dreambooth.eval.models import CLIP_DEFAULT, DINO_DEFAULT, Clip, Dino, require
from dreambooth.eval.prompts import SubjectText, templates_for
from dreambooth.files import save_png, slug, write_json_atomic, write_text_atomic
from dreambooth.models.load import base_pipeline, on_device
from dreambooth.models.pipeline import load_run_pipeline

log = logging.getLogger(__name__)

RESULT, TABLE = "eval.json", "eval.md"
RANDOM_NOTE = "built-in models have random weights: their scores mean nothing (docs/evaluate.md)"
HOW = "--clip-model/--dino-model (eval.clip_model/eval.dino_model in a run's config)"


@dataclass
class EvalRequest:
    """What `dreambooth eval` was asked; the defaults are the command's."""
    model: str
    data: str | None = None
    prompts: str = "auto"
    images_per_prompt: int = 4
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    clip_model: str | None = None
    dino_model: str | None = None
    class_noun: str | None = None
    out: str | None = None
    allow_pickle: bool = False
    quiet: bool = False


def run_config(model: str) -> Config | None:
    """The config of a training run's output folder, else None (a diffusers folder, file or hub id)."""
    path = Path(model).expanduser() / "config.yaml"
    return load_config(path) if path.is_file() else None


def eval_subjects(req: EvalRequest, cfg: Config | None) -> list[Subject]:
    """--data's subject, else the run's subjects."""
    if req.data:
        base = cfg or Config()
        return resolve_subjects(dataclasses.replace(base, data=DataConfig(dir=req.data), subjects=[]), False)
    if cfg is None:
        raise UserError(f"{req.model} is not a training run's folder: give --data DIR, the subject's "
                        "JumpStart-format folder (its photos and dataset_info.json)")
    return resolve_subjects(cfg, need_class_prompt=False)


def evaluate(req: EvalRequest) -> dict:
    """Generate, score and write eval.json and eval.md; returns the result."""
    if req.images_per_prompt < 1 or req.num_inference_steps < 1:
        raise UserError("--images-per-prompt and --num-inference-steps must be >= 1")
    cfg = run_config(req.model)
    subjects = eval_subjects(req, cfg)
    clip_name = req.clip_model or (cfg.eval.clip_model if cfg else CLIP_DEFAULT)
    dino_name = req.dino_model or (cfg.eval.dino_model if cfg else DINO_DEFAULT)
    require({"CLIP": clip_name, "DINO": dino_name}, HOW)  # before minutes of generation
    texts = [SubjectText.from_prompts(s.instance_prompt, s.class_prompt, req.class_noun) for s in subjects]
    prompt_sets = [templates_for(req.prompts, t) for t in texts]
    out = Path(req.out) if req.out else (Path(req.model) / "eval" if cfg else Path("eval"))
    seeds = [req.seed + i for i in range(req.images_per_prompt)]
    real = [load_images(s.dir, 8)[0] for s in subjects]

    pipe = _pipeline(req)
    resolution = cfg.resolution if cfg else pipe.unet.config.sample_size * pipe.vae_scale_factor
    results = [{"name": s.name, "dir": str(s.dir), "instance_prompt": s.instance_prompt, "phrase": t.phrase,
                "class_noun": t.noun, "prompt_set": name, "real_images": len(ims)}
               for s, t, (name, _), ims in zip(subjects, texts, prompt_sets, real)]
    generated = _generate(pipe, req, texts, prompt_sets, seeds, resolution, out, results)
    ddpm = _ddpm(pipe)
    trained = [_losses(pipe, ddpm, s, ims, resolution, req.seed) for s, ims in zip(subjects, real)]
    del pipe
    base = _base_losses(cfg, subjects, real, resolution, req.seed) if cfg else [{} for _ in subjects]
    for r, now, before in zip(results, trained, base):
        r.update(now)
        if before:
            r["base_loss"] = before.get("loss")
            if "class_loss" in now and "class_loss" in before:
                r["base_class_loss"] = before["class_loss"]
                r["drift"] = now["class_loss"] - before["class_loss"]
    _score(req, clip_name, dino_name, texts, real, generated, results)

    result = {"model": req.model, "out": str(out), "base_model": cfg.model if cfg else None,
              "resolution": resolution, "seeds": seeds, "images_per_prompt": req.images_per_prompt,
              "num_inference_steps": req.num_inference_steps, "guidance_scale": req.guidance_scale,
              "scheduler": "DPMSolverMultistepScheduler", "clip_model": clip_name, "dino_model": dino_name,
              "subjects": results, "mean": {k: metrics.mean_of([r.get(k) for r in results])
                                            for k in ("dino", "clip_i", "clip_t", "real_dino", "real_clip_i",
                                                      "loss", "drift")},
              "paper": metrics.PAPER}
    if (cfg.model if cfg else req.model).startswith("builtin:"):
        result["note"] = RANDOM_NOTE
        log.warning(RANDOM_NOTE)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULT, result)
    write_text_atomic(out / TABLE, table(result) + "\n")
    return result


def _pipeline(req: EvalRequest):
    pipe = load_run_pipeline(req.model, allow_pickle=req.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddpm(pipe):
    return DDPMScheduler.from_config(pipe.scheduler.config)  # the model's own betas and prediction type


def _generate(pipe, req, texts, prompt_sets, seeds, resolution, out: Path, results) -> list[list[tuple]]:
    """Each subject's [(prompt, neutral prompt, images)], images saved under out/images/<subject>/."""
    sampler = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(sampler.config)
    total = sum(len(templates) for _, templates in prompt_sets)
    generated = []
    with tqdm(total=total, desc="generating", unit="prompt", disable=req.quiet) as bar, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)  # diffusers' DPM++ on numpy 2
        for text, (_, templates), r in zip(texts, prompt_sets, results):
            folder = out / "images" / slug(r["name"], 40)
            folder.mkdir(parents=True, exist_ok=True)
            rows, r["prompts"] = [], []
            for p, template in enumerate(templates):
                prompt = text.fill(template)
                images = pipe(prompt, height=resolution, width=resolution, num_inference_steps=req.num_inference_steps,
                              guidance_scale=req.guidance_scale, num_images_per_prompt=len(seeds),
                              generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
                files = [save_png(im, folder / f"{p:02d}-{slug(prompt, 40)}-seed{s}.png",
                                  {"prompt": prompt, "seed": s, "num_inference_steps": req.num_inference_steps,
                                   "guidance_scale": req.guidance_scale, "scheduler": "DPMSolverMultistepScheduler"})
                         for im, s in zip(images, seeds)]
                rows.append((prompt, text.neutral(prompt), images))
                r["prompts"].append({"prompt": prompt, "clip_t_prompt": text.neutral(prompt),
                                     "images": [f.relative_to(out).as_posix() for f in files]})
                bar.update(1)
            generated.append(rows)
    pipe.scheduler = sampler
    return generated


def _class_images(subject: Subject) -> list:
    if not subject.class_prompt or not subject.class_dir.is_dir():
        return []
    files = list_images(subject.class_dir)[:PROBE_IMAGES]
    return load_image_files(files, 8, subject.class_dir)[0] if files else []


@torch.no_grad()
def _losses(pipe, ddpm, subject: Subject, real: list, resolution: int, seed: int) -> dict[str, float]:
    """Denoising loss of the pipeline's UNet on the subject's photos, and on its class images (if any)."""
    device, dtype = pipe.device, pipe.unet.dtype
    out = {}
    for key, images, prompt, offset in (("loss", real[:PROBE_IMAGES], subject.instance_prompt, 0),
                                        ("class_loss", _class_images(subject), subject.class_prompt, 1)):
        if not images:
            continue
        probe = make_probe(images, [prompt] * len(images), pipe.vae, resolution,
                           ddpm.config.num_train_timesteps, seed + offset, device=device, dtype=pipe.vae.dtype)
        tokens = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
        embeds = pipe.text_encoder(tokens)[0].expand(len(images), -1, -1)
        out[key] = probe_loss(pipe.unet, probe, embeds, ddpm, device, dtype)
    return out


def _base_losses(cfg: Config, subjects, real, resolution: int, seed: int) -> list[dict]:
    """The same losses for the run's base model: the class loss it moves away from is the drift."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32  # as the trained pipeline was loaded
    pipe = base_pipeline(cfg).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    try:
        return [_losses(pipe, _ddpm(pipe), s, ims, resolution, seed) for s, ims in zip(subjects, real)]
    finally:
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _score(req, clip_name, dino_name, texts, real, generated, results) -> None:
    """DINO, CLIP-I and CLIP-T of every subject (and of each prompt), with the real-vs-real reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip, dino = Clip(clip_name, HOW), Dino(dino_name, HOW)
    with tqdm(total=2 * len(texts), desc="scoring", unit="model", disable=req.quiet) as bar:
        for name, model in (("dino", dino), ("clip_i", clip)):
            with on_device(model.model, torch.device(device)):  # one trip to the GPU per model, for all subjects
                for photos, rows, r in zip(real, generated, results):
                    images = [im for _, _, ims in rows for im in ims]
                    counts = [len(ims) for _, _, ims in rows]
                    real_emb, gen_emb = model.images(photos, device), model.images(images, device)
                    r[name] = metrics.mean_pairwise(gen_emb, real_emb)
                    r[f"real_{name}"] = metrics.self_similarity(real_emb)
                    for entry, part in zip(r["prompts"], gen_emb.split(counts)):
                        entry[name] = metrics.mean_pairwise(part, real_emb)
                    if name == "clip_i":
                        text_emb = clip.texts([n for _, n, ims in rows for _ in ims], device)
                        r["clip_t"] = metrics.paired(gen_emb, text_emb)
                        for entry, g, t in zip(r["prompts"], gen_emb.split(counts), text_emb.split(counts)):
                            entry["clip_t"] = metrics.paired(g, t)
                    bar.update(1)


def _cell(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.4f}"


def table(result: dict) -> str:
    """The scores as a Markdown table, the paper's reference rows below."""
    head = ["subject", "DINO", "CLIP-I", "CLIP-T", "real DINO", "real CLIP-I", "loss", "drift"]
    keys = ["dino", "clip_i", "clip_t", "real_dino", "real_clip_i", "loss", "drift"]
    rows = [[r["name"]] + [_cell(r.get(k), k == "drift") for k in keys] for r in result["subjects"]]
    if len(result["subjects"]) > 1:
        rows.append(["mean"] + [_cell(result["mean"].get(k), k == "drift") for k in keys])
    for name, ref in metrics.PAPER.items():
        rows.append([f"paper: {name}"] + [_cell(ref.get(k)) for k in ("dino", "clip_i", "clip_t")] + ["-"] * 4)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
