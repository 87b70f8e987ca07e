"""torch.compile of the UNet: whether a run compiles (`compile: auto`), in which mode, and running it eagerly.

On the H200 (SD 2.1 base, 512 px, prior on) CUDA graphs took a default-profile step from 0.27 s to 0.09 s, since
eager steps there are bound by launching ~7,000 kernels; compiling cost about 2 minutes at the first steps.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from dreambooth.config.schema import Config, backward_passes, resolve_key
from dreambooth.errors import UserError

if TYPE_CHECKING:
    from dreambooth.training.memory import MemoryPlan

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # tests trace with "eager": the same graph capture without minutes of code generation
# auto compiles runs at least this long: a compile with CUDA graphs took 118-135 s on the H200 and saved
# 0.17-0.19 s per step, so shorter runs would finish later than without it.
PAYBACK_STEPS = 700


def check_compile(cfg: Config) -> None:
    """Refuse explicit CUDA graphs where a step runs several backward passes (before anything is written)."""
    if cfg.compile is True and cfg.compile_mode == "reduce-overhead" and backward_passes(cfg) > 1:
        # The graph owns the memory of the gradients its backward returns; the step's next pass would replay
        # it over gradients still being accumulated.
        raise UserError("compile_mode: reduce-overhead (CUDA graphs) cannot run several backward passes per step "
                        "(gradient_accumulation_steps > 1 or prior_mode: sequential): "
                        "set compile_mode: auto, or gradient_accumulation_steps: 1 and prior_mode: concat")


def has_triton() -> bool:
    """Whether inductor can generate GPU kernels here (Triton installed)."""
    return importlib.util.find_spec("triton") is not None


def why_not_auto(cfg: Config, plan: MemoryPlan, total_steps: int, cuda: bool, processes: int,
                 triton: bool) -> str | None:
    """Why `compile: auto` leaves this run eager, or None when it compiles (with CUDA graphs)."""
    if not cuda:
        return "no CUDA GPU"
    if processes > 1:
        return "several processes"
    if cfg.finetune != "full" or cfg.train_text_encoder:
        return "only the full UNet fine-tune with a frozen text encoder is measured with CUDA graphs"
    if plan.fused_backward or plan.master_weights != "fp32":
        return f"memory_profile {plan.profile}: a compiled backward holds every gradient at once"
    if backward_passes(cfg) > 1:
        return "several backward passes per step"
    if not triton:
        return "Triton is not installed"
    if total_steps < PAYBACK_STEPS:
        return f"{total_steps} steps, under the {PAYBACK_STEPS} that repay compiling (about 2 minutes)"
    return None


def resolve_compile(cfg: Config, plan: MemoryPlan, total_steps: int, cuda: bool | None = None, processes: int = 1,
                    triton: bool | None = None) -> None:
    """Settle `compile` and `compile_mode` for this run (auto: see why_not_auto), recorded for config.yaml."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    triton = has_triton() if triton is None else triton
    if cfg.compile == "auto":
        why = why_not_auto(cfg, plan, total_steps, cuda, processes, triton)
        resolve_key(cfg, "compile", why is None, why or f"{total_steps} steps on one CUDA GPU")
        if why is None:
            log.info("compile: auto compiles the UNet for this %d-step run; the first steps take about 2 minutes "
                     "longer (compile: false skips it)", total_steps)
    if cfg.compile_mode == "auto":
        graphs = cfg.compile and cuda and backward_passes(cfg) == 1
        resolve_key(cfg, "compile_mode", "reduce-overhead" if graphs else "default",
                    "CUDA graphs" if graphs else "no CUDA graphs here")
    elif not cfg.compile and cfg.compile_mode != "default":
        log.warning("compile_mode: %s has no effect without compile", cfg.compile_mode)


def compile_unet(unet: torch.nn.Module, mode: str = "default", fall_back: bool = False) -> None:
    """torch.compile the UNet in place, so parameter names (checkpoints, export) stay as they are.
    fall_back: a failing compile runs the UNet eagerly with a warning instead of ending the run (compile: auto)."""
    import torch._dynamo
    # Training shapes are fixed: one static graph. A smaller last batch compiles once more rather than switching
    # the whole run to a slower dynamic-shape graph.
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo, limit, max(getattr(dynamo, limit), 16))
    dynamo.suppress_errors = fall_back
    inductor = COMPILE_BACKEND == "inductor"
    unet.compile(backend=COMPILE_BACKEND, mode=None if mode == "default" or not inductor else mode, dynamic=False)


@contextmanager
def eager(module: torch.nn.Module):
    """Run an in-place-compiled module eagerly for a while (validation: other shapes, no gradients), sparing
    a second compilation that would cost more than it saves."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled
