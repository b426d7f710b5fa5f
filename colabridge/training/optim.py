"""Optimizer and learning-rate schedule shared by the training scripts: AdamW with linear warmup, then
cosine decay to ``min_lr_ratio·lr`` (or a constant LR)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio·lr`` (or constant).

    Attributes:
        lr: peak learning rate, reached after ``warmup_steps``.
        weight_decay: AdamW decoupled weight decay (a parameter group may set its own).
        betas: AdamW moment coefficients.
        warmup_steps: optimizer steps of the linear warmup from ``lr/warmup_steps`` to ``lr``.
        schedule: ``"cosine"`` (decay over the run's remaining steps) or ``"constant"``.
        min_lr_ratio: the cosine's floor as a fraction of ``lr``.
        grad_clip: max global gradient norm (0 = no clipping).
    """

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base LR at optimizer step ``s``: linear warmup, then cosine or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(params, cfg: OptimConfig, max_steps: int):
    """``(AdamW, LambdaLR)`` over ``params`` (tensors, or groups whose own ``weight_decay`` wins) with
    the :func:`lr_lambda` schedule over ``max_steps`` optimizer steps; step the scheduler once per
    optimizer step."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on matrices only (``ndim ≥ 2``); biases and norm gains undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
