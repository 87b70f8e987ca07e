"""Images into the forms the routes answer with: base64 PNG (settings in a text chunk), base64 JPEG (settings in
its comment), or JumpStart's H x W x 3 RGB arrays."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from dreambooth.files import png_settings


def png_base64(image, settings: dict | None) -> str:
    buf = io.BytesIO()
    if settings is None:
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="PNG", pnginfo=png_settings(settings))  # as `dreambooth generate` writes it
    return base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_base64(image, settings: dict | None, quality: int = 95) -> str:
    buf = io.BytesIO()
    extra = {"comment": json.dumps(settings).encode()} if settings is not None else {}
    image.convert("RGB").save(buf, format="JPEG", quality=quality, **extra)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def rgb_array(image) -> list:
    """JumpStart's `application/json` form: nested lists of 0-255 ints, rows of [R, G, B] pixels."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8).tolist()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
