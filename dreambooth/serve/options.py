"""What `dreambooth serve` was asked for: the model and its named adapters, the limits, the address and token.

Light on purpose: the command checks these before it imports torch or FastAPI."""

from __future__ import annotations

import argparse
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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """`dreambooth serve`'s command line."""
    p.add_argument("model", help="a training run's output folder (full or LoRA run), a diffusers folder, a "
                                 ".safetensors file, a hub id or builtin:tiny")
    p.add_argument("--host", default=ServeOptions.host, help="address to listen on (default %(default)s; any other "
                                                              "needs a token)")
    p.add_argument("--port", type=int, default=ServeOptions.port, help="default %(default)s; 0 picks a free port")
    p.add_argument("--token", help="bearer token required on every route but /ping; prefer the environment variable "
                                   "DREAMBOOTH_SERVE_TOKEN (a command line is visible to other users)")
    p.add_argument("--lora", nargs="+", metavar="NAME=PATH", help="LoRA adapters requests may pick by NAME (a "
                   ".safetensors file or a LoRA run's folder)")
    p.add_argument("--adapter", help="the adapter used when a request names none: a --lora name or none "
                                     "(default: a LoRA run's own LoRA, else none)")
    p.add_argument("--scheduler", help="the default sampler: dpm++, dpm++-karras, ddim, euler, euler-a, pndm or unipc "
                                       "(default: the model's own)")
    p.add_argument("--default-steps", type=int, default=ServeOptions.default_steps, help="inference steps when a "
                   "request gives none (default %(default)s, as JumpStart and A1111)")
    p.add_argument("--max-queue", type=int, default=ServeOptions.max_queue, help="requests that may wait; more get "
                   "503 (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=ServeOptions.max_batch, help="images made together in one "
                   "pipeline call (default %(default)s)")
    p.add_argument("--max-side", type=int, default=Limits.max_side, help="largest width or height (default "
                   "%(default)s)")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="most inference steps (default %(default)s)")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="most images per request (default "
                   "%(default)s)")
    p.add_argument("--max-body", type=int, default=Limits.max_body, help="largest request body in bytes (default "
                   "%(default)s: 1 MiB)")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="seconds a request may wait and run "
                   "(default %(default)g)")
    p.add_argument("--grace", type=float, default=ServeOptions.grace_s, help="seconds to finish requests after "
                   "SIGTERM / Ctrl-C (default %(default)g)")
    p.add_argument("--no-metadata", action="store_true", help="do not write prompts and settings into the images")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when the model is a hub id")
    p.add_argument("--variant", help="weight file variant when the model is a hub id, e.g. fp16")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weight files you trust")
    p.add_argument("--log-level", default=ServeOptions.log_level, choices=["debug", "info", "warning", "error"])


def from_args(args) -> tuple[ServeOptions, ModelSpec]:
    """The command line as checked options and the model to load (paths are checked later, by resolve_spec)."""
    options = check_options(ServeOptions(
        host=args.host, port=args.port, token=args.token, max_queue=args.max_queue, max_batch=args.max_batch,
        grace_s=args.grace, default_steps=args.default_steps, metadata=not args.no_metadata, log_level=args.log_level,
        limits=Limits(args.max_side, args.max_steps, args.max_images, args.max_body, args.timeout)))
    spec = ModelSpec(args.model, parse_loras(args.lora or []), args.adapter, args.scheduler, args.allow_pickle,
                     args.revision, args.variant, args.device)
    return options, spec
