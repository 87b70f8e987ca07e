"""torch.compile of the UNet, and running it eagerly for a while (whether a run compiles: config/plan.py).

On the H200 (SD 2.1 base, 512 px, prior on) CUDA graphs took a default-profile step from 0.27 s to 0.09 s, since
eager steps there are bound by launching ~7,000 kernels; compiling cost about 2 minutes at the first steps.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

COMPILE_BACKEND = "inductor"  # tests trace with "eager": the same graph capture without minutes of code generation


def repeated_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's repeated blocks (diffusers names their classes in `_repeated_blocks`: SD's BasicTransformerBlock),
    which regional compilation compiles one by one: same-shaped blocks share one compiled graph."""
    names = set(getattr(unet, "_repeated_blocks", None) or ["BasicTransformerBlock"])
    return [m for m in unet.modules() if type(m).__name__ in names]


def compile_unet(unet: torch.nn.Module, mode: str = "default", fall_back: bool = False,
                 scope: str = "full") -> None:
    """torch.compile the UNet in place, so parameter names (checkpoints, export) stay as they are.
    fall_back: a failing compile runs the UNet eagerly with a warning instead of ending the run (compile: auto).
    scope: full (one graph of the whole UNet) or regional (each repeated block; the rest runs eagerly)."""
    import torch._dynamo
    # Training shapes are fixed: one static graph. A smaller last batch compiles once more rather than switching
    # the whole run to a slower dynamic-shape graph.
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo, limit, max(getattr(dynamo, limit), 16))
    dynamo.suppress_errors = fall_back
    inductor = COMPILE_BACKEND == "inductor"
    kwargs = {"backend": COMPILE_BACKEND, "mode": None if mode == "default" or not inductor else mode,
              "dynamic": False}
    if scope == "regional":
        blocks = repeated_blocks(unet)
        if not blocks:
            raise ValueError(f"{type(unet).__name__} has no repeated blocks to compile regionally")
        for block in blocks:  # what diffusers' compile_repeated_blocks does, for any module with such blocks
            block.compile(**kwargs)
    else:
        unet.compile(**kwargs)


@contextmanager
def eager(module: torch.nn.Module):
    """Run an in-place-compiled module eagerly for a while (validation: other shapes, no gradients), sparing
    a second compilation that would cost more than it saves."""
    compiled = {m: m._compiled_call_impl for m in module.modules()
                if getattr(m, "_compiled_call_impl", None) is not None}  # the UNet, or its regions
    for m in compiled:
        m._compiled_call_impl = None
    try:
        yield module
    finally:
        for m, impl in compiled.items():
            m._compiled_call_impl = impl
