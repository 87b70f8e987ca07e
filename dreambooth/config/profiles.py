"""Memory profiles: what each turns on, which one `auto` picks for a GPU, and the profile a run resolves to.

The low end's techniques (bf16 weights with compensated updates, the optimizer step fused into backward) live in
dreambooth/training/paramwise.py; this module only decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
PROFILE_KEYS = ("gradient_checkpointing", "mixed_precision", "prior_mode")  # config keys a profile may fill in


@dataclass(frozen=True)
class MemoryPlan:
    """A profile resolved for this run and machine."""
    profile: str
    requested: str
    master_weights: str = "fp32"
    rounding: str | None = None
    fused_backward: bool = False
    backwards_per_step: int = 1
    notes: tuple[str, ...] = ()

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
