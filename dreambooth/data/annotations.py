"""Per-image captions (NAME.txt) and masks (NAME.mask.png, else the image's alpha channel) read beside the
instance images; every file not used as it stands is named in one warning per folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dreambooth.data.dataset import CAPTION_SUFFIX, IMAGE_EXTENSIONS, has_alpha, is_mask_file, to_rgb

log = logging.getLogger(__name__)

PLACEHOLDER = "[instance]"  # in a caption, stands for the subject's instance prompt


@dataclass
class Annotations:
    """One folder's captions (a prompt or None per image) and masks (an L image per image: white counts)."""
    captions: list[str | None] | None = None
    masks: list[Image.Image] | None = None
    masked: int = 0  # images with a mask of their own (the others count whole)
    problems: list[str] = field(default_factory=list)


def load_mask(path: Path) -> Image.Image:
    """A mask file as an L image, upright per its EXIF orientation; transparent areas count as black."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img), background=(0, 0, 0)).convert("L")


def alpha_mask(path: Path) -> Image.Image | None:
    """The alpha channel of an image file as its mask, or None when it has no transparency."""
    with Image.open(path) as img:
        if not has_alpha(img):
            return None  # the mode is known from the header: images without alpha are not decoded again
        img.load()
        alpha = ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def read_caption(path: Path, instance_prompt: str, problems: list[str]) -> str | None:
    """The caption in PATH on one line, the placeholder replaced; None (with a problem noted) if unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path.name}: unreadable ({type(e).__name__}), the instance prompt is used; save it as UTF-8")
        return None
    text = " ".join(text.split())  # one line: newlines and runs of spaces mean nothing to the text encoder
    if not text:
        problems.append(f"{path.name}: empty, the instance prompt is used")
        return None
    return text.replace(PLACEHOLDER, instance_prompt)


def _mask(path: Path, mask_file: Path | None, size: tuple[int, int], problems: list[str]) -> Image.Image | None:
    """IMAGE's mask from MASK_FILE or its alpha channel; None (whole image counts) when it has none usable."""
    name = mask_file.name if mask_file else f"{path.name} (alpha channel)"
    try:
        mask = load_mask(mask_file) if mask_file else alpha_mask(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        problems.append(f"{name}: unreadable ({type(e).__name__}), ignored: the whole image counts")
        return None
    if mask is None:
        return None
    if not np.asarray(mask).any():
        problems.append(f"{name}: all black, ignored: the whole image counts")
        return None
    if mask.size != size:
        problems.append(f"{name}: {mask.width}x{mask.height} but {path.name} is {size[0]}x{size[1]}: stretched over it")
    return mask


def read_annotations(folder: Path, paths: list[Path], images: list[Image.Image], instance_prompt: str,
                     captions: bool, masks: bool) -> Annotations:
    """Captions and/or masks of the images at PATHS (their decoded IMAGES) in FOLDER; problems are warned once."""
    folder = Path(folder)
    out = Annotations()
    if not (captions or masks):
        return out
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stems = {p.stem for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p)}
    if captions:
        texts = {p.stem: p for p in files if p.suffix.lower() == CAPTION_SUFFIX}
        out.problems += [f"{p.name}: no image {s}.* beside it, ignored" for s, p in texts.items() if s not in stems]
        out.captions = [read_caption(texts[p.stem], instance_prompt, out.problems) if p.stem in texts else None
                        for p in paths]
        if not texts:
            log.warning("captions: true, but %s holds no NAME.txt captions: every image trains with %r", folder,
                        instance_prompt)
    if masks:
        mask_files: dict[str, Path] = {}
        for p in files:
            if is_mask_file(p):
                mask_files.setdefault(Path(p.stem).stem, p)  # sorted by name: NAME.mask.jpg before NAME.mask.png
        out.problems += [f"{p.name}: no image {s}.* beside it, ignored" for s, p in mask_files.items()
                         if s not in stems]
        found = [_mask(p, mask_files.get(p.stem), img.size, out.problems) for p, img in zip(paths, images)]
        out.masked = sum(m is not None for m in found)
        out.masks = [m if m is not None else Image.new("L", img.size, 255) for m, img in zip(found, images)]
    if out.problems:
        log.warning("%s: %d caption/mask files not used as they stand: %s", folder, len(out.problems),
                    "; ".join(out.problems))
    return out
