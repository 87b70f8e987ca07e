"""AdamW as our runs use it: torch's, fused where it can be, or bitsandbytes' 8-bit without its per-tensor waits."""

from __future__ import annotations

import functools

import torch


def adamw8bit(params, **hparams) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW without the device synchronisation it makes after each tensor's update."""
    return _adamw8bit_class()(params, **hparams)


@functools.cache
def _adamw8bit_class() -> type:
    """The class, made once (the low profiles build one optimizer per tensor)."""
    import bitsandbytes as bnb
    from bitsandbytes.optim import optimizer as bnb_optimizer

    class AdamW8bit(bnb.optim.AdamW8bit):
        # bitsandbytes waits for the GPU after every tensor (686 times a step for SD 2.1's UNet, and inside
        # backward in the fused profiles). Its kernels run on torch's current stream, so without paged states,
        # which we never use, stream order already makes the waits unnecessary. A bitsandbytes without the
        # module-level sync_gpu keeps its own step.
        def step(self, closure=None):
            if self.is_paged or not hasattr(bnb_optimizer, "sync_gpu"):
                return super().step(closure)
            sync, bnb_optimizer.sync_gpu = bnb_optimizer.sync_gpu, _no_sync
            try:
                return super().step(closure)
            finally:
                bnb_optimizer.sync_gpu = sync
    return AdamW8bit


def _no_sync(tensor: torch.Tensor) -> None:
    return None


def param_tensors(params: list) -> list[torch.Tensor]:
    """The tensors of an optimizer's `params` argument: a list of tensors, of param-group dicts, or both."""
    return [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]


def adamw(params, name: str, **hparams) -> torch.optim.Optimizer:
    """8-bit AdamW (name adamw8bit, bitsandbytes), or torch's AdamW, fused when every tensor is on CUDA or CPU."""
    params = list(params)
    if name == "adamw8bit":
        return adamw8bit(params, **hparams)
    tensors = param_tensors(params)
    # One kernel for all tensors instead of ~15 ops per tensor: on CPU too (SD 2.1/4's step 77 -> 30 ms).
    fused = bool(tensors) and all(t.device.type in ("cuda", "cpu") for t in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **hparams)
