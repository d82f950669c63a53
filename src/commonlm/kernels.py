"""The CPU fast paths, kept out of the model: which attention kernel runs, and a matrix-vector Linear.

The decoder states *what* it computes (`attention(q, k, v, ...)`, `nn.Linear`); this module picks *how*
on hardware where PyTorch's default is slow. Both paths compute what the default computes; fp32 and
CUDA always take the default, so fp32 numerics (and the Hugging Face parity tests) are untouched.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# CPU + bf16 + short contexts: plain matmul-mask-softmax-matmul attention. There SDPA's bf16 CPU kernel is
# slow (its backward at T=64 takes 2.5x the fp32 time) and the naive path beats it up to T~256.
MATH_ATTENTION_MAX_T = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = True, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) v for q [B, H, T, D], k [B, H, S, D] and v [B, H, S, Dv] (scale: 1/sqrt(D)
    unless given): SDPA, except on CPU in bf16 for short causal sequences, where the plain matmuls are faster."""
    T = q.shape[-2]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and causal and mask is None and dropout == 0.0 and (
            1 < T <= MATH_ATTENTION_MAX_T):
        return causal_math_attention(q, k, v, scale)
    # (a causal mask over one query is a no-op, so is_causal needs no test of T: exportable)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=scale)


def causal_math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for q [B, H, T, D], k [B, H, S, D], v [B, H, S, Dv], S >= T."""
    B, H, T, D = q.shape
    S, Dv = k.shape[-2], v.shape[-1]
    # an additive mask fused into the q k^T matmul (baddbmm): no masked_fill forward or backward
    mask = torch.full((T, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(S - T + 1)
    scores = torch.baddbmm(mask, q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2),
                           alpha=D**-0.5 if scale is None else scale)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, S, Dv)).view(B, H, T, Dv)


class MatVecLinear(nn.Linear):
    """nn.Linear with a matrix-vector path: decoding one token in bf16 on CPU goes through torch.mv, which
    reads the weights about 1.6x faster than addmm does for a single row here (bench/decode.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weights too: under bf16 autocast (training's evaluation) they stay fp32, which addmv refuses
        if x.numel() == self.in_features and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            v = x.reshape(-1)
            y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


def use_matvec(model: nn.Module) -> nn.Module:
    """Give every plain nn.Linear of `model` the matrix-vector path, in place (same parameters, tied ones
    stay tied). The decoding entry points (infer/) call it; it changes nothing but speed."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
    return model
