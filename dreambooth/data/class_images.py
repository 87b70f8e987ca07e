"""Class images for prior preservation: the missing ones are sampled with the base model before training and
recorded in a manifest, so reruns top up, resume and refuse to mix classes."""

from __future__ import annotations

import gc
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth import checksums
from dreambooth.config import machine
from dreambooth.config.schema import Config
from dreambooth.data.dataset import CLASS_MANIFEST as MANIFEST
from dreambooth.data.dataset import list_images, load_image, mixed_seed
from dreambooth.data.subjects import Subject, resolve_subjects
from dreambooth.errors import UserError
from dreambooth.files import save_png, temp_glob, write_json_atomic
from dreambooth.locks import FolderLock, launch_rank, lock_folder
from dreambooth.models.base_model import REMOVED
from dreambooth.models.load import base_pipeline
from dreambooth.models.pipeline import set_scheduler

log = logging.getLogger(__name__)

NAME = re.compile(r"^class-(\d{5,})\.png$")  # the files we write: class-<image index>.png
# Settings that define the class itself: images made with other values are another class and are not mixed in.
KEY_SETTINGS = ("prompt", "negative_prompt", "model")
# Settings that only change the look a little: such images are kept (with a warning) unless regenerating.
SOFT_SETTINGS = ("sampler", "steps", "guidance", "resolution")


def sampling_steps(cfg: Config) -> int:
    """Sampler steps per class image: class_sampling_steps, else 25 (50 for pndm, the common default)."""
    return cfg.class_sampling_steps or (50 if cfg.class_sampler == "pndm" else 25)


def default_batch_size() -> int:
    """Class images per sampling batch when sample_batch_size is unset: by GPU memory, 4 on CPU."""
    gib = machine.gpu_memory_gib()
    if gib is None:
        return 4
    return 16 if gib >= 40 else 8 if gib >= 20 else 4 if gib >= 12 else 2


def model_id(cfg: Config) -> str:
    """The base model as recorded in the manifest: local paths absolute, hub ids with their revision."""
    path = Path(cfg.model).expanduser()
    name = str(path.resolve()) if path.exists() else cfg.model
    return name + (f"@{cfg.revision}" if cfg.revision else "") + (f" ({cfg.variant})" if cfg.variant else "")


def _same(key: str, recorded, current) -> bool:
    """Whether a class image made with `recorded` counts as made with `current`. A taken-down hub id and its
    community copy hold the same weights, so images sampled before the default moved stay valid."""
    if key == "model" and isinstance(recorded, str):
        recorded = REMOVED.get(recorded, (recorded,))[0]
    return recorded == current


def settings_for(cfg: Config, prompt: str) -> dict:
    return {"prompt": prompt, "negative_prompt": cfg.class_negative_prompt, "model": model_id(cfg),
            "sampler": cfg.class_sampler, "steps": sampling_steps(cfg), "guidance": cfg.class_guidance_scale,
            "resolution": cfg.resolution}


def image_seed(seed: int, index: int) -> int:
    """The seed of class image INDEX: fixed per index, so an interrupted run resumes with the same images."""
    return mixed_seed(seed, index, 0xC1A55) & 0x7FFF_FFFF


@dataclass
class Plan:
    """What one class folder has and what it still needs."""
    folder: Path
    settings: dict
    wanted: int
    manifest: dict
    usable: list[Path] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # image indices to sample


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {"version": 1, "next_index": 0, "images": {}}
    try:
        data = json.loads(path.read_text())
        assert isinstance(data.get("images"), dict) and isinstance(data.get("next_index"), int)
        return data
    except (ValueError, AssertionError, AttributeError):
        raise UserError(f"{path} is damaged: delete it (its class images then count as your own) "
                        "or delete the folder to sample afresh") from None


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_json_atomic(folder / MANIFEST, manifest, indent=1)  # never a half-written manifest


def _decode(path: Path):
    """PATH's image, or None (with a warning) when it does not decode."""
    try:
        return load_image(path)
    except Exception as e:  # any decoding failure: the file does not count, training would skip it too
        log.warning("class image %s is unreadable (%s) and does not count", path, type(e).__name__)
        return None


def _check_usable(plan: Plan, files: list[Path], decoded: dict | None) -> None:
    """Decode FILES in order until the plan has its wanted images; later files would not be used, so are not
    opened. DECODED, if given, keeps each image, so training need not decode it again."""
    for path in files:
        if len(plan.usable) >= plan.wanted:
            break
        img = _decode(path)
        if img is not None:
            plan.usable.append(path)
            if decoded is not None:
                decoded[path] = img


def plan_folder(folder: Path, settings: dict, wanted: int, regenerate: bool, decoded: dict | None = None) -> Plan:
    """Check the usable images of FOLDER (keeping them in DECODED if given), reconcile its manifest, and choose
    the image indices to sample."""
    folder.mkdir(parents=True, exist_ok=True)
    recorded = (folder / MANIFEST).is_file()  # written below before any sampling, so sampled files have one
    manifest = _read_manifest(folder)
    images = manifest["images"]
    for tmp in [*folder.glob(temp_glob("class-*.png")), *folder.glob(temp_glob(MANIFEST))]:
        tmp.unlink()  # a write cut short by a hard kill (files.atomic_file's temp names)
    numbered = [(path, int(m.group(1))) for path in folder.iterdir() if (m := NAME.match(path.name))]
    if not recorded:
        # No manifest (copied-in folder, or the user deleted it): every class-NNNNN.png is the user's own image,
        # never deleted, and its number is never reused.
        manifest["next_index"] = max((k for _, k in numbered), default=-1) + 1
    for path, k in numbered:
        if recorded and path.name not in images and k >= manifest["next_index"]:
            path.unlink()  # sampled, but the run stopped before the manifest recorded it: sampled again below
    gone = [name for name in images if not (folder / name).is_file()]
    for name in gone:
        del images[name]
    if gone:
        log.info("%s: %d generated class images were deleted; they will be replaced by new ones", folder, len(gone))
    # A recorded image whose bytes changed (cut short, a flipped bit) counts as missing: deleted, sampled anew.
    recorded = {name: rec for name, rec in images.items() if "size" in rec and "crc32" in rec}
    for name, why in checksums.problems(folder, recorded).items():
        log.warning("class image %s is damaged (%s): it will be sampled again", folder / name, why)
        (folder / name).unlink()
        del images[name]
    for key in KEY_SETTINGS + SOFT_SETTINGS:
        other = [name for name, rec in images.items() if not _same(key, rec.get(key), settings[key])]
        if not other:
            continue
        old = images[other[0]].get(key)
        if regenerate:
            log.warning("%s: replacing %d class images made with %s=%r (now %r)", folder, len(other), key, old,
                        settings[key])
            for name in other:
                (folder / name).unlink(missing_ok=True)
                del images[name]
        elif key in KEY_SETTINGS:
            raise UserError(f"{folder} holds {len(other)} class images generated with {key} {old!r}, but this "
                            f"run's {key} is {settings[key]!r}: set regenerate_class_images: true to replace "
                            "them, or set class_data_dir to another folder")
        else:
            log.warning("%s: %d class images were made with %s=%r (now %r); kept (regenerate_class_images: true "
                        "replaces them)", folder, len(other), key, old, settings[key])
    _write_manifest(folder, manifest)
    # The instance folder's listing and warning: by now our .tmp files are gone and list_images never names the
    # manifest, so only what the user put here is warned about (a sub-folder too: no class_data_dir exclusion).
    files = list_images(folder, exclude=())
    plan = Plan(folder, settings, wanted, manifest)
    _check_usable(plan, files, decoded)
    index = manifest["next_index"]
    while len(plan.usable) + len(plan.indices) < wanted:
        if not (folder / f"class-{index:05d}.png").exists():
            plan.indices.append(index)
        index += 1
    return plan


def load_sampler(cfg: Config):
    """The base model as a StableDiffusionPipeline for sampling: fp16 on CUDA, no safety checker."""
    pipe = base_pipeline(cfg)
    if torch.cuda.is_available():
        pipe = pipe.to(device="cuda", dtype=torch.float16)  # load_components gives fp32; sampling needs no more
    set_scheduler(pipe, cfg.class_sampler)
    pipe.vae.enable_slicing()  # decode one image at a time: a large batch's VAE decode is its memory peak
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(plans: list[Plan], cfg: Config, decoded: dict | None = None) -> None:
    """Sample every plan's missing images in batches, recording each batch in the manifest as it lands; DECODED,
    if given, keeps each new image (PNG is lossless, so training need not read it back)."""
    todo = sum(len(p.indices) for p in plans)
    batch_size = cfg.sample_batch_size or default_batch_size()
    log.info("sampling %d class images (%s, %d steps, batch %d)", todo, cfg.class_sampler, sampling_steps(cfg),
             batch_size)
    pipe = load_sampler(cfg)
    try:
        bar = tqdm(total=todo, desc="class images", unit="img", disable=cfg.quiet)
        for plan in plans:
            s = plan.settings
            for i in range(0, len(plan.indices), batch_size):
                indices = plan.indices[i:i + batch_size]
                seeds = [image_seed(cfg.seed, k) for k in indices]
                n = len(indices)
                with torch.inference_mode():
                    images = pipe(prompt=[s["prompt"]] * n, height=s["resolution"], width=s["resolution"],
                                  negative_prompt=[s["negative_prompt"]] * n if s["negative_prompt"] else None,
                                  num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                                  generator=[torch.Generator(pipe.device).manual_seed(x) for x in seeds]).images
                for k, seed, image in zip(indices, seeds, images):
                    name, record = f"class-{k:05d}.png", {**s, "seed": seed, "index": k}
                    save_png(image, plan.folder / name, record)  # whole or not at all
                    plan.manifest["images"][name] = {**record, **checksums.record_file(plan.folder / name)}
                    plan.usable.append(plan.folder / name)
                    if decoded is not None:
                        decoded[plan.folder / name] = image
                plan.manifest["next_index"] = max(plan.manifest["next_index"], indices[-1] + 1)
                _write_manifest(plan.folder, plan.manifest)
                bar.update(n)
        bar.close()
    finally:
        # Release the sampling pipeline before training loads its own copy (SD's 16 GB OOM with prior otherwise).
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def lock_class_folders(folders: list[Path], wait: bool) -> list[FolderLock]:
    """Hold every class folder (in one order, so two runs waiting for each other's folders cannot deadlock);
    another run in one of them is waited for (`wait`) or refused. The other processes of an accelerate launch
    come after the main one and share its hold."""
    locks: list[FolderLock] = []
    try:
        for folder in sorted({f.expanduser().resolve() for f in folders}):
            locks.append(lock_folder(folder, "class folder", "wait for it to finish, or set class_data_dir to "
                                     "another folder", shared=launch_rank() != 0, wait=wait))
    except BaseException:
        for held in locks:
            held.release()
        raise
    return locks


def ensure_class_images(cfg: Config, subjects: list[Subject] | None = None, decoded: dict | None = None,
                        wait: bool = True) -> list[list[Path]]:
    """Top up every subject's class folder to its num_class_images; returns each subject's class image paths.
    DECODED, if given, receives {path: image} for the images decoded while checking the folders or sampled. Each
    class folder is locked meanwhile: a run already in one is waited for (`wait`), or refused."""
    subjects = subjects if subjects is not None else resolve_subjects(cfg, need_class_prompt=True)
    locks = lock_class_folders([s.class_dir for s in subjects], wait)
    try:
        return _ensure(cfg, subjects, decoded)
    finally:
        for held in locks:
            held.release()


def _ensure(cfg: Config, subjects: list[Subject], decoded: dict | None) -> list[list[Path]]:
    plans: dict[Path, Plan] = {}
    for s in subjects:
        key = s.class_dir.resolve()
        if key in plans:  # two subjects sharing one class folder must share its class too
            if plans[key].settings["prompt"] != s.class_prompt:
                raise UserError(f"class folder {s.class_dir} is shared by subjects with different class prompts "
                                f"({plans[key].settings['prompt']!r}, {s.class_prompt!r}): give each its own "
                                "class_data_dir")
            plans[key].wanted = max(plans[key].wanted, s.num_class_images)
            continue
        plans[key] = Plan(s.class_dir, settings_for(cfg, s.class_prompt), s.num_class_images, {})
    plans = {k: plan_folder(p.folder, p.settings, p.wanted, cfg.regenerate_class_images, decoded)
             for k, p in plans.items()}
    for p in plans.values():
        log.info("%s: %d usable class images, %d to sample", p.folder, len(p.usable), len(p.indices))
    missing = [p for p in plans.values() if p.indices]
    if missing:
        start = time.time()
        _sample(missing, cfg, decoded)  # samples every index of every plan, or raises
        log.info("sampled %d class images in %.1f s", sum(len(p.indices) for p in missing), time.time() - start)
    # With more images than wanted, the first ones by name are used, the same ones on every run.
    return [sorted(plans[s.class_dir.resolve()].usable)[:s.num_class_images] for s in subjects]


def class_report(cfg: Config) -> None:
    """Print where each subject's class images are (the `dreambooth classes` command)."""
    subjects = resolve_subjects(cfg, need_class_prompt=True)
    for s, paths in zip(subjects, ensure_class_images(cfg, subjects, wait=False)):
        print(f"class images: {s.class_dir}  ({len(paths)} images of {s.class_prompt!r})")
    if not cfg.with_prior_preservation:
        print("note: with_prior_preservation is false, so training will not use them")
