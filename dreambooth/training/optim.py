"""The run's optimizer: AdamW (adamw.py) with JumpStart's hyperparameters, or the per-tensor ParamwiseOptimizer
that the low-memory profiles ask for."""

from __future__ import annotations

import logging

import torch

from dreambooth.config.plan import RunPlan
from dreambooth.training.adamw import adamw, param_tensors
from dreambooth.training.paramwise import ParamwiseOptimizer

log = logging.getLogger(__name__)


def make_optimizer(params, plan: RunPlan) -> torch.optim.Optimizer:
    """AdamW with JumpStart's hyperparameters: bitsandbytes 8-bit, or torch's (fused).

    A memory plan with bf16 weights or a fused backward gets the per-tensor ParamwiseOptimizer (paramwise.py)."""
    cfg = plan.config
    hparams = dict(lr=plan.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if plan.memory.paramwise:
        return paramwise_optimizer(params, plan, hparams)
    return adamw(params, plan.optimizer, **hparams)


def paramwise_optimizer(params, plan: RunPlan, hparams: dict) -> ParamwiseOptimizer:
    """The ParamwiseOptimizer a memory plan asks for, with the AdamW hyperparameters make_optimizer chose."""
    memory, inner = plan.memory, plan.optimizer
    params = list(params)
    on_cuda = any(t.is_cuda for t in param_tensors(params))
    if memory.master_weights == "bf16" and inner != "adamw8bit" and on_cuda:
        log.warning("memory_profile %s expects 8-bit AdamW states (pip install bitsandbytes, optimizer: auto); "
                    "fp32 states take 8 bytes per weight, about 5 GB more on SD 2.1", memory.profile)
    opt = ParamwiseOptimizer(params, **hparams, inner=inner, rounding=memory.rounding, seed=plan.config.seed)
    if memory.fused_backward:
        opt.fuse_into_backward(memory.backwards_per_step, plan.config.max_grad_norm)
    return opt
