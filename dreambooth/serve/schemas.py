"""Request bodies of JumpStart's and A1111's routes as typed models, checked against the server's limits and
turned into a Job of per-image items."""

from __future__ import annotations

import difflib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dreambooth.serve.generate import SCHEDULERS
from dreambooth.serve.jobs import Item, Job, Shape
from dreambooth.serve.options import Limits

SEED_MAX = 2**62  # room for seed + image index within torch's 64-bit seeds
DEFAULT_SAMPLER = "default"  # the model's own scheduler (or the one `serve --scheduler` named)

# AUTOMATIC1111's sampler names for the samplers we have; our own short names are accepted too.
A1111_SAMPLERS = {"Euler": "euler", "Euler a": "euler-a", "DDIM": "ddim", "PLMS": "pndm", "DPM++ 2M": "dpm++",
                  "DPM++ 2M Karras": "dpm++-karras", "UniPC": "unipc"}
# A1111 fields that change the picture when set; refused rather than silently ignored.
A1111_UNSUPPORTED = ("enable_hr", "restore_faces", "tiling", "init_images", "alwayson_scripts", "script_name")
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


@dataclass
class Context:
    """What a request is checked against and completed with: limits, adapter names, the server's defaults."""
    limits: Limits = field(default_factory=Limits)
    adapters: list[str] = field(default_factory=list)
    default_adapter: str | None = None
    size: int = 512   # the model's own width and height
    steps: int = 50


class ApiError(Exception):
    """An answer other than 200: status, a one-line message naming the field, and extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}
        self.kind = kind or {400: "bad_request", 413: "too_large", 415: "unsupported_media_type",
                             422: "invalid_field", 503: "unavailable"}.get(status, "error")

    def body(self) -> dict:
        return {"error": self.kind, "message": self.message, "field": self.field}


def _prompt_list(value: Any, name: str, allow_empty: bool) -> Any:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise ValueError(f"{name} is empty: give a text such as 'a photo of riobugger cat'")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if not allow_empty and not all(v.strip() for v in value):
            raise ValueError(f"{name} has an empty entry")
        return value
    raise ValueError(f"{name} must be a string or a non-empty list of strings")


class JumpStartBody(BaseModel):
    """JumpStart's endpoint fields with its defaults; `adapter`, `adapter_scale` and `scheduler` are ours."""
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    width: int | None = None   # None: the model's own size (512 for SD 2.1 base, JumpStart's default)
    height: int | None = None
    num_inference_steps: int | None = None  # None: `serve --default-steps` (50, JumpStart's default)
    guidance_scale: float = Field(7.5, allow_inf_nan=False)
    num_images_per_prompt: int = 1
    seed: int | None = None
    scheduler: str | None = None
    adapter: str | None = None
    adapter_scale: float = Field(1.0, allow_inf_nan=False)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return _prompt_list(v, "prompt", allow_empty=False)

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _negative(cls, v):
        return None if v is None else _prompt_list(v, "negative_prompt", allow_empty=True)


class Txt2ImgBody(BaseModel):
    """AUTOMATIC1111's /sdapi/v1/txt2img fields we honour, with its API defaults; other fields are ignored."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int | None = None
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None  # A1111 1.9+: "Automatic" or "Karras"
    adapter: str | None = None
    adapter_scale: float = Field(1.0, allow_inf_nan=False)


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """Validate a decoded JSON body into `model`; the first problem becomes a 422 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(422, 'the body must be a JSON object such as {"prompt": "a photo of riobugger cat"}')
    if model is JumpStartBody and "text_inputs" in data and "prompt" not in data:
        data = dict(data)
        data["prompt"] = data.pop("text_inputs")  # the other name JumpStart's payloads use
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, model) from None


def validation_error(e: ValidationError, model: type[BaseModel]) -> ApiError:
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains a missing key
    names = [str(p) for p in err["loc"] if isinstance(p, (str, int))]
    field = names[0] if names else None
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(field, model.model_fields, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        return ApiError(422, f"unknown field '{field}': {hint}known fields: {', '.join(model.model_fields)}", field)
    if err["type"] == "missing":
        return ApiError(422, f"{field} is required", field)
    msg = err["msg"].removeprefix("Value error, ")
    where = ".".join(names) or "body"
    got = repr(err.get("input"))
    return ApiError(422, f"{msg if msg.startswith(where) else f'{where}: {msg}'} (got {got[:60]})", field)


def _check_int(field: str, value: int, lo: int, hi: int, fix: str = "") -> None:
    if not lo <= value <= hi:
        raise ApiError(422, f"{field} must be between {lo} and {hi} (got {value}){fix}", field)


def check_size(limits: Limits, width: tuple[str, int], height: tuple[str, int]) -> None:
    for field, v in (width, height):
        _check_int(field, v, 8, limits.max_side, f"; the server's limit is --max-side {limits.max_side}")
        if v % 8:
            raise ApiError(422, f"{field} must be a multiple of 8 (got {v}), e.g. {max(8, v - v % 8)}", field)


def pick_seed(seed: int | None, count: int, field: str = "seed") -> int:
    """The first image's seed: the given one (checked to leave room for `count` images) or a random one."""
    if seed is None or seed == -1:
        return secrets.randbelow(2**32 - 1)
    _check_int(field, seed, 0, SEED_MAX - count, " (or leave it out for a random seed)")
    return seed


def pick_sampler(name: str | None, karras: bool = False, field: str = "scheduler") -> str:
    if name is None or name in ("", DEFAULT_SAMPLER, "Automatic"):
        return DEFAULT_SAMPLER
    ours = A1111_SAMPLERS.get(name, name if name in SCHEDULERS else None)
    if ours is None:
        choices = ", ".join([*A1111_SAMPLERS, *SCHEDULERS])
        raise ApiError(422, f"{field} '{name}' is not available: choose one of {choices}", field)
    if karras and ours == "dpm++":
        return "dpm++-karras"
    return ours


def pick_adapter(name: str | None, scale: float, adapters: list[str], default: str | None,
                 field: str = "adapter") -> tuple[str | None, float]:
    """(adapter, scale) for a request: its named adapter, "none" for the base model, or the server's default."""
    if name is None:
        return default, scale
    if name in ("none", ""):
        return None, 1.0
    if name not in adapters:
        known = ", ".join(["none", *adapters]) if adapters else "none (the server was started without --lora)"
        raise ApiError(422, f"{field} '{name}' is not loaded: choose one of {known}", field)
    if not -4 <= scale <= 4:
        raise ApiError(422, f"adapter_scale must be between -4 and 4 (got {scale})", "adapter_scale")
    return name, scale


def jumpstart_job(body: JumpStartBody, ctx: Context) -> Job:
    """Every image of a JumpStart request: each prompt's images in order, seeds seed, seed+1, ..."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    negative = body.negative_prompt
    if negative is not None and isinstance(negative, list) != isinstance(body.prompt, list):
        raise ApiError(422, "negative_prompt must be a string with a string prompt, and a list with a list prompt",
                       "negative_prompt")
    negatives = negative if isinstance(negative, list) else [negative or ""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ApiError(422, f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts: give one each",
                       "negative_prompt")
    limits, width, height = ctx.limits, body.width or ctx.size, body.height or ctx.size
    steps = body.num_inference_steps if body.num_inference_steps is not None else ctx.steps
    check_size(limits, ("width", width), ("height", height))
    _check_int("num_inference_steps", steps, 1, limits.max_steps)
    _check_int("num_images_per_prompt", body.num_images_per_prompt, 1, limits.max_images)
    count = len(prompts) * body.num_images_per_prompt
    if count > limits.max_images:
        raise ApiError(422, f"{len(prompts)} prompts x num_images_per_prompt {body.num_images_per_prompt} = {count} "
                            f"images, more than the server's limit of {limits.max_images}", "num_images_per_prompt")
    seed = pick_seed(body.seed, count)
    adapter, scale = pick_adapter(body.adapter, body.adapter_scale, ctx.adapters, ctx.default_adapter)
    shape = Shape(width, height, steps, body.guidance_scale, pick_sampler(body.scheduler), adapter, scale)
    items = [Item(p, n, seed + k * body.num_images_per_prompt + i)
             for k, (p, n) in enumerate(zip(prompts, negatives)) for i in range(body.num_images_per_prompt)]
    return Job(shape, items)


def txt2img_job(body: Txt2ImgBody, ctx: Context) -> Job:
    """Every image of an A1111 txt2img request: batch_size x n_iter images, seeds seed, seed+1, ..."""
    extra = body.model_extra or {}
    for name in A1111_UNSUPPORTED:
        if extra.get(name):
            raise ApiError(422, f"{name} is not supported by this server: leave it out or set it false/empty", name)
    prompt, adapter_name, scale = body.prompt, body.adapter, body.adapter_scale
    tags = LORA_TAG.findall(prompt)
    if tags:  # A1111's way to pick a LoRA: <lora:NAME:WEIGHT> in the prompt
        if len(tags) > 1 or body.adapter is not None:
            raise ApiError(422, "name one adapter per request: one <lora:NAME:WEIGHT> tag or the adapter field",
                           "prompt")
        adapter_name, weight = tags[0]
        try:
            scale = float(weight) if weight else 1.0
        except ValueError:
            raise ApiError(422, f"<lora:{adapter_name}:{weight}> has no number as its weight", "prompt") from None
        prompt = LORA_TAG.sub("", prompt).strip()
    limits, width, height = ctx.limits, body.width or ctx.size, body.height or ctx.size
    steps = body.steps if body.steps is not None else ctx.steps
    check_size(limits, ("width", width), ("height", height))
    _check_int("steps", steps, 1, limits.max_steps)
    _check_int("batch_size", body.batch_size, 1, limits.max_images)
    _check_int("n_iter", body.n_iter, 1, limits.max_images)
    count = body.batch_size * body.n_iter
    if count > limits.max_images:
        raise ApiError(422, f"batch_size {body.batch_size} x n_iter {body.n_iter} = {count} images, more than the "
                            f"server's limit of {limits.max_images}", "batch_size")
    seed = pick_seed(body.seed, count)
    karras = (body.scheduler or "").lower() == "karras"
    sampler_field = "sampler_name" if body.sampler_name is not None else "sampler_index"
    sampler = pick_sampler(body.sampler_name or body.sampler_index, karras, sampler_field)
    adapter, scale = pick_adapter(adapter_name, scale, ctx.adapters, ctx.default_adapter)
    shape = Shape(width, height, steps, body.cfg_scale, sampler, adapter, scale)
    return Job(shape, [Item(prompt, body.negative_prompt, seed + k) for k in range(count)])
