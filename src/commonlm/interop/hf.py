"""Our decoder <-> Hugging Face transformers: `config.json` and weight names.

A model directory stores weights under the names of the matching transformers class, so
`AutoModelForCausalLM.from_pretrained(dir)` loads it unchanged. The families:

- gpt2:    GPT2LMHeadModel    (learned positions, LayerNorm, GELU, biases, Conv1D = transposed weights)
- llama:   LlamaForCausalLM   (RoPE, RMSNorm, SwiGLU, GQA; optional biases everywhere)
- mistral: MistralForCausalLM (as llama, no biases)
- qwen2:   Qwen2ForCausalLM   (as llama, biases on q/k/v only)
- qwen3:   Qwen3ForCausalLM   (as llama, no biases, RMS QK-norm per head)

A configuration that no class represents exactly is saved with our own names ("native") and a
config.json that says so; `hf_incompatibility` explains why.
"""

from __future__ import annotations

from typing import Any

import torch

from commonlm.config import ModelConfig

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# our block-relative module name -> GPT-2's
GPT2_BLOCK_NAMES = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                    "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def hf_incompatibility(c: ModelConfig) -> str | None:
    """None if `c` maps exactly onto its family's transformers class, else the reason it does not."""
    want: dict[str, Any]
    if c.family == "gpt2":
        want = {"pos_emb": "learned", "norm": "layernorm", "bias": True, "qk_norm": False}
        if c.mlp not in ("gelu", "gelu_tanh"):
            return f"gpt2 needs model.mlp gelu or gelu_tanh, not {c.mlp}"
        if c.kv_heads != c.n_head or c.dim_head * c.n_head != c.d_model:
            return "gpt2 needs plain multi-head attention with head_dim = d_model / n_head"
    else:
        rotary = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
        want = {
            "llama": {**rotary, "qk_norm": False, "qkv_bias": False},
            "mistral": {**rotary, "qk_norm": False, "qkv_bias": False, "bias": False},
            "qwen2": {**rotary, "qk_norm": False, "qkv_bias": True, "bias": False},
            "qwen3": {**rotary, "qk_norm": True, "qkv_bias": False, "bias": False},
        }[c.family]
    for key, value in want.items():
        if getattr(c, key) != value:
            return f"{c.family} needs model.{key}={value}, this model has {getattr(c, key)}"
    return None


def hf_config(c: ModelConfig, eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    """The config.json of the matching transformers class (or of our native format)."""
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "eos_token_id": eos_id,
              "bos_token_id": None, "pad_token_id": pad_id, "dtype": "float32", "initializer_range": c.init_std}
    reason = hf_incompatibility(c)
    if reason is not None:
        return {"architectures": ["CommonLMForCausalLM"], "model_type": "commonlm",
                "commonlm_note": f"native CommonLM weights; not loadable by transformers ({reason})", **common}
    if c.family == "gpt2":
        return {
            "architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2", **common,
            "n_positions": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_inner": c.ff_dim, "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout, "scale_attn_weights": True,
        }
    out = {
        "architectures": [ARCHITECTURES[c.family]], "model_type": c.family, **common,
        "hidden_size": c.d_model, "intermediate_size": c.ff_dim, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.dim_head,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias, "attention_dropout": c.dropout,
    }
    if c.family == "llama":
        out["mlp_bias"] = c.bias
    elif c.family == "mistral":
        out["sliding_window"] = None
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    return out


def _parts(c: ModelConfig) -> list[int]:
    return [c.n_head * c.dim_head, c.kv_heads * c.dim_head, c.kv_heads * c.dim_head]


def to_hf(c: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers names (a fresh dict of contiguous tensors)."""
    if hf_incompatibility(c) is not None:
        out = dict(state)
        if c.tie_embeddings:
            out.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in out.items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(c.n_layer):
        ours = f"blocks.{i}."
        if c.family == "gpt2":
            hf = f"transformer.h.{i}."
            for a, b in GPT2_BLOCK_NAMES.items():
                w = state[ours + a + ".weight"]
                out[hf + b + ".weight"] = w if a.startswith("norm") else w.t()  # Conv1D holds [in, out]
                out[hf + b + ".bias"] = state[ours + a + ".bias"]
            continue
        hf = f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = state[ours + "norm1.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "norm2.weight"]
        for suffix in ("weight", "bias") if c.bias or c.qkv_bias else ("weight",):
            q, k, v = state[ours + f"attn.qkv.{suffix}"].split(_parts(c), dim=0)
            out[hf + f"self_attn.q_proj.{suffix}"] = q
            out[hf + f"self_attn.k_proj.{suffix}"] = k
            out[hf + f"self_attn.v_proj.{suffix}"] = v
        for suffix in ("weight", "bias") if c.bias else ("weight",):
            out[hf + f"self_attn.o_proj.{suffix}"] = state[ours + f"attn.proj.{suffix}"]
            gate, up = state[ours + f"mlp.gate_up.{suffix}"].chunk(2, dim=0)
            out[hf + f"mlp.gate_proj.{suffix}"] = gate
            out[hf + f"mlp.up_proj.{suffix}"] = up
            out[hf + f"mlp.down_proj.{suffix}"] = state[ours + f"mlp.proj.{suffix}"]
        if c.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            out[hf + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
    if c.family == "gpt2":
        out["transformer.wte.weight"] = state["embed.weight"]
        out["transformer.wpe.weight"] = state["pos_embed.weight"]
        out["transformer.ln_f.weight"] = state["norm.weight"]
        out["transformer.ln_f.bias"] = state["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = state["embed.weight"]
        out["model.norm.weight"] = state["norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(c: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names -> our state dict (the inverse of `to_hf`). Missing names raise KeyError."""
    if hf_incompatibility(c) is not None:
        out = dict(hf)
    else:
        out = {}
        for i in range(c.n_layer):
            ours = f"blocks.{i}."
            if c.family == "gpt2":
                pre = f"transformer.h.{i}."
                for a, b in GPT2_BLOCK_NAMES.items():
                    w = hf[pre + b + ".weight"]
                    out[ours + a + ".weight"] = w if a.startswith("norm") else w.t()
                    out[ours + a + ".bias"] = hf[pre + b + ".bias"]
                continue
            pre = f"model.layers.{i}."
            out[ours + "norm1.weight"] = hf[pre + "input_layernorm.weight"]
            out[ours + "norm2.weight"] = hf[pre + "post_attention_layernorm.weight"]
            for suffix in ("weight", "bias") if c.bias or c.qkv_bias else ("weight",):
                qkv = [hf[pre + f"self_attn.{p}_proj.{suffix}"] for p in "qkv"]
                out[ours + f"attn.qkv.{suffix}"] = torch.cat(qkv, dim=0)
            for suffix in ("weight", "bias") if c.bias else ("weight",):
                out[ours + f"attn.proj.{suffix}"] = hf[pre + f"self_attn.o_proj.{suffix}"]
                gate_up = [hf[pre + f"mlp.{p}_proj.{suffix}"] for p in ("gate", "up")]
                out[ours + f"mlp.gate_up.{suffix}"] = torch.cat(gate_up, dim=0)
                out[ours + f"mlp.proj.{suffix}"] = hf[pre + f"mlp.down_proj.{suffix}"]
            if c.qk_norm:
                out[ours + "attn.q_norm.weight"] = hf[pre + "self_attn.q_norm.weight"]
                out[ours + "attn.k_norm.weight"] = hf[pre + "self_attn.k_norm.weight"]
        if c.family == "gpt2":
            out["embed.weight"] = hf["transformer.wte.weight"]
            out["pos_embed.weight"] = hf["transformer.wpe.weight"]
            out["norm.weight"] = hf["transformer.ln_f.weight"]
            out["norm.bias"] = hf["transformer.ln_f.bias"]
        else:
            out["embed.weight"] = hf["model.embed_tokens.weight"]
            out["norm.weight"] = hf["model.norm.weight"]
        if not c.tie_embeddings:
            out["lm_head.weight"] = hf["lm_head.weight"]
    if c.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out
