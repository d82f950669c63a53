"""The optimizer (AdamW with weight-decay groups, or Muon with AdamW beside it), and the learning-rate schedules.

Muon (train.optimizer=muon) orthogonalises the momentum of each 2-D hidden weight (attention and MLP matrices) by
Newton-Schulz iterations: `torch.optim.Muon`, which takes 2-D tensors only. Embeddings, the head, norms and
biases stay on AdamW, as in modded-nanogpt and nanochat. Both follow the loop's learning rate: Muon's updates are
rescaled to AdamW's RMS (train.muon_adjust_lr=match_rms_adamw, 0.2 x sqrt(max(rows, columns)), Moonshot's
rule), so one lr serves both, times train.muon_lr_ratio (for adjust_lr=original, Keller Jordan's scaling,
whose lr is ~0.02 against AdamW's ~3e-4: a ratio of ~60). Fused q/k/v and gate/up weights are orthogonalised
as one matrix each.

Under FSDP2 (train.parallel=fsdp|hsdp) a matrix is a DTensor whose rows are split over the ranks, and Newton-Schulz
needs it whole: `ShardedMuon` gathers each matrix's momentum update once, orthogonalises it as one process would,
and keeps this rank's rows (see its docstring for why that, and what it costs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from commonlm.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Decay matrices and embeddings; never norms or biases (1-D tensors). Fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    hidden = _hidden_matrices(model) if cfg.optimizer == "muon" else set()
    adamw = _adamw([p for p in params if id(p) not in hidden], cfg)
    if not hidden:
        return adamw
    matrices = [p for p in params if id(p) in hidden]
    kind = ShardedMuon if any(isinstance(p, DTensor) for p in matrices) else torch.optim.Muon
    muon = kind(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr)
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


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for matrices sharded by FSDP2 (DTensors split by rows over the ranks, or over a 2-D mesh's
    shard dimension). torch's own step runs Newton-Schulz on the DTensors as they are: that works, but every
    matmul of every iteration then gathers or reduces partial bf16 products, a rounding one process never does
    (the tall q/k/v and gate/up matrices' updates came out up to 9e-5 away from one process's at lr 3e-3 in
    tests/train/test_fsdp_muon.py; ~1% of the update in a 6x4 check), and costs collectives per iteration.
    Here each matrix's momentum update is gathered whole once (`full_tensor`), orthogonalised exactly as one
    process does it, and each rank keeps its own rows of the result; momentum, weight decay and the update
    itself stay on the shards, so the state (the momentum buffer, sharded like AdamW's moments) is saved and
    resharded by DCP like any other.

    Cost: one all-gather of each matrix per step (what FSDP gathers for a forward), and every rank runs
    Newton-Schulz on every whole matrix, world-size times the compute of handing whole matrices to ranks in
    turn; ~ns_steps x 6 d^3 FLOPs for a d x d matrix against 6 d^2 per token of forward and backward, i.e.
    5 d / (tokens per rank per step) of a step (a few percent for d=768 at 64k tokens), and simpler and exact."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                momentum = state["momentum_buffer"]
                momentum.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
                whole = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"],
                                                    group["ns_steps"], group["eps"])
                mesh = update.device_mesh
                mine = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
                mine = mine.redistribute(mesh, update.placements)  # (this rank's rows: no communication)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(mine, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


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

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The two, for torch.distributed.checkpoint (which takes a list of optimizers, not this wrapper)."""
        return self.muon, self.adamw

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
