"""Dataset folder reading, image loading and the training transforms/dataset for DreamBooth."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from dreambooth.errors import UserError
from dreambooth.locks import LOCK

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INFO_FILE = "dataset_info.json"
INFO_KEYS = ("instance_prompt", "class_prompt")
CLASS_MANIFEST = "manifest.json"  # written by dreambooth.data.class_images beside generated class images
CAPTION_SUFFIX = ".txt"  # NAME.txt: the caption of NAME.jpg (captions: true)
MASK_MARK = ".mask"  # NAME.mask.png: the mask of NAME.jpg (masked_loss: true); never a training image


def read_dataset_info(folder) -> dict:
    """Read FOLDER/dataset_info.json into {"instance_prompt": str, "class_prompt": str}; {} if the file is absent."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM Windows editors add
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; save it as UTF-8 text") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        'fix it, e.g. {"instance_prompt": "a photo of sks dog"}') from None
    if not isinstance(info, dict):
        raise UserError(f'{path} must hold a JSON object like {{"instance_prompt": "...", "class_prompt": "..."}}')
    for key in info:
        if key not in INFO_KEYS:
            raise UserError(f"{path}: unknown key {key!r}; allowed keys are {', '.join(INFO_KEYS)}")
    for key, value in info.items():
        if not isinstance(value, str):
            raise UserError(f"{path}: {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise UserError(f"{path}: {key!r} is empty; write a prompt or remove the key")
    return {key: value.strip() for key, value in info.items()}


def resolve_prompts(folder, instance_prompt=None, class_prompt=None):
    """Merge prompts from the YAML config (these win) with dataset_info.json; return (instance, class or None)."""
    info = read_dataset_info(_check_folder(folder))  # a missing folder is the real error, not a missing prompt
    resolved = []
    for key, given in (("instance_prompt", instance_prompt), ("class_prompt", class_prompt)):
        given = given.strip() if isinstance(given, str) and given.strip() else None  # blank YAML = unset
        from_json = info.get(key)
        if given and from_json and given != from_json:
            logger.warning("data.%s %r in the YAML config differs from %r in %s; YAML wins",
                           key, given, from_json, Path(folder) / INFO_FILE)
        resolved.append(given or from_json)
    if not resolved[0]:
        raise UserError(f"no instance prompt for {folder}: add {INFO_FILE} with "
                        '{"instance_prompt": "a photo of sks dog"} or set data.instance_prompt in the config')
    return resolved[0], resolved[1]


def _check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"image folder {folder} does not exist; check the data path in the config")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; point the data path at the folder holding the images")
    return folder


def _short_list(names, limit=20) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def is_mask_file(path) -> bool:
    """NAME.mask.<image extension>: a mask (data/annotations.py), never a training image."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and Path(path.stem).suffix.lower() == MASK_MARK


def list_images(folder, exclude=("class_data_dir",), captions: bool = False, masks: bool = False) -> list[Path]:
    """Image files at the top of FOLDER (not recursive), sorted by name; anything else skipped is warned once,
    except the caption (CAPTIONS) and mask (MASKS) files that data/annotations.py reads and checks itself."""
    folder = _check_folder(folder)
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise UserError(f"cannot list {folder}: {e}; check its permissions") from None
    images, skipped = [], []
    for entry in entries:
        if entry.name in (INFO_FILE, CLASS_MANIFEST, LOCK) or entry.name in exclude:
            continue  # expected companions of the images: not worth a warning
        is_dir = entry.is_dir()
        if not is_dir and not entry.name.startswith(".") and (
                captions and entry.suffix.lower() == CAPTION_SUFFIX or masks and is_mask_file(entry)):
            continue
        # Hidden entries include macOS "._x.jpg" resource forks, which have an image suffix but are not images.
        if entry.name.startswith(".") or is_dir or entry.suffix.lower() not in IMAGE_EXTENSIONS \
                or is_mask_file(entry):
            skipped.append(entry.name + ("/" if is_dir else ""))
        else:
            images.append(entry)
    if skipped:
        logger.warning("skipping %d non-image entries in %s: %s", len(skipped), folder, _short_list(skipped))
    return images


def has_alpha(img: Image.Image) -> bool:
    """Whether an image carries transparency (an alpha channel or a transparent palette entry); from its header."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent areas become `background`, white by default (the usual background
    for product shots)."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # PIL clips these to 0..255 instead of scaling, which would turn a 16-bit photo nearly white.
        arr = np.asarray(img, dtype=np.float64)
        if arr.max() > 255:
            arr = arr / 257.0
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, ...


def load_image(path) -> Image.Image:
    """Open PATH fully decoded, upright per its EXIF orientation, in RGB; errors propagate to the caller."""
    with Image.open(path) as img:
        img.load()  # decode now so a truncated file fails here, not mid-training
        out = to_rgb(ImageOps.exif_transpose(img))
    return out if out is not img else img.copy()  # never hand out an image tied to the closed file


def load_images(folder, resolution, exclude=("class_data_dir",)):
    """Load every image in FOLDER as RGB; skip unreadable ones with a warning. Returns (images, paths)."""
    return load_image_files(list_images(folder, exclude), resolution, folder)


def load_image_files(files, resolution, folder, decoded: dict | None = None):
    """Load the image FILES (of FOLDER) as RGB; skip unreadable ones with a warning. Returns (images, paths).
    DECODED {path: image}, if given, supplies images decoded before and keeps the ones decoded here."""
    images, paths, small = [], [], []
    decoded = {} if decoded is None else decoded
    for path in files:
        try:
            if path not in decoded:
                decoded[path] = load_image(path)
            img = decoded[path]
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            logger.warning("skipping unreadable image %s: %s: %s", path, type(e).__name__, e)
            continue
        if min(img.size) < resolution:
            small.append(f"{path.name} ({img.width}x{img.height})")
        images.append(img)
        paths.append(path)
    if small:
        logger.warning("%d images in %s are smaller than %d px on the shorter side and will be upscaled: %s",
                       len(small), folder, resolution, _short_list(small))
    if not images:
        raise UserError(f"no usable images in {folder}: add {'/'.join(IMAGE_EXTENSIONS)} files")
    return images, paths


class ImageTransform:
    """Resize to cover the training size (`resolution` square, or the image's bucket), crop (center or random),
    optionally flip, map to [-1, 1] CHW float; a mask given along follows the same crop and flip."""

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False, buckets=None):
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.buckets = buckets  # data.buckets.Buckets, or None for square crops
        # id(img) (or (id(mask), id(img))) -> (the images, the resized uint8 array); holding the images keeps
        # their ids from being reused.
        self._cache: dict = {}

    @property
    def is_deterministic(self) -> bool:
        """True when the output depends only on the image (so latents can be cached once)."""
        return self.center_crop and not self.random_flip

    def target(self, img: Image.Image) -> tuple[int, int]:
        """(width, height) the image trains at: its bucket, or `resolution` square."""
        r = self.resolution
        return self.buckets.assign(*img.size) if self.buckets is not None else (r, r)

    def resized_size(self, img: Image.Image) -> tuple[int, int]:
        """(width, height) of the image scaled to just cover its target size."""
        (tw, th), (w, h) = self.target(img), img.size
        scale = max(tw / w, th / h)  # square target: resolution / shorter side
        return max(tw, round(w * scale)), max(th, round(h * scale))

    def _kept(self, images: tuple, make) -> np.ndarray:
        """make()'s array, made once per tuple of image objects."""
        key = tuple(id(i) for i in images)
        hit = self._cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], images)):
            return hit[1]
        arr = make()
        self._cache[key] = (images, arr)
        return arr

    def resized(self, img: Image.Image) -> np.ndarray:
        """The image scaled to cover its target size, as uint8 HWC; cached per image object."""
        def make() -> np.ndarray:  # np.array, a writable copy: torch.from_numpy warns on np.asarray's read-only one
            return np.array(img.convert("RGB").resize(self.resized_size(img), Image.Resampling.BICUBIC), np.uint8)
        return self._kept((img,), make)

    def placement(self, img: Image.Image, generator: torch.Generator | None = None) -> tuple[int, int, bool]:
        """(top, left, flip) of one crop of the resized image, drawn from `generator`."""
        (w, h), (tw, th) = self.resized_size(img), self.target(img)
        if self.center_crop:
            top, left = round((h - th) / 2), round((w - tw) / 2)
        else:
            top = int(torch.randint(0, h - th + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - tw + 1, (1,), generator=generator))
        return top, left, self.random_flip and float(torch.rand(1, generator=generator)) < 0.5

    def _cut(self, arr: np.ndarray, img: Image.Image, place: tuple[int, int, bool]) -> np.ndarray:
        (tw, th), (top, left, flip) = self.target(img), place
        arr = arr[top:top + th, left:left + tw]
        return np.ascontiguousarray(arr[:, ::-1] if flip else arr)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None, mask: Image.Image | None = None):
        """The image's pixels [3, H, W]; with MASK, (pixels, mask [1, H, W] in [0, 1]) cut alike."""
        place = self.placement(img, generator)
        x = torch.from_numpy(self._cut(self.resized(img), img, place)).permute(2, 0, 1).float()
        x = (x / 127.5 - 1.0).contiguous()
        return x if mask is None else (x, self.cut_mask(img, mask, place))

    def cut_mask(self, img: Image.Image, mask: Image.Image, place: tuple[int, int, bool]) -> torch.Tensor:
        """IMG's mask (any size: it is stretched over the image) at PLACE, as [1, H, W] float in [0, 1]."""
        def make() -> np.ndarray:  # BOX: each pixel the share of its area that is masked, so edges stay put
            return np.array(mask.convert("L").resize(self.resized_size(img), Image.Resampling.BOX), np.uint8)
        arr = self._kept((mask, img), make)  # resized once per mask, as the image is
        return torch.from_numpy(self._cut(arr, img, place)).float().div(255.0).unsqueeze(0)


def mixed_seed(*keys: int) -> int:
    """A 63-bit seed made from KEYS, identical across processes and restarts."""
    # SeedSequence mixes the ints well (unlike seed + index) and, unlike hash(), is stable across runs.
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, epoch, index), identical across processes and restarts."""
    return torch.Generator().manual_seed(mixed_seed(seed, epoch, index))


DROPOUT_KEY = 0xD409  # mixed into an item's seed for its caption-dropout draw, apart from its crop draws


class Slot(NamedTuple):
    """A bucketed run's dataset index (data/buckets.py): the instance image, the class image (None without), the
    key its random draws are seeded from, and its subject (several subjects)."""
    image: int
    class_image: int | None
    key: int
    subject: int = 0


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images + prompt, optionally class (prior-preservation) images + prompt, transformed per item.
    CAPTIONS (a prompt or None per image), MASKS (an L image per image) and BUCKETS are optional."""

    def __init__(self, instance_images, instance_prompt, transform, class_images=None, class_prompt=None,
                 seed: int = 0, name: str | None = None, captions: list | None = None, masks: list | None = None,
                 caption_dropout: float = 0.0, buckets=None):
        if not instance_images:
            raise ValueError("DreamBoothDataset needs at least one instance image")
        if class_images and not class_prompt:
            raise ValueError("class images need a class prompt")
        self.instance_images = list(instance_images)
        self.instance_prompt = instance_prompt
        self.class_images = list(class_images or [])
        self.class_prompt = class_prompt
        self.transform = transform
        self.seed = seed
        self.name = name  # the subject's name, carried by each item for per-subject losses
        self.captions, self.masks, self.caption_dropout = captions, masks, caption_dropout
        self.buckets = buckets  # indexed by Slot (data/buckets.py epoch_slots) when set
        self.epoch = 0

    @property
    def has_class(self) -> bool:
        return bool(self.class_images)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/flips of EPOCH; call before iterating each epoch (and when resuming)."""
        self.epoch = epoch

    @staticmethod
    def length(instance_images: int, class_images: int) -> int:
        # Same choice as diffusers' train_dreambooth: with class images the epoch is as long as the larger set,
        # so every class image is seen each epoch; the smaller set wraps around (index modulo its size).
        return max(instance_images, class_images)

    def __len__(self) -> int:
        return self.length(len(self.instance_images), len(self.class_images))

    def prompt(self, image: int, key: int) -> str:
        """The prompt of instance image IMAGE in the item of KEY: its caption or the instance prompt, or "" when
        caption dropout drops it (drawn from the item's own seed, so a resumed run drops the same items)."""
        prompt = (self.captions[image] if self.captions else None) or self.instance_prompt
        if self.caption_dropout:
            draw = torch.rand(1, generator=item_generator(self.seed, self.epoch, mixed_seed(key, DROPOUT_KEY)))
            if float(draw) < self.caption_dropout:
                return ""
        return prompt

    def __getitem__(self, index: int | Slot) -> dict:
        image, class_image, key = index[:3] if isinstance(index, Slot) else (index, index, index)
        generator = item_generator(self.seed, self.epoch, key)
        image %= len(self.instance_images)
        img = self.instance_images[image]
        if self.masks is None:
            item = {"pixel_values": self.transform(img, generator)}
        else:
            item = dict(zip(("pixel_values", "mask"), self.transform(img, generator, self.masks[image])))
        item["prompt"] = self.prompt(image, key)
        if self.class_images:
            img = self.class_images[class_image % len(self.class_images)]
            item["class_pixel_values"] = self.transform(img, generator)
            item["class_prompt"] = self.class_prompt
        if self.name is not None:
            item["subject"] = self.name
        return item


class CacheRows(list):
    """A batch's latent-cache rows (see dreambooth.data.latent_cache), standing in for its pixels once latents are cached."""


def _stack(values: list):
    """Pixel tensors as one [B,3,R,R] tensor; cache rows (ints) as CacheRows."""
    return torch.stack(values).contiguous() if isinstance(values[0], torch.Tensor) else CacheRows(values)


def collate(examples: list[dict]) -> dict:
    """Batch dataset items: stacked [B,3,R,R] pixel tensors (or CacheRows), prompt lists, and `has_class`."""
    has_class = "class_pixel_values" in examples[0]
    if any(("class_pixel_values" in e) != has_class for e in examples):
        raise ValueError("collate got a mix of items with and without class images")
    batch = {
        "pixel_values": _stack([e["pixel_values"] for e in examples]),
        "prompts": [e["prompt"] for e in examples],
        "has_class": has_class,
    }
    if has_class:
        batch["class_pixel_values"] = _stack([e["class_pixel_values"] for e in examples])
        batch["class_prompts"] = [e["class_prompt"] for e in examples]
    if "subject" in examples[0]:
        batch["subjects"] = [e["subject"] for e in examples]
    if "mask" in examples[0]:
        batch["masks"] = torch.stack([e["mask"] for e in examples])
    return batch
