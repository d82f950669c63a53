"""The optimizer (AdamW with weight-decay groups, or Muon with AdamW beside it), and the learning-rate schedules.

Muon (train.optimizer=muon) orthogonalises the momentum of each 2-D hidden weight (attention and MLP matrices) by
Newton-Schulz iterations: `torch.optim.Muon`, which takes 2-D tensors only. Embeddings, the head, norms and
biases stay on AdamW, as in modded-nanogpt and nanochat. Both follow the loop's learning rate: Muon's updates are
rescaled to AdamW's RMS (train.muon_adjust_lr=match_rms_adamw, 0.2 x sqrt(max(rows, columns)), Moonshot's
rule), so one lr serves both, times train.muon_lr_ratio (for adjust_lr=original, Keller Jordan's scaling,
whose lr is ~0.02 against AdamW's ~3e-4: a ratio of ~60). Fused q/k/v and gate/up weights are orthogonalised
as one matrix each.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commonlm.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Decay matrices and embeddings; never norms or biases (1-D tensors). Fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    hidden = _hidden_matrices(model) if cfg.optimizer == "muon" else set()
    adamw = _adamw([p for p in params if id(p) not in hidden], cfg)
    if not hidden:
        return adamw
    muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                            adjust_lr_fn=cfg.muon_adjust_lr)
    return MuonWithAdamW(muon, adamw, cfg.muon_lr_ratio)


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # CUDA, and CPU since torch 2.4
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def _hidden_matrices(model: torch.nn.Module) -> set[int]:
    """ids of the trainable 2-D weights inside the blocks: not the (input or output) embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embeddings.add(id(head.weight))
    return {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in embeddings}


class MuonWithAdamW:
    """Two optimizers stepped as one: what the loop and the checkpoints need of an optimizer (param_groups,
    step, zero_grad, state_dict, load_state_dict). It cannot skip a non-finite step on the device (Muon has no
    `found_inf`): `defaults` says so, and the loop drops such a step's gradients on the host instead."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, lr_ratio: float):
        self.muon, self.adamw, self.lr_ratio = muon, adamw, lr_ratio
        self.defaults: dict[str, Any] = {"fused": False}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Both optimizers' groups, whose lr the loop sets (asked anew: load_state_dict replaces them)."""
        return self.adamw.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self) -> None:
        lrs = [group["lr"] for group in self.muon.param_groups]
        for group in self.muon.param_groups:
            group["lr"] *= self.lr_ratio
        try:
            self.muon.step()
        finally:
            for group, lr in zip(self.muon.param_groups, lrs):
                group["lr"] = lr
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


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
