"""An exponential moving average (EMA) of the trained weights: fp32 shadow copies, moved toward the weights after
every optimizer step that was applied, saved in checkpoints and exported instead of the last step's weights."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch


def _fp32(p: torch.Tensor) -> torch.Tensor:
    return p.detach().float()


class EMA:
    """shadow <- decay_n * shadow + (1 - decay_n) * weight at the n-th update (n = 0, 1, ...).

    With `warmup`, decay_n = 0 for n = 0 and min(decay, (1 + n) / (10 + n)) after, as diffusers' EMAModel does by
    default (without its use_ema_warmup); without, decay_n = decay. `read(p)` gives a weight's fp32 value (the bf16
    profiles pass their optimizer's exact master weight); shadows live on `device` (None: each weight's own)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = True,
                 device: torch.device | str | None = None, read: Callable[[torch.Tensor], torch.Tensor] = _fp32):
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.decay, self.warmup, self.device, self.read = decay, warmup, device, read
        self.shadow: list[torch.Tensor] = []
        self.updates = 0
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the weights as they are now."""
        self.shadow = [self.read(p).to(self.device or p.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of update number `n` (0 for the first)."""
        if not self.warmup:
            return self.decay
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow toward its weight; call after each optimizer step that changed the weights."""
        weight = 1.0 - self.decay_at(self.updates)
        for shadow, p in zip(self.shadow, self.params):  # one fp32 copy of a weight at a time
            shadow.lerp_(self.read(p).to(shadow.device, torch.float32), weight)
        self.updates += 1

    # ------------------------------------------------------------------------------------------ using the average
    @torch.no_grad()
    def copy_to(self) -> None:
        """Make the weights the average, for export at the end of a run: fp32 weights in place; half-precision ones
        become fp32 (as the bf16 profiles' export does), so nothing of the average is rounded away."""
        for shadow, p in zip(self.shadow, self.params):
            if p.dtype == torch.float32:
                p.data.copy_(shadow)
            else:
                p.data = shadow.to(p.device, copy=True)

    @contextmanager
    def swapped(self):
        """The average in the weights (in their own dtype) for the body, then the raw weights back bit for bit. The
        raw copy waits where the shadows live, so an on-CPU average needs no second copy on the GPU."""
        with torch.no_grad():
            raw = [p.detach().to(self.device or p.device, copy=True) for p in self.params]
            for shadow, p in zip(self.shadow, self.params):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(raw, self.params):
                    p.copy_(saved)

    # ------------------------------------------------------------------------------------------ checkpoints
    def tensors(self) -> dict[str, torch.Tensor]:
        """The shadows by weight name, for a checkpoint's safetensors file."""
        return dict(zip(self.names, self.shadow))

    def state(self) -> dict:
        """The plain part of the average's state (state.json)."""
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore from a checkpoint's tensors and state; the names must be this run's."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise KeyError(f"EMA weights lack {missing[0]} and {len(missing) - 1} more")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(tensors[name])
        self.updates = int(state["updates"])
