"""Config + machine -> the run plan: every `auto` (and every memory-profile setting) decided once, with the reason.

The loaded Config is never changed. Everything downstream reads the plan; config.yaml and train_summary.json
say what the user wrote and what this machine chose.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from dreambooth.config.compile_plan import decide_compile
from dreambooth.config.machine import Machine, require_peft
from dreambooth.config.profiles import ALIASES, PROFILE_KEYS, PROFILES, MemoryPlan, auto_profile
from dreambooth.config.schema import Config, is_adapter
from dreambooth.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LORA_LR = 1e-4  # LoRA updates few, small matrices: 1e-4 is the common DreamBooth-LoRA rate


@dataclass(frozen=True)
class Choice:
    """One key this machine decided: as the config gives it (the user's value, or auto), what the run uses, why."""
    given: Any
    value: Any
    why: str = ""


@dataclass(frozen=True)
class RunPlan:
    """Everything a run decided before it starts; frozen."""
    config: Config
    machine: Machine
    memory: MemoryPlan
    precision: str  # accelerate's mixed_precision: no, fp16 or bf16
    optimizer: str  # adamw or adamw8bit
    gradient_checkpointing: bool
    prior_mode: str
    compile: bool
    compile_mode: str
    cache_latents: bool
    learning_rate: float
    export_formats: tuple[str, ...]
    trains_text_encoder: bool  # fully (train_text_encoder) or through LoRA layers
    steps_per_epoch: int
    total_steps: int
    ema_on_cpu: bool = False  # the EMA's shadow weights in host memory (ema: true)
    choices: Mapping[str, Choice] = field(default_factory=lambda: MappingProxyType({}))
    # Keys whose decided value is part of the training settings a checkpoint compares (the profile's).
    filled_in: frozenset = frozenset()
    compile_scope: str = "full"  # full: the whole UNet in one graph; regional: each repeated block
    compile_cache: str | None = None  # the folder that keeps this run's compiled code (config/compile_plan.py)
    compile_entry: str = ""  # this compile's name in that folder's records

    def resolved(self) -> dict[str, Any]:
        """{key: value} of every key this machine decided (train_summary.json, export headers)."""
        return {key: c.value for key, c in self.choices.items()}

    def effective_config(self) -> Config:
        """The config with the profile's filled-in keys and LoRA's rate: what checkpoints record and compare."""
        values = {key: self.choices[key].value for key in self.filled_in if key in self.choices}
        return dataclasses.replace(self.config, learning_rate=self.learning_rate, **values)


def backward_passes(cfg: Config, prior_mode: str | None = None) -> int:
    """Backward passes in one optimisation step: one per micro-batch, two with the sequential prior."""
    sequential = cfg.with_prior_preservation and (prior_mode or cfg.prior_mode) == "sequential"
    return cfg.gradient_accumulation_steps * (2 if sequential else 1)


def steps_per_epoch(epoch_items: int, cfg: Config, processes: int = 1) -> int:
    """Optimisation steps per epoch of `epoch_items` dataset items, sharded over `processes`."""
    micro = math.ceil(math.ceil(epoch_items / processes) / cfg.batch_size)
    return max(1, math.ceil(micro / cfg.gradient_accumulation_steps))


class _Choices:
    """Collects decisions in order; the config.yaml comment shows the first value as given."""

    def __init__(self, cfg: Config):
        self.cfg, self.items, self.filled_in = cfg, {}, set()

    def given(self, key: str) -> Any:
        return getattr(self.cfg, key) if key in self.cfg.provided else "auto"

    def decide(self, key: str, value: Any, why: str = "", filled_in: bool = False) -> Any:
        first = self.items.get(key)
        self.items[key] = Choice(first.given if first else self.given(key), value, why)
        if filled_in:
            self.filled_in.add(key)
        return value


def _memory(cfg: Config, machine: Machine, choices: _Choices) -> tuple[MemoryPlan, dict[str, Any]]:
    """The memory profile for this machine and the config keys it fills in (those the user left unset or auto)."""
    requested = cfg.memory_profile
    name = auto_profile(machine.gpu_gib) if requested == "auto" else requested
    notes = []
    if requested == "auto" and PROFILES[name].master_weights == "bf16" and not machine.bf16:
        notes.append(f"auto would pick {name}, which needs bf16 (Ampere or newer); using default")
        name = "default"
    name = ALIASES.get(name, name)
    prof = PROFILES[name]
    if prof.master_weights == "bf16" and not machine.bf16:
        raise UserError(f"memory_profile: {name} keeps weights in bf16, which this GPU lacks (Ampere or newer "
                        "needed): set memory_profile: default")
    where = machine.describe()
    if name != requested:
        choices.decide("memory_profile", name, f"{requested} on {where}")
    values = {key: getattr(cfg, key) for key in PROFILE_KEYS}
    for key in PROFILE_KEYS:
        value = getattr(prof, key)
        if value is not None and (key not in cfg.provided or getattr(cfg, key) == "auto"):
            values[key] = choices.decide(key, value, f"memory_profile {name} on {where}", filled_in=True)
    master, rounding, fused = prof.master_weights, prof.rounding, prof.fused_backward
    if is_adapter(cfg) and (fused or master == "bf16"):
        # Adapters are a few MB: bf16 weights or per-tensor steps would save nothing and cost speed.
        master, rounding, fused = "fp32", None, False
        notes.append(f"finetune: {cfg.finetune} keeps fp32 adapter weights and a plain optimizer step")
    if master == "bf16" and values["mixed_precision"] != "bf16":
        raise UserError(f"memory_profile: {name} keeps weights in bf16, so it needs mixed_precision: bf16 "
                        f"(got {values['mixed_precision']}): remove mixed_precision or pick memory_profile: default")
    if fused and values["mixed_precision"] == "fp16":
        raise UserError(f"memory_profile: {name} steps the optimizer inside backward, where fp16 loss scaling "
                        "cannot work: set mixed_precision: bf16 or memory_profile: default")
    if fused and machine.processes > 1:
        # DDP reduces gradients after the per-tensor hooks would already have used them.
        fused = False
        notes.append("several processes: optimizer step after backward (gradients are all-reduced first)")
    for note in notes:
        log.info("memory_profile: %s", note)
    plan = MemoryPlan(profile=name, requested=requested, master_weights=master, rounding=rounding,
                      fused_backward=fused, backwards_per_step=backward_passes(cfg, values["prior_mode"]),
                      notes=tuple(notes))
    return plan, values


def _precision(mixed_precision: str, machine: Machine) -> str:
    """accelerate's mixed_precision value: auto = fp16 on CUDA, no on CPU; fp16 without CUDA is refused."""
    if mixed_precision == "auto":
        return "fp16" if machine.cuda else "no"
    if mixed_precision == "fp16" and not machine.cuda:
        raise UserError("mixed_precision: fp16 needs a CUDA GPU and none was found: "
                        "set mixed_precision: auto (or no, or bf16 on CPU)")
    return mixed_precision


def _optimizer(cfg: Config, machine: Machine) -> str:
    """'adamw' or 'adamw8bit': auto takes 8-bit AdamW on CUDA when bitsandbytes is installed."""
    if cfg.optimizer == "auto":
        if machine.cuda and not machine.bitsandbytes:
            log.warning("bitsandbytes is not installed, so optimizer auto uses plain AdamW "
                        "(pip install bitsandbytes for 8-bit AdamW, which saves ~5 GB on SD 2.1)")
        return "adamw8bit" if machine.cuda and machine.bitsandbytes else "adamw"
    if cfg.optimizer == "adamw8bit" and not machine.cuda:
        raise UserError("optimizer: adamw8bit needs a CUDA GPU and none was found: set optimizer: auto or adamw")
    if cfg.optimizer == "adamw8bit" and not machine.bitsandbytes:
        raise UserError("optimizer: adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                        "or set optimizer: adamw")
    return cfg.optimizer


def _ema_on_cpu(cfg: Config, memory: MemoryPlan, machine: Machine, choices: _Choices) -> bool:
    """Where the EMA's fp32 copy lives: auto keeps it in host memory on CUDA with the bf16 profiles, whose point is
    that no fp32 copy of the weights sits on the GPU."""
    if not cfg.ema:
        return False
    if cfg.ema_on_cpu != "auto":
        return bool(cfg.ema_on_cpu)
    if not machine.cuda:
        return choices.decide("ema_on_cpu", False, "no CUDA GPU: the copy is in host memory anyway")
    low = memory.master_weights == "bf16" or memory.fused_backward
    return choices.decide("ema_on_cpu", low, f"memory_profile {memory.profile}"
                          + (" keeps no fp32 weights on the GPU" if low else " has room for the fp32 copy"))


def export_formats(cfg: Config) -> list[str]:
    """export_formats as written at the end of training. A LoRA run always writes its LoRA file, and its merged
    full pipeline (diffusers) only when the user listed diffusers: the default must not add a 5 GB copy."""
    formats = list(dict.fromkeys(cfg.export_formats))
    if not is_adapter(cfg):
        return formats
    if "export_formats" not in cfg.provided:
        formats = []
    return ["lora"] + [f for f in formats if f != "lora"]


def learning_rate(cfg: Config) -> float:
    """The user's learning_rate, or 1e-4 for adapter runs that left it unset (JumpStart's 2e-6 is for full weights)."""
    if is_adapter(cfg) and "learning_rate" not in cfg.provided:
        return DEFAULT_LORA_LR
    return cfg.learning_rate


def trains_text_encoder(cfg: Config) -> bool:
    """The text encoder trains: fully (train_text_encoder), or through LoRA layers (lora.text_encoder)."""
    return cfg.train_text_encoder or (is_adapter(cfg) and cfg.lora.text_encoder)


def resolve(cfg: Config, machine: Machine, epoch_items: int) -> RunPlan:
    """Decide every machine-dependent setting of a run over `epoch_items` dataset items per epoch."""
    if is_adapter(cfg):
        require_peft()
    if cfg.compute_fid:  # JumpStart's tuning reads an FID; ours are DreamBench's scores instead (docs/evaluate.md)
        log.warning("compute_fid: no FID is computed here: score the run with validation.metrics (DINO, CLIP-T, "
                    "loss, drift) or `dreambooth eval`, and judge it by its validation images and report.html in "
                    "output_dir")
    choices = _Choices(cfg)
    memory, values = _memory(cfg, machine, choices)
    per_epoch = steps_per_epoch(epoch_items, cfg, machine.processes)
    total = cfg.max_steps or cfg.epochs * per_epoch
    precision = _precision(values["mixed_precision"], machine)
    optimizer = _optimizer(cfg, machine)
    prior_joined = cfg.with_prior_preservation and values["prior_mode"] == "concat"
    compile_, mode, scope, compile_cache, entry = decide_compile(
        cfg, memory, total, machine, precision, prior_joined, values["gradient_checkpointing"], choices)
    if values["mixed_precision"] == "auto":
        choices.decide("mixed_precision", precision)
    if cfg.optimizer == "auto":
        choices.decide("optimizer", optimizer)
    if cfg.cache_latents == "auto":  # the VAE is never trained, so its latents can always be cached
        choices.decide("cache_latents", True, "VAE frozen")
    ema_on_cpu = _ema_on_cpu(cfg, memory, machine, choices)
    lr = learning_rate(cfg)
    return RunPlan(
        config=cfg, machine=machine, memory=memory, precision=precision, optimizer=optimizer,
        gradient_checkpointing=values["gradient_checkpointing"], prior_mode=values["prior_mode"], compile=compile_,
        compile_mode=mode, cache_latents=cfg.cache_latents is not False, learning_rate=lr,
        export_formats=tuple(export_formats(cfg)), trains_text_encoder=trains_text_encoder(cfg),
        ema_on_cpu=ema_on_cpu,
        steps_per_epoch=per_epoch, total_steps=total, choices=MappingProxyType(dict(choices.items)),
        filled_in=frozenset(choices.filled_in),
        compile_scope=scope, compile_cache=str(compile_cache) if compile_cache else None, compile_entry=entry)

