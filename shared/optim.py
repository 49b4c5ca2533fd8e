"""Optimizer building blocks for the papers' `make_optimizer(model, config)`, and the schedule.

    decay_groups(model, wd)   weight decay on matrices, none on biases, LayerNorm gains, scalars
    adamw(groups, config)     AdamW with config.lr, (beta1, beta2) and eps, fused where it can be
    fused_for(model)          whether the model's device has a fused optimizer kernel
    learning_rate(step, cfg)  linear warmup, then cosine or linear decay to 0 at max_steps

A parameter group may carry "lr_scale": train.py sets its learning rate to learning_rate(step)
times that factor (UNITER's VQA head, VirTex's CNN).
"""

import math

import torch
from torch import nn


def fused_for(model: nn.Module) -> bool:
    """True on CUDA and the CPU, where torch (>= 2.4) has a fused AdamW / SGD kernel: one kernel
    updates every tensor. On the 2-core CPU it takes 0.30-0.33x the update time of torch's
    default single-tensor loop for the tiny models (RESULTS.md), with the same result up to float
    rounding (tested)."""
    return next(model.parameters()).device.type in ("cuda", "cpu")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear, Embedding, conv kernels), none on biases, LayerNorm gains
    and scalars such as CoCa's logit_scale."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], config, fused: bool, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `groups` at config.lr with betas (config.beta1, config.beta2) and eps (torch's
    default 1e-8 unless the paper's code sets another)."""
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=eps,
                             fused=fused)


def learning_rate(step: int, config) -> float:
    """Linear warmup to config.lr over warmup_steps, then cosine (or linear) decay to 0 at
    max_steps. `step` counts optimizer updates from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    progress = min(progress, 1.0)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - progress)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; use cosine or linear")
