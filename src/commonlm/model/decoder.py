"""The one decoder-only transformer. GPT-2, Llama and Qwen3 shapes are config switches of this file.

Switches (see `ModelConfig`): learned or rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU MLP,
multi-head or grouped-query attention, QK-norm, biases, tied embeddings. Attention runs through
`F.scaled_dot_product_attention`, which picks flash/memory-efficient kernels on GPU.

Layout choices that matter elsewhere:
- q, k and v come from one fused projection (`attn.qkv`), and SwiGLU's gate and up from one
  (`mlp.gate_up`): fewer, larger matmuls. `interop/hf.py` splits them into Hugging Face names.
- RoPE rotates the two halves of each head (`rotate_half`), as Hugging Face Llama/Qwen do, so weights
  move between the two without permuting.
- `make_mlp` is the seam for a mixture-of-experts MLP: a block only asks it for "the MLP".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from commonlm.config import ModelConfig
from commonlm.model.kv_cache import KVCache, SlotKVCache, StaticKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Hugging Face does), return in the input dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class Linear(nn.Linear):
    """nn.Linear with a matrix-vector path: decoding one token in bf16 on CPU goes through torch.mv, which
    reads the weights about 1.6x faster than addmm does for a single row here (bench/decode.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weights too: under bf16 autocast (training's evaluation) they stay fp32, which addmv refuses
        if x.numel() == self.in_features and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            v = x.reshape(-1)
            y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


class Rotary(nn.Module):
    """Precomputed cos/sin tables for rotary position embeddings (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        cos, sin = self._tables(max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.int64).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for explicit positions [B, T] (each sequence of a batch at its own offset)."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D] (shared positions) or [B, T, D] (per-sequence positions)."""
    half = x.shape[-1] // 2
    # rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2], exactly: the sign moves to the small table
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + swapped * sin


# CPU + bf16 + short contexts: plain matmul-mask-softmax-matmul attention. Here SDPA's bf16 CPU kernel is
# slow (its backward at T=64 takes 2.5x the fp32 time) and the naive path beats it up to T~256. fp32 and
# CUDA always take SDPA, so fp32 numerics (and the Hugging Face parity tests) are untouched.
MATH_ATTENTION_MAX_T = 256


def _cpu_bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def causal_math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q [B, H, T, D] and k, v [B, H, S, D], S >= T."""
    B, H, T, D = q.shape
    S = k.shape[-2]
    # an additive mask fused into the q k^T matmul (baddbmm): no masked_fill forward or backward
    mask = torch.full((T, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(S - T + 1)
    scores = torch.baddbmm(mask, q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2), alpha=D**-0.5)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, S, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.dim_head
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = Linear(config.d_model, qkv_out, bias=config.bias or config.qkv_bias)
        self.proj = Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        if rope is not None and self.q_norm is None:  # q and k lie side by side: rotate them in one go
            qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
            q, k = apply_rotary(qk, *rope).split([self.n_head, self.n_kv_head], dim=2)
        else:
            q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

        mask, causal = None, True
        if cache is not None:
            # the cache returns all keys so far and, when earlier keys exist, which ones each query sees
            k, v, mask = cache.update(self.layer, k, v)
            causal = mask is None and k.shape[2] == T  # (one new query over earlier keys: no mask at all)
        if self.n_kv_head != self.n_head:
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout if self.training else 0.0
        if _cpu_bf16(q) and causal and mask is None and 1 < T <= MATH_ATTENTION_MAX_T and dropout == 0.0:
            y = causal_math_attention(q, k, v)
        else:  # (a causal mask over one query is a no-op, so is_causal needs no test of T: exportable)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.proj = Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = Linear(config.d_model, 2 * config.ff_dim, bias=config.bias)
        self.proj = Linear(config.ff_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


MLPS = {"gelu": GeluMLP, "gelu_tanh": GeluMLP, "swiglu": SwiGLU}


def make_mlp(config: ModelConfig) -> nn.Module:
    """The MLP of one block. A mixture-of-experts MLP plugs in here."""
    return MLPS[config.mlp](config)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.pos_emb == "learned" else None
        self.rotary = (
            Rotary(config.dim_head, config.max_seq_len, config.rope_theta) if config.pos_emb == "rope" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(".proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T, V] (or [B, 1, V] with last_only), mean cross-entropy or None).

        With a `cache` (model/kv_cache.py), idx holds each sequence's next tokens, at the positions the
        cache says, and the cache is advanced.
        """
        B, T = idx.shape
        positions = cache.positions(T) if cache is not None else None  # [B, T] or None (0..T-1)
        if not isinstance(cache, StaticKVCache):  # (a static cache is never longer than max_seq_len)
            end = T if positions is None else int(positions.max()) + 1
            if end > self.config.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device) if positions is None else positions)
        x = self.drop(x)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(0, T) if positions is None else self.rotary.at(positions)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -- accounting ---------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul weights + attention scores (PaLM, App. B)."""
        c = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 12 * c.n_layer * c.n_head * c.dim_head * seq_len
        return 6 * matmul + attention

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
        kind: type[KVCache | SlotKVCache | StaticKVCache] = KVCache,
    ) -> KVCache | SlotKVCache | StaticKVCache:
        """A KV cache for this model: `KVCache` (shared positions), `SlotKVCache` (one position per
        sequence) or `StaticKVCache` (fixed shapes, for a compiled decode step)."""
        c = self.config
        max_len = max_len or c.max_seq_len
        if max_len > c.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds max_seq_len={c.max_seq_len}")
        weight = self.embed.weight
        return kind(
            n_layer=c.n_layer, batch_size=batch_size, n_kv_head=c.kv_heads, head_dim=c.dim_head,
            max_len=max_len, device=weight.device, dtype=dtype or weight.dtype,
        )
