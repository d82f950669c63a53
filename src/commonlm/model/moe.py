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

import math

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
        self.groups, self.top_groups, self.scale = c.expert_groups, c.groups_per_token, c.router_scale
        self.biased = c.router_bias or c.balance_rate > 0
        if self.biased:  # (only then: a model without it has exactly Qwen3-MoE's tensors; DeepSeek-V3's has it)
            self.register_buffer("balance_bias", torch.zeros(c.n_experts))
        if self.balance_rate > 0:
            self.register_buffer("balance_load", torch.zeros(c.n_experts))  # the last training forward's load
        # matmul weights each token runs through the routed experts (for flops_per_token: active parameters only)
        self.active_params = self.top_k * 3 * c.d_model * ff
        self.stats: dict[str, torch.Tensor | int] = {}
        self.std, self.n_layer = c.init_std, c.n_layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The experts as the decoder initialises a dense MLP: Normal(0, init_std), the output projection scaled
        by 1/sqrt(2 * n_layer); the balancing bias zero. (The router and shared experts are nn.Linear: the
        decoder initialises those.)"""
        nn.init.normal_(self.experts.gate_up_proj, std=self.std)
        nn.init.normal_(self.experts.down_proj, std=self.std / (2 * self.n_layer) ** 0.5)
        if self.biased:
            self.balance_bias.zero_()
        if self.balance_rate > 0:
            self.balance_load.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (chosen experts [N, k], their weights [N, k], every expert's score [N, E]), in fp32."""
        logits = self.router(x).float()
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.balance_bias if self.biased else scores
        if self.groups > 1:
            choice = self._best_groups(choice)
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.scale != 1.0:
            weights = weights * self.scale
        return chosen, weights, scores

    def _best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3): each token keeps the experts of its `top_groups` best groups, a group
        scored by the sum of its two best experts' choice scores, and the others' scores become -inf."""
        grouped = choice.unflatten(-1, (self.groups, -1))  # [N, groups, experts per group]
        best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.top_groups, dim=-1).indices  # [N, top_groups]
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(-1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)

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
        ranks = dist.get_world_size() if self.training and dist.is_initialized() else 1
        if ranks > 1:  # the bias follows the load of all ranks, so they agree
            load = load.clone()
            dist.all_reduce(load)
            load /= ranks
        self._observe(load, scores, ranks)
        if balancing:
            self.balance_load.copy_(load)
        aux = {}
        if self.aux_weight > 0 and self.training:
            probs = _distribution(scores)
            aux["router_aux_loss"] = self.aux_weight * self.n_experts * (load * probs.mean(0)).sum()
        return y.reshape(shape), aux

    @torch.no_grad()
    def _observe(self, load: torch.Tensor, scores: torch.Tensor, ranks: int) -> None:
        """Keep what `router_metrics` reads of this forward pass (computed there, at log steps only); `ranks`: the
        processes whose tokens `load` counts (their scores are each rank's own)."""
        self.stats = {"load": load, "scores": scores.detach(), "dropped": torch.zeros((), device=load.device),
                      "ranks": ranks}

    @torch.no_grad()
    def _balance(self) -> None:
        """Move the bias a step toward the experts the last training forward under-loaded (none before the first)."""
        seen = (self.balance_load.sum() > 0).float()  # (a tensor, not a host sync)
        self.balance_bias += seen * self.balance_rate * torch.sign(1 / self.n_experts - self.balance_load)


def _distribution(scores: torch.Tensor) -> torch.Tensor:
    """Each token's router scores made a distribution over the experts (softmax scores already are; sigmoid ones
    are normalised)."""
    return scores / scores.sum(-1, keepdim=True)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of each one's entropy (nats)."""
    return -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()


def router_metrics(model: nn.Module) -> dict[str, float]:
    """What the routers did in the model's last forward pass, for the training log (one host sync, at log steps):

    - `moe_balance`: the most loaded expert's share of the token copies over the mean share (max / mean load; 1 is
      even, n_experts is every token on one expert), the mean over layers, `moe_balance_max` the worst layer and
      `moe_balance_layer{i}` each MoE layer (numbered from 0 in model order);
    - `moe_router_entropy`: the entropy of each token's router distribution over the experts, divided by
      log(n_experts) (1: undecided, 0: one expert takes all the weight), the mean over tokens and layers;
    - `moe_over_capacity`: the token copies a capacity factor of 1.0 (each expert at most tokens * k / n_experts
      copies) would have dropped, summed over layers, and `moe_over_capacity_frac` that over all copies. The
      dispatch is dropless, so nothing was dropped: this says how far from an even split the routing was;
    - `moe_bias_spread`: the largest max - min of a layer's balancing bias (where it has one).
    Empty for a model without MoE layers or before its first forward pass. After a training forward under DDP or
    FSDP every metric is all ranks' (entropy and copies are summed over them here: a collective, so every rank calls
    this at the same steps, as the trainer's log steps are)."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.stats]
    if not layers:
        return {}
    balance = torch.stack([m.stats["load"].max() * m.n_experts for m in layers])
    entropy = torch.stack([_entropy(_distribution(m.stats["scores"])) / math.log(m.n_experts) if m.n_experts > 1
                           else torch.zeros((), device=m.stats["load"].device) for m in layers])
    tokens = torch.tensor([float(m.stats["scores"].shape[0]) for m in layers], device=entropy.device)
    if layers[0].stats["ranks"] > 1:  # all ranks' tokens: sums of entropy and of tokens, then the mean
        sums = torch.cat([entropy * tokens, tokens])
        dist.all_reduce(sums)
        entropy, tokens = sums[:len(layers)] / sums[len(layers):], sums[len(layers):]
    copies = tokens * torch.tensor([float(m.top_k) for m in layers], device=tokens.device)
    over = torch.stack([(m.stats["load"] - 1 / m.n_experts).clamp_min(0).sum() for m in layers]) * copies
    spread = [m.balance_bias.max() - m.balance_bias.min() for m in layers if hasattr(m, "balance_bias")]
    values = torch.cat([balance, entropy, over, copies, torch.stack(spread) if spread else over.new_zeros(0)])
    values = values.float().tolist()  # (the one sync)
    n = len(layers)
    balance, entropy, over, copies, spread = (values[:n], values[n:2 * n], values[2 * n:3 * n], values[3 * n:4 * n],
                                              values[4 * n:])
    metrics = {"moe_balance": sum(balance) / n, "moe_balance_max": max(balance),
               "moe_router_entropy": sum(entropy) / n, "moe_over_capacity": round(sum(over)),
               "moe_over_capacity_frac": sum(over) / sum(copies)}
    if spread:
        metrics["moe_bias_spread"] = max(spread)
    metrics |= {f"moe_balance_layer{i}": b for i, b in enumerate(balance)}
    return metrics
