"""What `dreambooth serve` was asked for: the model and its named adapters, the limits, the address and token.

Light on purpose: the command checks these before it imports torch or FastAPI."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from dreambooth.errors import UserError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class ModelSpec:
    """What `serve` loads: a run folder, diffusers folder, single file or builtin, plus named LoRA files."""
    model: str
    loras: dict[str, str] = field(default_factory=dict)  # name -> .safetensors path (or LoRA run folder)
    default_adapter: str | None = None
    scheduler: str | None = None
    allow_pickle: bool = False
    revision: str | None = None
    variant: str | None = None
    device: str | None = None


def parse_loras(values: list[str]) -> dict[str, str]:
    """`--lora NAME=PATH ...` as {name: path}; names are what requests may ask for, paths never are."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise UserError(f"--lora {value}: give NAME=PATH, e.g. --lora cat=runs/cat-lora")
        if not ADAPTER_NAME.fullmatch(name) or name == "none":
            raise UserError(f"--lora {value}: the name '{name}' must be letters, digits, '_', '.' or '-' (not 'none')")
        if name in out:
            raise UserError(f"--lora {value}: the name '{name}' is given twice")
        out[name] = path
    return out


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; `serve --max-*` options set them."""
    max_side: int = 1024
    max_steps: int = 150
    max_images: int = 8
    max_body: int = 1 << 20
    timeout_s: float = 300.0


TOKEN_ENV = "DREAMBOOTH_SERVE_TOKEN"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_queue: int = 32
    max_batch: int = 4
    grace_s: float = 30.0
    default_steps: int = 50  # JumpStart's and A1111's default num_inference_steps / steps
    metadata: bool = True
    log_level: str = "info"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(o: ServeOptions) -> ServeOptions:
    """The token rule and the limits, before anything loads."""
    token = o.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(o.host) and not token:
        raise UserError(f"--host {o.host} lets other machines connect: set a token with {TOKEN_ENV}=... (or --token), "
                        "or keep the default --host 127.0.0.1")
    for name, value, lo in (("--max-queue", o.max_queue, 1), ("--max-batch", o.max_batch, 1),
                            ("--max-side", o.limits.max_side, 8), ("--max-steps", o.limits.max_steps, 1),
                            ("--max-images", o.limits.max_images, 1), ("--max-body", o.limits.max_body, 1024),
                            ("--default-steps", o.default_steps, 1)):
        if value < lo:
            raise UserError(f"{name} must be at least {lo} (got {value})")
    if o.default_steps > o.limits.max_steps:
        raise UserError(f"--default-steps {o.default_steps} is above --max-steps {o.limits.max_steps}")
    if o.limits.timeout_s <= 0 or o.grace_s < 0:
        raise UserError("--timeout must be above 0 and --grace at least 0 seconds")
    o.token = token
    return o
