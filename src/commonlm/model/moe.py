"""Mixture of experts: the MLP of a block as many small SwiGLU experts, each token running only a few.

Why: more parameters (knowledge) for the same compute per token. The shape is Qwen3-MoE's and DeepSeek-V3's:
fine-grained routed experts (`experts_per_token` of `n_experts`, each `expert_ff_dim` wide) plus optional shared
experts that every token runs (one SwiGLU of `n_shared_experts * expert_ff_dim`).

- Routing: a linear router scores the experts (softmax, or sigmoid as DeepSeek-V3), each token takes its top k,
  and their scores, renormalised to sum to 1 when `router_norm_topk`, weigh the experts' outputs.
- Balancing without an auxiliary loss (DeepSeek-V3): a per-expert bias, added to the scores for the choice only
  (never to the weights), moves `balance_rate` toward under-loaded experts once per training forward pass (per
  micro-batch, outside autograd), from the load of the forward pass before: so activation checkpointing, which
  recomputes a forward in backward, routes its recomputation as the forward went. The bias and the pending load are
  buffers: checkpoints carry them and resume exactly. An auxiliary loss (Switch Transformer's E * sum_e f_e P_e,
  weight `router_aux_loss`) is optional and goes back through the decoder's auxiliary-loss path.
- Dropless dispatch: the token copies are sorted by expert and each expert runs one matmul over its contiguous
  run: `torch._grouped_mm` (one kernel for all experts) where it takes the shapes, a loop over experts otherwise,
  never a loop over tokens. No capacity factor, so no token is dropped.
- Expert weights are stacked, [E, 2 * ff, d] (gate then up) and [E, d, ff], the layout of transformers'
  Qwen3-MoE experts, so `interop/hf.py` moves them without reshaping.
- The router's statistics of the last forward pass (load per expert, entropy) are kept in `stats` for logging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from commonlm.config import ModelConfig


class SharedExperts(nn.Module):
    """The experts every token runs, as one SwiGLU."""

    def __init__(self, d_model: int, ff_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * ff_dim, bias=False)
        self.proj = nn.Linear(ff_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Experts(nn.Module):
    """The routed experts' stacked weights, and the grouped matmul that runs each expert over its tokens."""

    def __init__(self, n_experts: int, d_model: int, ff_dim: int):
        super().__init__()
        # zeros until MoE.reset_parameters draws them, which the decoder calls: not at construction, so a model
        # built on the meta device and initialised there draws the same numbers as one built on the host
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * ff_dim, d_model))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, d_model, ff_dim))
        self.kernel = True  # the grouped kernel where it takes the operands (False: the loop, for comparison)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, d], sorted by expert, counts [E] of them per expert -> each row through its expert [N, d]."""
        gate, up = grouped_mm(x, self.gate_up_proj, counts, self.kernel).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, counts, self.kernel)


def _grouped_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands: it wants rows 16-byte aligned, and on CUDA bf16 on
    Hopper or newer; on CPU (torch 2.13) it runs fp32 and bf16."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    aligned = all(n * x.element_size() % 16 == 0 for n in weight.shape[1:])
    if x.device.type == "cuda":
        return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return aligned and x.device.type == "cpu"


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """Rows of x [N, in] in runs of counts[e], run e times weight[e] [out, in] transposed -> [N, out]. `kernel`:
    the grouped kernel where it takes the operands (False: the loop over experts, for comparison)."""
    weight = weight.to(x.dtype)  # (under autocast the activations are bf16, the weights fp32)
    if kernel and _grouped_kernel(x, weight):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    runs = x.split(counts.tolist())
    return torch.cat([run @ weight[e].t() for e, run in enumerate(runs)])


class MoE(nn.Module):
    """Routed (and shared) SwiGLU experts in place of a block's MLP: x [B, T, d] -> (y, auxiliary losses)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k, self.score = c.n_experts, c.experts_per_token, c.router_score
        self.norm_topk, self.balance_rate, self.aux_weight = c.router_norm_topk, c.balance_rate, c.router_aux_loss
        ff = c.moe_ff_dim
        self.router = nn.Linear(c.d_model, c.n_experts, bias=False)
        self.experts = Experts(c.n_experts, c.d_model, ff)
        self.shared = SharedExperts(c.d_model, c.n_shared_experts * ff) if c.n_shared_experts else None
        if self.balance_rate > 0:  # (only then: a model without it has exactly Qwen3-MoE's tensors)
            self.register_buffer("balance_bias", torch.zeros(c.n_experts))
            self.register_buffer("balance_load", torch.zeros(c.n_experts))  # the last training forward's load
        # matmul weights each token runs through the routed experts (for flops_per_token: active parameters only)
        self.active_params = self.top_k * 3 * c.d_model * ff
        self.stats: dict[str, torch.Tensor] = {}
        self.std, self.n_layer = c.init_std, c.n_layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The experts as the decoder initialises a dense MLP: Normal(0, init_std), the output projection scaled
        by 1/sqrt(2 * n_layer); the balancing bias zero. (The router and shared experts are nn.Linear: the
        decoder initialises those.)"""
        nn.init.normal_(self.experts.gate_up_proj, std=self.std)
        nn.init.normal_(self.experts.down_proj, std=self.std / (2 * self.n_layer) ** 0.5)
        if self.balance_rate > 0:
            self.balance_bias.zero_()
            self.balance_load.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (chosen experts [N, k], their weights [N, k], every expert's score [N, E]), in fp32."""
        logits = self.router(x).float()
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.balance_bias if self.balance_rate > 0 else scores
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return chosen, weights, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        recomputing = torch._C._current_graph_task_id() != -1  # (activation checkpointing re-runs it in backward)
        balancing = self.training and self.balance_rate > 0 and not recomputing
        if balancing:
            self._balance()
        chosen, weights, scores = self.route(x)
        # dispatch: the N * k token copies sorted by expert, one run per expert
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.n_experts)
        out = self.experts(x[token], counts) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out)
        if self.shared is not None:
            y = y + self.shared(x)
        load = counts.float() / flat.numel()  # the fraction of token copies each expert ran
        if self.training and dist.is_initialized():  # the bias follows the load of all ranks, so they agree
            load = load.clone()
            dist.all_reduce(load)
            load /= dist.get_world_size()
        self._observe(load, scores)
        if balancing:
            self.balance_load.copy_(load)
        aux = {}
        if self.aux_weight > 0 and self.training:
            probs = scores / scores.sum(-1, keepdim=True)  # (sigmoid scores made a distribution per token)
            aux["router_aux_loss"] = self.aux_weight * self.n_experts * (load * probs.mean(0)).sum()
        return y.reshape(shape), aux

    @torch.no_grad()
    def _observe(self, load: torch.Tensor, scores: torch.Tensor) -> None:
        """Keep the router's statistics of this forward pass."""
        probs = scores / scores.sum(-1, keepdim=True)
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        self.stats = {"load": load, "entropy": entropy, "dropped": torch.zeros((), device=load.device)}

    @torch.no_grad()
    def _balance(self) -> None:
        """Move the bias a step toward the experts the last training forward under-loaded (none before the first)."""
        seen = (self.balance_load.sum() > 0).float()  # (a tensor, not a host sync)
        self.balance_bias += seen * self.balance_rate * torch.sign(1 / self.n_experts - self.balance_load)
