"""Multi-head latent attention (DeepSeek-V2/V3): keys and values of every head from one small latent per token.

Why: the KV cache. Multi-head attention caches every head's key and value for every token and layer; latent attention
caches one compressed vector (`kv_lora_rank` numbers, after its RMSNorm) and one rotary key shared by all heads
(`qk_rope_head_dim`), and up-projects them to each head's keys and values when it attends. DeepSeek-V3 keeps
512 + 64 numbers per token and layer where its 128 heads as multi-head attention would keep 2 * 128 * 192.

Rotary positions cannot pass through the latent (the up-projection would have to commute with the rotation), so a
head's query and key have two parts: `qk_nope_head_dim` dimensions without positions, the key's from the latent, and
`qk_rope_head_dim` rotated ones, the query's per head and the key's one for all heads ("decoupled RoPE").

- Training and prefill up-project the latent (the one just computed, or all a cache holds) to every head's keys and
  values, and attention is the decoder's one `attention()`.
- Decoding one token at a time absorbs the up-projections instead (DeepSeek-V2, section 2.1.3): each head's query is
  taken into the latent's space through its key up-projection, attends over the cached latents and rotary keys as one
  key-value head (the cache entry itself, no per-head keys or values made), and its output leaves the latent's
  space through its value up-projection. Per step and layer that reads the cache once instead of up-projecting all of
  it (`absorb = False` turns it off, for comparison; a linear that is not a plain one, quantized or packed, is never
  absorbed).
- The rotary part rotates in halves (`apply_rotary`), as everywhere in this decoder. DeepSeek's own checkpoints rotate
  interleaved pairs; `interop/hf.py` permutes the rows of the projections that make them, once, on import.
- The layout is transformers' DeepseekV3Attention's (q or q_a + norm + q_b, kv_a with the rotary key, its norm, kv_b,
  proj), so `interop/hf.py` names the weights one to one. The latents' norms use eps 1e-6, as DeepSeek's do.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from commonlm.config import ModelConfig
from commonlm.kernels import MatVecLinear, attention
from commonlm.model.decoder import RMSNorm, apply_rotary, window_mask
from commonlm.model.kv_cache import KVCache

ABSORBABLE = (nn.Linear, MatVecLinear)  # linears whose weight is the plain matrix (not quantized, packed or adapted)
LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm and kv_a_layernorm keep RMSNorm's default, whatever rms_norm_eps is


class LatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.n_head, self.rank = layer, c.n_head, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        if c.q_lora_rank:  # queries through a latent of their own (not cached: it saves weights, not cache)
            self.q_a = nn.Linear(c.d_model, c.q_lora_rank, bias=c.bias)
            self.q_a_norm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b = nn.Linear(c.q_lora_rank, self.n_head * self.qk_dim, bias=False)
        else:
            self.q = nn.Linear(c.d_model, self.n_head * self.qk_dim, bias=False)
        self.kv_a = nn.Linear(c.d_model, self.rank + self.rope_dim, bias=c.bias)  # the latent and the rotary key
        self.kv_norm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b = nn.Linear(self.rank, self.n_head * (self.nope_dim + self.v_dim), bias=False)
        self.proj = nn.Linear(self.n_head * self.v_dim, c.d_model, bias=c.bias)
        self.dropout = c.dropout
        self.window = c.sliding_window if layer >= c.full_attention_layers else 0
        # the softmax scale over SDPA's 1/sqrt(qk_dim): yarn's mscale squared (DeepSeek), 1 otherwise
        mscale = 0.1 * c.rope_mscale_all_dim * math.log(c.rope_factor) + 1.0 if c.rope_factor > 1 else 1.0
        self.q_scale = mscale**2 if c.rope_mscale_all_dim else 1.0
        self.softmax_scale = self.q_scale / math.sqrt(self.qk_dim)
        self.absorb = True  # one-token steps through the latent (False: up-project the whole cache, for comparison)

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """Per token: one "head" of the normalised latent and the shared rotary key side by side, where keys go (what
        absorbed decoding attends over as it lies); values take nothing."""
        return 1, self.rank + self.rope_dim, 0

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_b(self.q_a_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q(x)
        return q.view(*x.shape[:2], self.n_head, self.qk_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rotary(q_rope, *rope)  # [B, T, H, rope_dim]
        latent, k_rope = self.kv_a(x).split([self.rank, self.rope_dim], dim=-1)
        k_rope = apply_rotary(k_rope[:, :, None], *rope)[:, :, 0]  # [B, T, rope_dim]
        entry = torch.cat([self.kv_norm(latent), k_rope], dim=-1)[:, None]  # [B, 1, T, rank + rope_dim]

        mask, causal = None, True
        if cache is not None:  # the cache keeps the entries and returns all of them so far
            entry, _, mask = cache.update(self.layer, entry, entry[..., :0])
            causal = mask is None and entry.shape[2] == T
        S = entry.shape[2]
        if self.window and S > self.window:
            mask, causal = window_mask(mask, T, S, self.window, entry.device), False
        if T == 1 and self.absorb and type(self.kv_b) in ABSORBABLE:
            y = self._absorbed(q_nope[:, 0], q_rope[:, 0], entry, mask)  # [B, H, v_dim]
            return self.proj(y.reshape(B, T, self.n_head * self.v_dim))
        latent, k_rope = entry.split([self.rank, self.rope_dim], dim=-1)
        kv = self.kv_b(latent[:, 0]).view(B, S, self.n_head, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, self.n_head, S, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, qk_dim]
        y = attention(q, k, v, mask=mask, causal=causal, dropout=self.dropout if self.training else 0.0,
                      scale=self.softmax_scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entry: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row, [B, H, nope_dim] and [B, H, rope_dim], over the cache's entries [B, 1, S, rank + rope]:
        q_nope . (W_uk latent) = (W_uk^T q_nope) . latent, so each head's query moves into the latent's space and
        the heads attend as the query rows of one key-value head; the output (a mix of latents) then goes through
        each head's value up-projection. -> [B, H, v_dim]"""
        weight = self.kv_b.weight.view(self.n_head, self.nope_dim + self.v_dim, self.rank)
        w_k, w_v = weight.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope_dim, rank], [H, v_dim, rank]
        q = torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_k.to(q_nope.dtype)), q_rope], dim=-1)
        out = attention(q[:, None], entry, entry[..., : self.rank], mask=mask, causal=False,
                        dropout=self.dropout if self.training else 0.0, scale=self.softmax_scale)  # [B, 1, H, rank]
        return torch.einsum("bhr,hvr->bhv", out[:, 0], w_v.to(out.dtype))
