"""Memory profiles: what each turns on, `auto` by the GPU's memory, and the plan a run resolves to.

A profile names concrete settings (see PROFILES). The low end's techniques (bf16 weights with compensated
updates, the optimizer step fused into backward) live in paramwise.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from dreambooth.config.schema import Config, backward_passes, resolve_key
from dreambooth.errors import UserError
from dreambooth.models.load import launched_processes
from dreambooth.training.optim import param_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """What one memory profile turns on; `None` leaves the config's own value (or its auto) in force."""
    doc: str
    gradient_checkpointing: bool = True
    mixed_precision: str | None = None
    prior_mode: str = "concat"
    master_weights: str = "fp32"      # dtype of the trainable weights: fp32, or bf16 with `rounding`
    rounding: str | None = None       # bf16 write-back of each update: "kahan" or "stochastic"
    fused_backward: bool = False      # optimizer step per tensor inside backward; gradients freed at once


_DEFAULT = Profile("fp32 master weights, 8-bit AdamW (optimizer auto), gradient checkpointing, fp16 autocast on "
                   "CUDA, prior in one joined batch, latents and prompts cached, VAE and text encoder off the GPU")
PROFILES: dict[str, Profile] = {
    "24gb": Profile("as default but without gradient checkpointing: no recomputation, fastest; more activations",
                    gradient_checkpointing=False),
    "default": _DEFAULT,
    "8gb": Profile("bf16 weights with Kahan-compensated AdamW updates, 8-bit states, optimizer step fused into "
                   "backward, gradient checkpointing, bf16 autocast", mixed_precision="bf16",
                   master_weights="bf16", rounding="kahan", fused_backward=True),
    # Not the sequential prior: with the step fused into backward, a second backward pass means holding every
    # gradient of the first (1.6 GiB in bf16) until it ends, more than the activations it saves (H200, prior on:
    # sequential 5.30 GiB; 8gb's joined prior less its Kahan buffer 4.09 GiB).
    "6gb": Profile("as 8gb but stochastic rounding instead of the Kahan buffer (2 bytes/weight less)",
                   mixed_precision="bf16", master_weights="bf16", rounding="stochastic", fused_backward=True),
}
# The default already fits 12 GB cards; larger cards gain nothing more from memory savings.
ALIASES = {"16gb": "default", "12gb": "default"}
# auto: the largest profile whose target fits the card (total memory in GiB, as CUDA reports it).
AUTO_THRESHOLDS_GIB = ((22.0, "24gb"), (11.0, "default"), (7.5, "8gb"), (0.0, "6gb"))


@dataclass
class MemoryPlan:
    """A profile resolved for this run and machine."""
    profile: str
    requested: str
    master_weights: str = "fp32"
    rounding: str | None = None
    fused_backward: bool = False
    backwards_per_step: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def master_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.master_weights == "bf16" else torch.float32

    @property
    def paramwise(self) -> bool:
        """Whether the optimizer must be the per-tensor ParamwiseOptimizer."""
        return self.fused_backward or self.master_weights == "bf16"

    def describe(self) -> dict:
        return asdict(self)


def auto_profile(total_gib: float | None) -> str:
    """The profile `auto` picks for a GPU with `total_gib` GiB (None: no GPU, the default profile)."""
    if total_gib is None:
        return "default"
    return next(name for limit, name in AUTO_THRESHOLDS_GIB if total_gib >= limit)


def gpu_memory_gib() -> float | None:
    """Total memory of GPU 0 in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def apply_memory_profile(cfg: Config, total_gib: float | None = ..., num_processes: int | None = None,
                         bf16_ok: bool | None = None) -> MemoryPlan:
    """Resolve `cfg.memory_profile`, write its settings into `cfg` where the user set none, return the plan.

    total_gib, num_processes and bf16_ok default to this machine's (tests pass them)."""
    total_gib = gpu_memory_gib() if total_gib is ... else total_gib
    num_processes = launched_processes() if num_processes is None else num_processes
    if bf16_ok is None:
        bf16_ok = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    requested = cfg.memory_profile
    name = auto_profile(total_gib) if requested == "auto" else requested
    notes = []
    if requested == "auto" and PROFILES[name].master_weights == "bf16" and not bf16_ok:
        notes.append(f"auto would pick {name}, which needs bf16 (Ampere or newer); using default")
        name = "default"
    name = ALIASES.get(name, name)
    prof = PROFILES[name]
    if prof.master_weights == "bf16" and not bf16_ok:
        raise UserError(f"memory_profile: {name} keeps weights in bf16, which this GPU lacks (Ampere or newer "
                        "needed): set memory_profile: default")
    # Through resolve_key, so config.yaml keeps these as given (auto) and a rerun on another card resolves afresh.
    where = f"a {total_gib:.1f} GiB GPU" if total_gib is not None else "no GPU"
    if name != requested:
        resolve_key(cfg, "memory_profile", name, f"{requested} on {where}", apply=False)
    for key in ("gradient_checkpointing", "mixed_precision", "prior_mode"):
        value = getattr(prof, key)
        if value is not None and (key not in cfg.provided or getattr(cfg, key) == "auto"):
            resolve_key(cfg, key, value, f"memory_profile {name} on {where}")
    plan = MemoryPlan(profile=name, requested=requested, master_weights=prof.master_weights,
                      rounding=prof.rounding, fused_backward=prof.fused_backward, notes=notes)
    if cfg.finetune == "lora" and plan.paramwise:
        # Adapters are a few MB: bf16 weights or per-tensor steps would save nothing and cost speed.
        plan.master_weights, plan.rounding, plan.fused_backward = "fp32", None, False
        plan.notes.append("finetune: lora keeps fp32 adapter weights and a plain optimizer step")
    if plan.master_weights == "bf16" and cfg.mixed_precision != "bf16":
        raise UserError(f"memory_profile: {name} keeps weights in bf16, so it needs mixed_precision: bf16 "
                        f"(got {cfg.mixed_precision}): remove mixed_precision or pick memory_profile: default")
    if plan.fused_backward and cfg.mixed_precision == "fp16":
        raise UserError(f"memory_profile: {name} steps the optimizer inside backward, where fp16 loss scaling "
                        "cannot work: set mixed_precision: bf16 or memory_profile: default")
    if plan.fused_backward and num_processes > 1:
        # DDP reduces gradients after the per-tensor hooks would already have used them.
        plan.fused_backward = False
        plan.notes.append("several processes: optimizer step after backward (gradients are all-reduced first)")
    plan.backwards_per_step = backward_passes(cfg)
    for note in plan.notes:
        log.info("memory_profile: %s", note)
    return plan


def make_paramwise_optimizer(params, cfg: Config, inner: str, plan: MemoryPlan, hparams: dict) -> "ParamwiseOptimizer":
    """The ParamwiseOptimizer a plan asks for, with the AdamW hyperparameters make_optimizer chose."""
    from dreambooth.training.paramwise import ParamwiseOptimizer
    params = list(params)
    on_cuda = any(t.is_cuda for t in param_tensors(params))
    if plan.master_weights == "bf16" and inner != "adamw8bit" and on_cuda:
        log.warning("memory_profile %s expects 8-bit AdamW states (pip install bitsandbytes, optimizer: auto); "
                    "fp32 states take 8 bytes per weight, about 5 GB more on SD 2.1", plan.profile)
    opt = ParamwiseOptimizer(params, **hparams, inner=inner, rounding=plan.rounding, seed=cfg.seed)
    if plan.fused_backward:
        opt.fuse_into_backward(plan.backwards_per_step, cfg.max_grad_norm)
    return opt
