"""Optimiser and learning-rate schedule from the config (per-epoch schedules with linear warm-up)."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from diffmed.config import OptimConfig


def lr_factor(epoch: int, cfg: OptimConfig, max_epochs: int) -> float:
    """Multiplier of the base lr at ``epoch``: warm-up, then constant, cosine or step decay."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "cosine":
        span = max(1, max_epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= round(m * max_epochs) for m in cfg.milestones)
    return 1.0


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, max_epochs: int) -> dict:
    params = list(params)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, cfg, max_epochs))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
