"""AdamW with weight-decay groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from commonlm.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Decay matrices and embeddings; never norms or biases (1-D tensors). Fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # CUDA, and CPU since torch 2.4
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warmup, then cosine or warmup-stable-decay (WSD) down to lr * min_lr_ratio at the end.

    The end is max_steps, or with a time budget (train.max_time) whichever comes first: `time_fraction`
    is the share of max_time used so far, so a run limited by time still finishes its decay.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = max(1, cfg.max_steps - cfg.warmup_steps)
    done = min(1.0, max((step - cfg.warmup_steps) / total, time_fraction))
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * done))
    # wsd: hold the peak, then decay linearly over the last decay_fraction of the steps
    decay_start = 1.0 - cfg.decay_fraction
    if done < decay_start:
        return peak
    return peak + (floor - peak) * (done - decay_start) / cfg.decay_fraction
