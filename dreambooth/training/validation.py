"""Validation images during training: fixed prompts and seeds at chosen steps, a grid per step, and the
step sweep (rows = prompts, columns = steps) a user looks at to pick the step count."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from dreambooth.config.schema import Config, ValidationConfig
from dreambooth.data.subjects import Subject, resolve_subjects
from dreambooth.eval.best import recommend
from dreambooth.files import atomic_file, save_png, slug, write_json_atomic
from dreambooth.models.load import on_device, sd_pipeline
from dreambooth.training.rng import restore_rng, rng_snapshot
from dreambooth.training.compiling import eager

log = logging.getLogger(__name__)
progress = logging.getLogger("dreambooth.progress")  # runlog.py: file only while bars show, console when quiet

DEFAULT_STEPS = (50, 100, 200, 400, 800)  # JumpStart's guide compares separate runs of these lengths
CAPTION_PROMPTS = 2  # with captions: true, the first captions of each subject join the default prompts
INDEX = "index.json"
_PHOTO_OF = re.compile(r"^(a|an)\s+(photo|picture|image)\s+of\s+", re.IGNORECASE)


def default_prompts(pairs: list[tuple[str, str | None]]) -> list[str]:
    """JumpStart's four comparison prompts per (instance prompt, class prompt) pair, duplicates dropped."""
    prompts = []
    for instance, class_prompt in pairs:
        # "a pencil sketch of a photo of sks dog" contradicts itself, so the sketch drops a leading "a photo of".
        prompts += [instance, f"{instance} on the beach", f"a pencil sketch of {_PHOTO_OF.sub('', instance)}"]
        if class_prompt:
            prompts.append(class_prompt)
    return list(dict.fromkeys(prompts))


def config_prompts(cfg: Config, subjects: list[Subject] | None = None) -> list[str]:
    """`validation.prompts`, or the defaults derived from every subject's resolved prompts (the run's own
    `subjects` when given, else resolved from the config) and a few of its captions."""
    if cfg.validation.prompts:
        return list(cfg.validation.prompts)
    subjects = resolve_subjects(cfg, need_class_prompt=False) if subjects is None else subjects
    prompts = default_prompts([(s.instance_prompt, s.class_prompt) for s in subjects])
    return list(dict.fromkeys(prompts + [c for s in subjects for c in s.captions[:CAPTION_PROMPTS]]))


def validation_steps(v: ValidationConfig, total_steps: int) -> list[int]:
    """Steps to validate at: `steps` within the run as given; otherwise every N (or 50, 100, 200, 400, 800)
    within the run, plus the final step so the finished model is always shown."""
    if v.steps:
        kept = sorted({s for s in v.steps if s <= total_steps})
        if len(kept) < len(set(v.steps)):
            log.warning("validation.steps beyond the run's %d steps are skipped: %s", total_steps,
                        sorted(s for s in set(v.steps) if s > total_steps))
        return kept
    every = range(v.every_n_steps, total_steps + 1, v.every_n_steps) if v.every_n_steps else DEFAULT_STEPS
    return sorted({s for s in every if s < total_steps} | {total_steps})


# ----------------------------------------------------------------------------------------------- grids

def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_bands(cell_width: int) -> tuple[int, int, int]:
    """(font size, height of the column-label band, width of the row-label band) for cells this wide:
    readable on 512 px images, still sensible on the 32 px tiny model."""
    size = max(13, min(28, cell_width // 20))
    return size, size + 11, max(160, size * 12)


def _fit(draw: ImageDraw.ImageDraw, text: str, size: int, width: int):
    """The largest font (down to 7 px) at which `text` fits `width`."""
    while size > 7 and draw.textlength(text, font=_font(size)) > width:
        size -= 1
    return _font(size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def make_grid(rows: list[list[Image.Image | None]], col_labels: list[str] | None = None,
              row_labels: list[str] | None = None) -> Image.Image:
    """Images in a rows x cols grid at their own size; labels, when given, in bands above and to the left.
    A missing image (None) leaves a grey cell."""
    first = next(im for row in rows for im in row if im is not None)
    w, h = first.size
    cols = max(len(r) for r in rows)
    size, band_top, band_left = label_bands(w)
    left, top = (band_left if row_labels else 0), (band_top if col_labels else 0)
    grid = Image.new("RGB", (left + cols * w, top + len(rows) * h), "white")
    draw, font = ImageDraw.Draw(grid), _font(size)
    for r, row in enumerate(rows):
        for c in range(cols):
            im = row[c] if c < len(row) else None
            box = (left + c * w, top + r * h)
            if im is None:
                draw.rectangle([box, (box[0] + w - 1, box[1] + h - 1)], fill=(200, 200, 200))
            else:
                grid.paste(im.convert("RGB").resize((w, h)) if im.size != (w, h) else im.convert("RGB"), box)
    for c, text in enumerate(col_labels or []):
        draw.text((left + c * w + 2, 5), text, fill="black", font=_fit(draw, text, size, w - 4))
    line_h = size + 2
    for r, text in enumerate(row_labels or []):
        lines = _wrap(draw, text, font, band_left - 8)[:max(1, h // line_h)]  # clipped to the row
        for i, line in enumerate(lines):
            draw.text((4, top + r * h + 4 + i * line_h), line, fill="black", font=font)
    return grid


# ----------------------------------------------------------------------------------------------- state

@contextmanager
def preserved_training_state(modules: list[torch.nn.Module], generators: list[torch.Generator]):
    """Run the body in eval mode under no_grad, then restore every RNG stream and train/eval flag exactly,
    so training continues as if the body had not run."""
    rng = rng_snapshot(generators)
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training
        restore_rng(rng)


# ----------------------------------------------------------------------------------------------- validator

class Validator:
    """Generates the validation images of a live Trainer at its scheduled steps, scores them when a scorer
    (scoring.py) is given; keeps validation/index.json."""

    def __init__(self, cfg: Config, subjects: list[Subject], total_steps: int, out: Path, accelerator,
                 components, unet, encode_prompts, generators: list[torch.Generator], resumed: bool = False,
                 scorer=None, ema=None):
        self.cfg, self.v, self.out, self.accelerator = cfg, cfg.validation, out, accelerator
        self.scorer = scorer  # on the main process only (None elsewhere)
        self.components, self.unet, self.encode_prompts = components, unet, encode_prompts
        self.generators = generators  # training's own streams, left exactly as they were (see preserved_training_state)
        self.ema = ema
        self.prompts = config_prompts(cfg, subjects)
        # Which weights to show: the raw ones, or with an EMA the average, the raw ones or both (rows labelled).
        self.weights = ["raw"] if ema is None else {"both": ["raw", "ema"], "ema": ["ema"], "raw": ["raw"]}[self.v.ema]
        self.rows = [(f"[{w}] {p}" if len(self.weights) > 1 else p, p, w) for w in self.weights for p in self.prompts]
        self.labels = [label for label, _, _ in self.rows]
        self.steps = validation_steps(self.v, total_steps)
        self.seeds = [self.v.seed + i for i in range(self.v.num_images)]
        self.dir = out / "validation"
        self.done: dict[str, dict] = {}
        self._swept: list[str] | None = None  # the steps the last sweep.png showed
        if resumed and (self.dir / INDEX).is_file():
            self.done = json.loads((self.dir / INDEX).read_text()).get("done", {})  # earlier steps stay in the sweep
        elif accelerator.is_main_process:
            shutil.rmtree(self.dir, ignore_errors=True)  # images of an earlier run in this folder would mislead

    def due(self, step: int) -> bool:
        return step in self.steps and str(step) not in self.done

    # -------------------------------------------------------------------------------------- model pieces
    def _modules(self):
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.unet), unwrap(self.components.text_encoder), self.components.vae

    def _pipeline(self, unet, text_encoder, vae):
        """A StableDiffusionPipeline around the live modules (no copies), with its own DPM++ scheduler
        (good at ~25 steps) so the trainer's scheduler objects are untouched."""
        from diffusers import DPMSolverMultistepScheduler

        c = self.components
        pipe = sd_pipeline(vae, text_encoder, c.tokenizer, unet,
                           DPMSolverMultistepScheduler.from_config(c.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -------------------------------------------------------------------------------------- running
    def run(self, step: int) -> dict[str, list[Image.Image]]:
        """Generate every row's images with the model as it is at `step` (raw and/or EMA weights); returns
        {row label: images}, the label being the prompt unless both weights are shown."""
        v, accelerator = self.v, self.accelerator
        unet, text_encoder, vae = self._modules()
        images: dict[str, list[Image.Image]] = {}
        scores = None
        start = time.time()
        with preserved_training_state([unet, text_encoder, vae], self.generators):
            if accelerator.is_main_process:
                pipe = self._pipeline(unet, text_encoder, vae)
                bar = tqdm(total=len(self.rows), desc=f"validation @ {step}", unit="prompt", leave=False,
                           position=1, disable=self.cfg.quiet)
                with on_device(vae, accelerator.device), eager(unet), accelerator.autocast(), \
                        warnings.catch_warnings():
                    # diffusers' DPM++ set_timesteps calls np.array on a tensor; numpy 2 warns about it every call.
                    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                    negative = self.encode_prompts([v.negative_prompt or ""])  # the same for every prompt
                    for weights in self.weights:
                        # The average swapped into the live weights for its rows, the raw ones back bit for bit.
                        with self.ema.swapped() if weights == "ema" else nullcontext():
                            for label, prompt, _ in (r for r in self.rows if r[2] == weights):
                                images[label] = pipe(
                                    prompt_embeds=self.encode_prompts([prompt]),
                                    negative_prompt_embeds=negative,
                                    height=self.cfg.resolution, width=self.cfg.resolution,
                                    num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                                    num_images_per_prompt=len(self.seeds),
                                    # CPU generators: the same starting noise on every device.
                                    generator=[torch.Generator("cpu").manual_seed(s) for s in self.seeds]).images
                                bar.update(1)
                bar.close()
                del pipe
                if self.scorer is not None:  # outside autocast: scored as the real photos were, in fp32
                    scores = self.scorer.score(images)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._write(step, images, time.time() - start, scores)
        return images

    def _write(self, step: int, images: dict[str, list[Image.Image]], seconds: float,
               scores: dict | None = None) -> None:
        folder = self.dir / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        rel = []
        for p, (label, prompt, weights) in enumerate(self.rows):
            rel.append([])
            for image, seed in zip(images[label], self.seeds):
                path = save_png(image, folder / f"{p:02d}-{slug(label, 40)}-seed{seed}.png",
                                {"prompt": prompt, "seed": seed, "step": step, **self._settings(),
                                 **({"weights": weights} if self.ema is not None else {})})
                rel[-1].append(path.relative_to(self.out).as_posix())
        grid = folder / "grid.png"
        with atomic_file(grid) as tmp:
            make_grid([images[label] for label in self.labels], col_labels=[f"seed {s}" for s in self.seeds],
                      row_labels=self.labels).save(tmp)
        self.done[str(step)] = {"images": rel, "grid": grid.relative_to(self.out).as_posix(),
                                "seconds": round(seconds, 3), **({"scores": scores} if scores is not None else {})}
        self.write_sweep()
        progress.info("validation at step %d: %d prompts x %d images in %.1f s -> %s", step, len(self.rows),
                      len(self.seeds), seconds, grid.relative_to(self.out).as_posix())

    def _settings(self) -> dict:
        v = self.v
        return {"negative_prompt": v.negative_prompt, "num_inference_steps": v.num_inference_steps,
                "guidance_scale": v.guidance_scale, "scheduler": "DPMSolverMultistepScheduler",
                "resolution": self.cfg.resolution}

    def write_sweep(self) -> Path | None:
        """validation/sweep.png (first seed of each prompt, one column per validated step) and index.json."""
        if not self.accelerator.is_main_process or not self.done:
            return None
        steps = sorted(self.done, key=int)
        rows = []
        for p in range(len(self.rows)):
            row = []
            for s in steps:
                files = self.done[s]["images"]
                path = self.out / files[p][0] if p < len(files) and files[p] else None
                row.append(Image.open(path).convert("RGB") if path and path.is_file() else None)
            rows.append(row)
        sweep = self.dir / "sweep.png"
        if any(im is not None for row in rows for im in row):  # none: the images were deleted meanwhile
            with atomic_file(sweep) as tmp:  # redrawn after every validation: never half a picture
                make_grid(rows, col_labels=[f"step {s}" for s in steps], row_labels=self.labels).save(tmp)
        # "prompts" are the sweep's row labels ([ema] / [raw] in front when both weights are shown).
        index = {"prompts": self.labels, "weights": self.weights, "seeds": self.seeds, "planned_steps": self.steps,
                 **self._settings(), "sweep": sweep.relative_to(self.out).as_posix(), **(self.scoring() or {}),
                 "done": self.done}
        write_json_atomic(self.dir / INDEX, index)
        self._swept = sorted(self.done)
        return sweep

    def scores(self, step: int) -> dict | None:
        return self.done.get(str(step), {}).get("scores")

    def scoring(self) -> dict | None:
        """The scores of every validated step, the base model's and real photos' references, and the
        recommended step (with DINO and CLIP-T); None when validation.metrics is off."""
        if not self.v.metrics:
            return None
        scores = {s: d["scores"] for s, d in sorted(self.done.items(), key=lambda kv: int(kv[0])) if "scores" in d}
        out = {"metrics": list(self.v.metrics), "scores": scores}
        if self.scorer is not None:
            out.update(base=self.scorer.base, reference=self.scorer.reference)
        best = recommend(scores, self.cfg.eval.clip_t_margin)
        if best is not None:
            out["recommended"] = best
        return out

    def finish(self) -> Path | None:
        """At the end of training: the final sweep over every step validated (already written when the last
        validation was the final step, as it usually is)."""
        if self._swept == sorted(self.done):
            return self.dir / "sweep.png"
        return self.write_sweep()
