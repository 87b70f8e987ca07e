"""The low-memory profiles' optimizer: AdamW stepped one tensor at a time, with bf16 weights and inside backward.

Trainable weights kept in bf16 are updated through an fp32 view of one tensor at a time, written back with
stochastic rounding or Kahan compensation (so a 2e-6 step is not rounded away); each tensor's step can run
inside backward, so the full set of gradients never exists at once.
"""

from __future__ import annotations

import math
import weakref

import torch

from dreambooth.training import optim

# ------------------------------------------------------------------------------------------ bf16 write-back

def split_bf16_(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """Store fp32 `x` exactly as bf16 `hi` (rounded to nearest) plus int16 `lo`, the rounding residual in units
    of the fp32's last bit; `join_bf16(hi, lo)` gives `x` back bit for bit."""
    bits = x.detach().float().contiguous().view(torch.int32)
    hi_bits = (bits + 0x8000) & -65536  # round half up on the magnitude: the residual fits in int16
    lo.copy_(bits - hi_bits)
    hi.copy_(hi_bits.view(torch.float32))


def join_bf16(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The fp32 value that `split_bf16_` stored as (hi, lo)."""
    return (hi.float().view(torch.int32) + lo.to(torch.int32)).view(torch.float32)


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Write fp32 `x` into bf16 `out`, rounding up or down with probability by distance (unbiased).

    bf16 is the top 16 bits of an fp32; adding uniform noise to the low 16 bits before truncating them rounds
    up exactly with probability (low bits / 2^16). Works on the magnitude, so it is unbiased for either sign.
    """
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    out.copy_(((bits + noise) & -65536).view(torch.float32))  # low bits now zero: the cast is exact
    return out


# ------------------------------------------------------------------------------------------ optimizer

def _inner_optimizer(name: str, tensor: torch.Tensor, group: dict) -> torch.optim.Optimizer:
    return optim.adamw([tensor], name, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                       weight_decay=group["weight_decay"])


class ParamwiseOptimizer(torch.optim.Optimizer):
    """AdamW (torch or 8-bit) stepped one tensor at a time, optionally with bf16 weights and inside backward.

    bf16 weights: each step copies one tensor to fp32 (plus its Kahan compensation), runs the inner AdamW on that
    copy, and writes it back with stochastic rounding or Kahan compensation; only one fp32 tensor exists at a time.
    Fused backward: a post-accumulate-grad hook steps each tensor as soon as its gradient is complete and frees the
    gradient. The full gradient never exists, so clipping uses the previous step's global norm.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 inner: str = "adamw", rounding: str | None = None, seed: int = 0):
        if rounding not in (None, "kahan", "stochastic"):
            raise ValueError(f"unknown rounding {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._shadow, self._inner, self._comp = {}, {}, {}
        self._generators: dict[torch.device, torch.Generator] = {}
        for p in self._params:
            low = p.dtype != torch.float32
            if low and rounding is None:
                raise ValueError("half-precision weights need rounding='kahan' or 'stochastic'")
            # bf16 weights step through an fp32 stand-in whose data is swapped in only while it steps.
            target = torch.nn.Parameter(torch.empty(0, device=p.device), requires_grad=False) if low else p
            self._shadow[p] = target
            self._inner[p] = _inner_optimizer(inner, target, self._group_of[p])
            if low and rounding == "kahan":
                self._comp[p] = torch.zeros_like(p, dtype=torch.int16)
        self.fused = False
        self.backwards_per_step, self.max_grad_norm = 1, None
        self._counts = {}
        self._sq_norm = None                       # this step's summed squared gradient norm (device tensor)
        self._clip_coef = None                     # from the previous step's norm; None: no clipping yet
        self.last_grad_norm = float("nan")

    # -------------------------------------------------------------------------------- one tensor
    @torch.no_grad()
    def step_param(self, p: torch.nn.Parameter, grad: torch.Tensor | None = None,
                   found_inf: torch.Tensor | None = None) -> None:
        """Apply the update of `grad` (default `p.grad`) to `p` and free p's gradient. A `found_inf` of 1.0 (a device
        tensor) skips the update, without a host sync, where the inner AdamW is torch's fused one."""
        grad = p.grad if grad is None else grad
        if grad is None:
            return
        p.grad = None
        target = self._shadow[p]
        if target is not p:
            target.data = join_bf16(p, self._comp[p]) if p in self._comp else p.float()
        target.grad = grad.float()  # no copy for a gradient that is fp32 already (fp32 weights, or from _finish)
        del grad  # a bf16 gradient is freed before the step
        self._inner_step(p, found_inf)
        target.grad = None
        if target is not p:
            self._write_back(p, target.data)
            target.data = torch.empty(0, device=p.device)

    def _inner_step(self, p: torch.nn.Parameter, found_inf: torch.Tensor | None) -> None:
        """Step p's own AdamW with its group's current hyperparameters (the lr schedule changes the group's)."""
        inner, group = self._inner[p], self._group_of[p]
        ig = inner.param_groups[0]
        for key in ("lr", "betas", "eps", "weight_decay"):
            ig[key] = group[key]
        if self._skips_on_device(p):
            inner.found_inf = found_inf  # torch's fused kernel then leaves the weight and its state as they were
        inner.step()

    def _skips_on_device(self, p: torch.nn.Parameter) -> bool:
        """Whether p's AdamW can skip a bad gradient on the device (torch's fused kernel, given found_inf)."""
        inner = self._inner[p]
        return isinstance(inner, torch.optim.AdamW) and bool(inner.param_groups[0].get("fused"))

    def _write_back(self, p: torch.nn.Parameter, new: torch.Tensor) -> None:
        """Store the fp32 update `new` into bf16 `p` with the chosen rounding."""
        if p in self._comp:
            split_bf16_(p, self._comp[p], new)  # what rounding lost is kept and added back next step
        else:  # rounding "stochastic": "kahan" gave every half-precision weight a buffer in __init__
            stochastic_round_(p, new, self._generator(p.device))

    @torch.no_grad()
    def master_weight(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 value of `p` that training holds: with Kahan compensation, more exact than bf16 `p` itself."""
        return join_bf16(p, self._comp[p]) if p in self._comp else p.detach().float()

    @torch.no_grad()
    def export_master_weights_(self) -> None:
        """Make every weight its fp32 training value (Kahan compensation folded in); for export, not training on."""
        for p, comp in self._comp.items():
            p.data = join_bf16(p.data, comp.to(p.device))
            comp.zero_()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + 1_000_003)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        """Step every tensor that still holds a gradient; with fused backward, this closes the step."""
        loss = closure() if closure is not None else None
        if self.fused:
            self.close_step()
        else:
            for p in self._params:
                self.step_param(p)
        return loss

    # -------------------------------------------------------------------------------- fused backward
    def fuse_into_backward(self, backwards_per_step: int = 1, max_grad_norm: float | None = None) -> None:
        """Step each tensor in backward once its gradient has accumulated over `backwards_per_step` passes."""
        self.fused, self.backwards_per_step, self.max_grad_norm = True, backwards_per_step, max_grad_norm
        # The hooks reach the optimizer through a weak reference: a strong one would make a cycle through the
        # tensors' hook tables, which the garbage collector does not see, and the weights would never be freed.
        ref = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            optimizer = ref()
            if optimizer is not None:
                optimizer._hook(p)
        for p in self._params:
            p.register_post_accumulate_grad_hook(hook)

    def _hook(self, p: torch.Tensor) -> None:
        n = self._counts.get(p, 0) + 1
        self._counts[p] = n
        if n >= self.backwards_per_step:  # the last backward pass of this step has reached p
            self._finish(p)

    @torch.no_grad()
    def _finish(self, p: torch.Tensor) -> None:
        """Count p's gradient into the step's norm, clip it by the previous step's norm, step p, free it."""
        self._counts[p] = 0
        grad = p.grad.float()  # the one fp32 copy of a bf16 gradient (fp32 ones are used in place)
        sq = grad.square().sum()
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq
        # A non-finite gradient would be applied before the trainer could skip the step: zero it, and have torch's
        # fused AdamW skip p on the device (the step's norm stays non-finite, so the trainer counts the step bad).
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self._clip_coef is not None:
            grad.mul_(self._clip_coef.to(grad.device))
        # Only torch's fused AdamW takes the flag: the kernels that make it are spared for any other.
        self.step_param(p, grad, found_inf=(~sq.isfinite()).float() if self._skips_on_device(p) else None)

    def discard_step(self) -> None:
        """Drop what a fused step has gathered so far (gradients held for later passes, hook counts) without
        stepping anything: for a step given up before its last backward pass."""
        if self._sq_norm is not None:  # a tensor has been stepped already: its update cannot be taken back
            raise RuntimeError("discard_step after this step's updates began; call it before the last backward")
        for p in self._params:
            p.grad = None
        self._counts = {}

    @torch.no_grad()
    def close_step(self) -> float:
        """End a fused step: step any tensor whose hook did not fire, return the global gradient norm (before
        clipping) and keep its clip coefficient for the next step. Idempotent."""
        for p in self._params:
            if p.grad is not None:
                self._finish(p)
        self._counts = {}
        if self._sq_norm is not None:
            norm = self._sq_norm.sqrt()
            self.last_grad_norm = float(norm)
            if self.max_grad_norm is not None and math.isfinite(self.last_grad_norm):
                self._clip_coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            self._sq_norm = None
        return self.last_grad_norm

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """torch layout: {"state": {index: tensors}, "param_groups": [...]}; each index is one tensor."""
        state = {}
        for i, p in enumerate(self._params):
            inner = self._inner[p].state_dict()["state"].get(0, {})
            entry = dict(inner)
            if p in self._comp:
                entry["kahan_comp"] = self._comp[p]
            if entry:
                state[i] = entry
        index = {p: i for i, p in enumerate(self._params)}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        rounding = {str(d): g.get_state() for d, g in self._generators.items()}  # stochastic rounding's stream
        return {"state": state, "param_groups": groups, "rounding_generators": rounding,
                "fused": {"clip_coef": None if self._clip_coef is None else float(self._clip_coef)}}

    def load_state_dict(self, state_dict: dict) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for i, p in enumerate(self._params):
            entry = dict(state_dict["state"].get(i, {}))
            comp = entry.pop("kahan_comp", None)
            if comp is not None and p in self._comp:
                self._comp[p].copy_(comp)
            inner = self._inner[p]
            inner.load_state_dict({"state": {0: entry} if entry else {},
                                   "param_groups": inner.state_dict()["param_groups"]})
        coef = (state_dict.get("fused") or {}).get("clip_coef")
        self._clip_coef = None if coef is None else torch.tensor(coef)
        for device, state in (state_dict.get("rounding_generators") or {}).items():
            self._generator(torch.device(device)).set_state(state.cpu())
