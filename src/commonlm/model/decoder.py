"""The one decoder-only transformer. GPT-2, Llama and Qwen3 shapes are config switches of this file.

Switches (see `ModelConfig`): learned or rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU MLP,
multi-head or grouped-query attention, QK-norm, biases, tied embeddings, RoPE scaling (linear, dynamic NTK,
YaRN, Llama 3: `rope_frequencies`), sliding-window attention (`window_mask`). Attention runs through
`F.scaled_dot_product_attention`, which picks flash/memory-efficient kernels on GPU.

Layout choices that matter elsewhere:
- q, k and v come from one fused projection (`attn.qkv`), and SwiGLU's gate and up from one
  (`mlp.gate_up`): fewer, larger matmuls. `interop/hf.py` splits them into Hugging Face names.
- RoPE rotates the two halves of each head (`rotate_half`), as Hugging Face Llama/Qwen do, so weights
  move between the two without permuting.
- Seams: `make_attention` and `make_mlp` build a block's two halves (latent attention, mixture of
  experts plug in there); either may return `(output, {name: loss})`, and the decoder hands those
  auxiliary losses back beside the logits for the training objective to add. Attention declares what
  its KV cache holds per token (`cache_shape`), so `new_cache` makes the right one.
- The model knows no CPU kernels: `commonlm.kernels` picks the attention kernel, and inference gives
  the linears their matrix-vector path (`kernels.use_matvec`). The loss is not computed here either:
  `model.loss.lm_loss` is the one cross-entropy of training, evaluation and benchmarks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from commonlm.config import ModelConfig
from commonlm.kernels import attention
from commonlm.model.kv_cache import KVCache, SlotKVCache, StaticKVCache
from commonlm.model.moe import MoE


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


def rope_frequencies(config: ModelConfig, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] and the factor cos/sin are scaled by, for `config.rope_scaling`.

    Computed as transformers 5.24 computes them (modeling_rope_utils.py), in fp32 as it does, so imported
    models keep their logits. `seq_len` matters to dynamic NTK only: the largest position + 1 of a forward
    pass; beyond `rope_original_len` the base grows with it (below it, plain RoPE).
    """
    c, dim = config, config.rope_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (c.rope_theta**exponents)
    original = c.rope_original_len or c.max_seq_len
    if c.rope_scaling == "linear":
        return inv_freq / c.rope_factor, 1.0
    if c.rope_scaling == "dynamic":
        if seq_len <= original:
            return inv_freq, 1.0
        # (the length as a tensor, as transformers has it: the new base is computed in fp32)
        growth = (c.rope_factor * torch.tensor(seq_len) / original - (c.rope_factor - 1)) ** (dim / (dim - 2))
        return 1.0 / ((c.rope_theta * growth) ** exponents), 1.0
    if c.rope_scaling == "llama3":
        # long wavelengths (beyond original / low_freq_factor) are interpolated by the factor, short ones
        # (below original / high_freq_factor) kept, and those between blended linearly in original / wavelength
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = original / c.rope_low_freq_factor, original / c.rope_high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / c.rope_factor, inv_freq)
        blend = (original / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
        smoothed = (1 - blend) * scaled / c.rope_factor + blend * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if c.rope_scaling == "yarn":
        # dimensions that turn more than beta_fast times over the original context keep their frequency, those
        # under beta_slow times are interpolated, a linear ramp between; attention sharpens by the cos/sin factor
        def dimension_of(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(c.rope_theta))

        low, high = dimension_of(c.rope_beta_fast), dimension_of(c.rope_beta_slow)
        if c.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        powers = c.rope_theta ** (torch.arange(0, dim, 2).float() / dim)
        keep = 1 - ramp
        inv_freq = 1.0 / (c.rope_factor * powers) * (1 - keep) + 1.0 / powers * keep
        default_factor = 0.1 * math.log(c.rope_factor) + 1.0 if c.rope_factor > 1 else 1.0
        return inv_freq, c.rope_attention_factor or default_factor
    return inv_freq, 1.0


class Rotary(nn.Module):
    """Precomputed cos/sin tables for rotary position embeddings (non-persistent buffers), RoPE scaling applied.

    Dynamic NTK scaling depends on the sequence: a forward pass whose largest position reaches beyond
    `rope_original_len` rotates all its tokens with frequencies for that length, computed on the spot. With a KV
    cache, the keys already stored keep the rotation they were stored with, and each decoding step rotates its
    new tokens for its own length: what transformers does during generation. (Between separate calls,
    transformers also keeps the largest length it has seen until a call falls back below the original context;
    here each call depends on its own positions only.)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dynamic = config.rope_scaling == "dynamic"
        cos, sin = self._tables(config.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, length: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions 0..length-1, unscaled by dynamic NTK; or for `positions` (the largest + 1 is
        `length`) with dynamic NTK at that length."""
        inv_freq, scale = rope_frequencies(self.config, 0 if positions is None else length)
        if positions is None:
            positions = torch.arange(length, dtype=torch.int64)
        inv_freq = inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * scale, emb.sin() * scale

    def _beyond_original(self, length: int) -> bool:
        return self.dynamic and length > (self.config.rope_original_len or self.config.max_seq_len)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._beyond_original(start + length):
            cos, sin = self._tables(start + length, torch.arange(start, start + length, device=self.cos.device))
            return cos.to(self.cos.dtype), sin.to(self.sin.dtype)
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for explicit positions [B, T] (each sequence of a batch at its own offset)."""
        if self.dynamic and self._beyond_original(length := int(positions.max()) + 1):  # (a host sync: dynamic only)
            cos, sin = self._tables(length, positions)
            return cos.to(self.cos.dtype), sin.to(self.sin.dtype)
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D] (shared positions) or [B, T, D] (per-sequence positions)."""
    half = x.shape[-1] // 2
    # rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2], exactly: the sign moves to the small table
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + swapped * sin


def window_mask(mask: torch.Tensor | None, T: int, S: int, window: int, device: torch.device) -> torch.Tensor:
    """Which of S keys each of T queries sees with a sliding window: what it saw (`mask`, or causal when None)
    limited to its own key and the window - 1 before it (transformers: kv_idx > q_idx - window).

    The keys a query sees are one run of positions ending at its own, in the order they lie: for every cache
    (keys stored from position 0), packed rows (each sequence's keys in a run) and shared prefixes (the prefix,
    then the query's own continuation: model/kv_cache.SharedPrefix). So the window counts the keys a query sees,
    back from its own (the last it sees), and needs no positions; a cache keeps every key.
    """
    if mask is None:  # causal (T = S), or one query over all S keys: query t is key S - T + t
        keys = torch.arange(S, device=device)
        own = torch.arange(S - T, S, device=device)[:, None]
        return (keys <= own) & (keys > own - window)
    seen = mask.cumsum(-1)  # keys seen up to each key, that one included
    return mask & (seen > seen[..., -1:] - window)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.dim_head
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        # sliding-window attention on this layer (Qwen2 keeps its first full_attention_layers layers whole)
        self.window = config.sliding_window if layer >= config.full_attention_layers else 0

    @property
    def cache_shape(self) -> tuple[int, int]:
        """What a KV cache keeps of each token for this layer, for keys and for values alike: [heads, dim]. A
        variant may declare (heads, key dim, value dim) instead: latent attention (model/mla.py) keeps its latent
        and its shared rotary key."""
        return self.n_kv_head, self.head_dim

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
        if self.window and k.shape[2] > self.window:
            mask, causal = window_mask(mask, T, k.shape[2], self.window, k.device), False
        if self.n_kv_head != self.n_head:
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = attention(q, k, v, mask=mask, causal=causal, dropout=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ff_dim, bias=config.bias)
        self.proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


MLPS = {"gelu": GeluMLP, "gelu_tanh": GeluMLP, "swiglu": SwiGLU}


def make_mlp(config: ModelConfig, layer: int = 0) -> nn.Module:
    """The MLP of one block: dense, or a mixture of experts (model/moe.py) when config.n_experts > 0 (after the
    first config.dense_layers layers)."""
    if config.n_experts and layer >= config.dense_layers:
        return MoE(config)
    return MLPS[config.mlp](config)


def make_attention(config: ModelConfig, layer: int) -> nn.Module:
    """The attention of one block: latent attention (model/mla.py) when config.kv_lora_rank > 0. A variant
    takes (x, rope, cache), returns the output (or `(output, aux_losses)`), and declares `cache_shape`."""
    if config.kv_lora_rank:
        from commonlm.model.mla import LatentAttention  # (mla.py builds on this file's norm, rotary and masks)

        return LatentAttention(config, layer)
    return Attention(config, layer)


AuxLosses = dict[str, torch.Tensor]


def _with_aux(out: torch.Tensor | tuple[torch.Tensor, AuxLosses], aux: AuxLosses) -> torch.Tensor:
    """A half of a block returns its output, or (output, auxiliary losses): add those to `aux`."""
    if isinstance(out, tuple):
        out, extra = out
        for name, value in extra.items():
            aux[name] = aux[name] + value if name in aux else value
    return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = make_attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config, layer)

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None) -> tuple[torch.Tensor, AuxLosses]:
        aux: AuxLosses = {}
        x = x + _with_aux(self.attn(self.norm1(x), rope, cache), aux)
        return x + _with_aux(self.mlp(self.norm2(x)), aux), aux


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
            Rotary(config) if config.pos_emb == "rope" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def materialize(self, device: torch.device | str) -> Decoder:
        """Memory on `device` for a model built on the meta device (`with torch.device("meta"): Decoder(c)`),
        and its position tables. The weights are undefined until loaded or initialised (train/parallel.py):
        building on meta skips a random initialisation that loading would overwrite, and never holds the
        model in host memory on its way to a GPU."""
        self.to_empty(device=device)
        if self.config.tie_embeddings:  # to_empty gives each module its own new tensor: tie them again
            self.lm_head.weight = self.embed.weight
        if self.rotary is not None:
            cos, sin = self.rotary._tables(self.config.max_seq_len)
            self.rotary.cos.copy_(cos)
            self.rotary.sin.copy_(sin)
        return self

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
            elif isinstance(module, MoE):  # its stacked experts (and balancing bias)
                module.reset_parameters()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AuxLosses]:
        """idx [B, T] -> (logits [B, T, V] (or [B, 1, V] with last_only, [B, K, V] at the positions `keep`
        [B, K] gives: the head and its vocabulary-wide matmul run only there), auxiliary losses by name).

        The auxiliary losses are what blocks add to the training loss (a mixture-of-experts balance loss,
        say), summed over blocks; today's models have none. The language-model loss itself is
        `model.loss.lm_loss(logits, targets)`. With a `cache` (model/kv_cache.py), idx holds each
        sequence's next tokens, at the positions the cache says, and the cache is advanced; a cache checks
        its own room.
        """
        B, T = idx.shape
        positions = cache.positions(T) if cache is not None else None  # [B, T] or None (0..T-1)
        if cache is None and T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device) if positions is None else positions)
        x = self.drop(x)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(0, T) if positions is None else self.rotary.at(positions)
        aux: AuxLosses = {}
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                out = checkpoint(block, x, rope, cache, use_reentrant=False)
            else:
                out = block(x, rope, cache)
            x = _with_aux(out, aux)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        elif keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.norm(x)), aux

    # -- accounting ---------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) as PaLM counts them (App. B): 6 per matmul weight and
        the attention scores. Of the 6, 2 are the forward, 2 its input's gradient and 2 the weight's own
        gradient, which a frozen weight has not: a frozen matmul counts 4 (a fine-tuning run that freezes the
        base), and other trained matrices inside one (low-rank adapters) count 6. A matmul is an nn.Linear,
        or any leaf module with in_features and out_features (a quantized linear)."""
        c = self.config
        matmul = trained = 0
        inside: set[int] = set()
        for m in self.modules():
            if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and next(m.children(), None) is None):
                matmul += m.in_features * m.out_features
                weight = getattr(m, "weight", None)
                if isinstance(weight, nn.Parameter):
                    inside.add(id(weight))
                    trained += m.in_features * m.out_features if weight.requires_grad else 0
        tables = {id(self.embed.weight)} | ({id(self.pos_embed.weight)} if self.pos_embed is not None else set())
        adapters = sum(p.numel() for p in self.parameters()
                       if p.requires_grad and p.dim() == 2 and id(p) not in inside | tables)
        # a mixture of experts counts the experts each token runs, not all of them (active parameters)
        for m in self.modules():
            if hasattr(m, "active_params"):
                matmul += m.active_params
                trained += m.active_params if m.experts.down_proj.requires_grad else 0
        # q k^T and the weighted sum of values: 6 FLOPs per product each (latent attention: values of their own width)
        attention = 6 * c.n_layer * c.n_head * (c.dim_head + (c.v_head_dim if c.kv_lora_rank else c.dim_head)) * seq_len
        return 4 * matmul + 2 * trained + 6 * adapters + attention

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
        heads, dim, *value_dim = self.blocks[0].attn.cache_shape  # (heads, dim) or (heads, key dim, value dim)
        return kind(
            n_layer=c.n_layer, batch_size=batch_size, n_kv_head=heads, head_dim=dim,
            max_len=max_len, device=weight.device, dtype=dtype or weight.dtype,
            v_dim=value_dim[0] if value_dim else None,
        )
