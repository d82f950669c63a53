"""Our decoder <-> Hugging Face transformers: `config.json` and weight names, in both directions.

A model directory stores weights under the names of the matching transformers class, so
`AutoModelForCausalLM.from_pretrained(dir)` loads it unchanged, and `commonlm import` reads such a
directory back. The families:

- gpt2:    GPT2LMHeadModel    (learned positions, LayerNorm, GELU, biases, Conv1D = transposed weights)
- llama:   LlamaForCausalLM   (RoPE, RMSNorm, SwiGLU, GQA; optional biases everywhere)
- mistral: MistralForCausalLM (as llama, no biases; sliding window on every layer)
- qwen2:   Qwen2ForCausalLM   (as llama, biases on q/k/v only; sliding window after max_window_layers)
- qwen3:   Qwen3ForCausalLM   (as qwen2, no biases, RMS QK-norm per head)
- qwen3_moe: Qwen3MoeForCausalLM (as qwen3, every MLP routed experts: softmax top-k, no shared experts, no
           balancing bias, no sliding window; each expert's weights stored apart, as transformers saves them)
- deepseek_v3: DeepseekV3ForCausalLM (multi-head latent attention, model/mla.py; dense MLPs in the first
           first_k_dense_replace layers, then sigmoid-routed experts with group-limited top-k, a selection bias
           (e_score_correction_bias), routed_scaling_factor and shared experts). DeepSeek's checkpoints rotate
           interleaved pairs (rope_interleave): import permutes the rows that make the rotary parts into halves,
           and export writes rope_interleave false. Multi-token-prediction layers are dropped on import.

The four RoPE families carry RoPE scaling in `rope_parameters` (linear, dynamic, yarn, llama3; the older
`rope_scaling` key is read too, as Llama 3.1's and Qwen2.5's own files have it).

Each family has one name table (`NAMES`), read by saving, loading and importing alike, and one pair of
config translations (`hf_config` out, `model_config_from_hf` in). The directory fails closed:
`hf_incompatibility` passes a model only when its config reads back unchanged through that pair and its
state dict holds exactly the tensors a decoder of that config has, each with a name in the table. Anything
else (a new part, a field the class lacks) is saved with our own names ("native") and a config.json whose
`commonlm_note` says why, never as a transformers directory that loads without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import torch

from commonlm.config import ModelConfig
from commonlm.errors import UserError
from commonlm.model.decoder import Decoder

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}

# Our module -> theirs, or the parts a fused module splits into (along dim 0, in this order). "{i}" is the
# layer; a module's .weight and .bias keep their suffix.
GPT2_NAMES = {
    "embed": "transformer.wte", "pos_embed": "transformer.wpe", "norm": "transformer.ln_f", "lm_head": "lm_head",
    "blocks.{i}.norm1": "transformer.h.{i}.ln_1", "blocks.{i}.norm2": "transformer.h.{i}.ln_2",
    "blocks.{i}.attn.qkv": "transformer.h.{i}.attn.c_attn", "blocks.{i}.attn.proj": "transformer.h.{i}.attn.c_proj",
    "blocks.{i}.mlp.fc": "transformer.h.{i}.mlp.c_fc", "blocks.{i}.mlp.proj": "transformer.h.{i}.mlp.c_proj",
}
LLAMA_NAMES = {
    "embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
    "blocks.{i}.norm1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.norm2": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.attn.qkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                            "model.layers.{i}.self_attn.v_proj"),
    "blocks.{i}.attn.proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
    "blocks.{i}.mlp.gate_up": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
    "blocks.{i}.mlp.proj": "model.layers.{i}.mlp.down_proj",
}
# Mixture of experts: the router, and the stacked experts, stored one tensor per expert ("{e}") and part
QWEN3_MOE_NAMES = {
    **{ours: theirs for ours, theirs in LLAMA_NAMES.items() if ".mlp." not in ours},
    "blocks.{i}.mlp.router": "model.layers.{i}.mlp.gate",
    "blocks.{i}.mlp.experts.gate_up_proj": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                                            "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
    "blocks.{i}.mlp.experts.down_proj": ("model.layers.{i}.mlp.experts.{e}.down_proj.weight",),
}
# Latent attention as transformers' DeepseekV3Attention names it; dense MLPs as Llama's, expert layers as Qwen3-MoE's
# plus the selection bias (a whole name: a buffer of the MoE module itself) and the shared experts
DEEPSEEK_V3_NAMES = {
    **{ours: theirs for ours, theirs in QWEN3_MOE_NAMES.items() if ".attn." not in ours},
    **{f"blocks.{{i}}.attn.{ours}": f"model.layers.{{i}}.self_attn.{theirs}" for ours, theirs in [
        ("q", "q_proj"), ("q_a", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("q_b", "q_b_proj"),
        ("kv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("kv_b", "kv_b_proj"), ("proj", "o_proj")]},
    "blocks.{i}.mlp.gate_up": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
    "blocks.{i}.mlp.proj": "model.layers.{i}.mlp.down_proj",
    "blocks.{i}.mlp.balance_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "blocks.{i}.mlp.shared.gate_up": ("model.layers.{i}.mlp.shared_experts.gate_proj",
                                      "model.layers.{i}.mlp.shared_experts.up_proj"),
    "blocks.{i}.mlp.shared.proj": "model.layers.{i}.mlp.shared_experts.down_proj",
}
NAMES = {"gpt2": GPT2_NAMES, "llama": LLAMA_NAMES, "mistral": LLAMA_NAMES, "qwen2": LLAMA_NAMES, "qwen3": LLAMA_NAMES,
         "qwen3_moe": QWEN3_MOE_NAMES, "deepseek_v3": DEEPSEEK_V3_NAMES}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # GPT-2's Conv1D holds [in, out]: transposed both ways


# -- config.json ------------------------------------------------------------------------------------


def _common(c: ModelConfig, eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    return {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "eos_token_id": eos_id,
            "bos_token_id": None, "pad_token_id": pad_id, "dtype": "float32", "initializer_range": c.init_std}


def native_config(c: ModelConfig, eos_id: int | None, pad_id: int | None, reason: str) -> dict[str, Any]:
    """The config.json of a directory with our own weight names, saying why it is not a transformers one."""
    return {"architectures": ["CommonLMForCausalLM"], "model_type": "commonlm",
            "commonlm_note": f"native CommonLM weights; not loadable by transformers ({reason})",
            **_common(c, eos_id, pad_id)}


def hf_config(c: ModelConfig, eos_id: int | None = None, pad_id: int | None = None) -> dict[str, Any]:
    """The config.json of the family's transformers class. It describes `c` exactly only where
    `hf_incompatibility(c)` is None."""
    common = _common(c, eos_id, pad_id)
    if c.family == "gpt2":
        return {
            "architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2", **common,
            "n_positions": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_inner": c.ff_dim, "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": c.norm_eps, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "resid_pdrop": 0.0, "scale_attn_weights": True,  # (our blocks have no residual dropout)
        }
    if c.family == "deepseek_v3":
        return _deepseek_config(c, common)
    out = {
        "architectures": [ARCHITECTURES[c.family]], "model_type": c.family, **common,
        "hidden_size": c.d_model, "intermediate_size": c.ff_dim, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.dim_head,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        "rope_theta": c.rope_theta, "rope_parameters": _rope_parameters(c),
        "attention_bias": c.bias, "attention_dropout": c.dropout,
    }
    if c.rope_scaling == "dynamic":  # transformers grows the base beyond max_position_embeddings
        out["max_position_embeddings"] = c.rope_original_len or c.max_seq_len
    window = c.sliding_window or None
    if c.family == "qwen3_moe":  # (its class has no max_window_layers: a window is not written, so it fails closed)
        out.update(moe_intermediate_size=c.moe_ff_dim, num_experts=c.n_experts, num_experts_per_tok=c.experts_per_token,
                   norm_topk_prob=c.router_norm_topk, decoder_sparse_step=1, mlp_only_layers=[],
                   output_router_logits=c.router_aux_loss > 0, router_aux_loss_coef=c.router_aux_loss or 0.001,
                   use_sliding_window=False, sliding_window=None)
    elif c.family == "llama":
        out["mlp_bias"] = c.bias
    elif c.family == "mistral":
        out["sliding_window"] = window
    else:  # qwen2/qwen3: the first max_window_layers layers attend fully, the others within the window
        out.update(use_sliding_window=bool(window), sliding_window=window,
                   max_window_layers=c.full_attention_layers if window else c.n_layer)
    return out


def _deepseek_config(c: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """DeepseekV3Config's fields. Every field is written (the class's defaults are DeepSeek-V3's full size)."""
    moe = c.n_experts > 0
    return {
        "architectures": [ARCHITECTURES[c.family]], "model_type": c.family, **common,
        "hidden_size": c.d_model, "intermediate_size": c.ff_dim, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "hidden_act": "silu", "rope_parameters": _rope_parameters(c),
        "rope_interleave": False, "attention_bias": c.bias, "attention_dropout": c.dropout,
        "q_lora_rank": c.q_lora_rank or None, "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
        # all layers dense without experts; the expert fields then keep the values they would read back as
        "first_k_dense_replace": c.dense_layers if moe else c.n_layer,
        "n_routed_experts": c.n_experts if moe else 1, "num_experts_per_tok": c.experts_per_token if moe else 1,
        "moe_intermediate_size": c.moe_ff_dim if moe else c.ff_dim, "n_shared_experts": c.n_shared_experts,
        "n_group": c.expert_groups, "topk_group": c.groups_per_token, "routed_scaling_factor": c.router_scale,
        "norm_topk_prob": c.router_norm_topk, "num_nextn_predict_layers": 0,
        **({"max_position_embeddings": c.rope_original_len or c.max_seq_len} if c.rope_scaling == "dynamic" else {}),
    }


def _rope_parameters(c: ModelConfig) -> dict[str, Any]:
    """transformers' `rope_parameters`: the type and what that type reads (modeling_rope_utils.py)."""
    params: dict[str, Any] = {"rope_type": "default" if c.rope_scaling == "none" else c.rope_scaling,
                              "rope_theta": c.rope_theta}
    if c.rope_scaling != "none":
        params["factor"] = c.rope_factor
    if c.rope_scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = c.rope_original_len or c.max_seq_len
    if c.rope_scaling == "llama3":
        params.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    if c.rope_scaling == "yarn":
        params.update(beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, truncate=c.rope_truncate)
        if c.rope_attention_factor:
            params["attention_factor"] = c.rope_attention_factor
        if c.rope_mscale_all_dim:  # (DeepSeek's latent attention: the softmax scale)
            params["mscale_all_dim"] = c.rope_mscale_all_dim
    return params


# what each RoPE type reads from rope_parameters (rope_scaling in older files), beside rope_type and rope_theta
ROPE_KEYS = {
    "default": set(), "linear": {"factor"}, "dynamic": {"factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
}


def _rope_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's rope_* fields (and max_seq_len) from a config.json, or a UserError naming what we lack."""
    spec = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})  # (transformers' order of precedence)
    kind = spec.pop("rope_type", None) or spec.pop("type", None) or "default"
    spec.pop("type", None)
    theta = float(spec.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    if kind not in ROPE_KEYS:
        raise _refuse("rope_scaling.rope_type", kind, f"supported: {', '.join(ROPE_KEYS)}")
    partial = spec.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _refuse("partial_rotary_factor", partial, "rotary embedding over whole heads only")
    required = {"default": set(), "llama3": {"factor", "low_freq_factor", "high_freq_factor"}}.get(kind, {"factor"})
    missing = sorted(key for key in required if spec.get(key) is None)
    if missing:
        raise _refuse(f"rope_scaling.{missing[0]}", None, f"{kind} RoPE needs it")
    unknown = sorted(set(spec) - ROPE_KEYS[kind])
    if unknown:
        raise _refuse(f"rope_scaling.{unknown[0]}", spec[unknown[0]], f"not read by {kind} RoPE here")
    context = cfg.get("max_position_embeddings", 2048)
    out: dict[str, Any] = {"rope_theta": theta, "max_seq_len": context}
    if kind == "default":
        return out
    factor = float(spec["factor"])
    out.update(rope_scaling=kind, rope_factor=factor)
    if kind == "dynamic":  # the context it was made for: factor x the original, where the base has grown factor-fold
        out.update(rope_original_len=context, max_seq_len=round(factor * context))
    if kind in ("llama3", "yarn"):
        out["rope_original_len"] = spec.get("original_max_position_embeddings") or context
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(spec["low_freq_factor"]),
                   rope_high_freq_factor=float(spec["high_freq_factor"]))
    if kind == "yarn":
        out.update(rope_beta_fast=float(spec.get("beta_fast") or 32.0),
                   rope_beta_slow=float(spec.get("beta_slow") or 1.0), rope_truncate=bool(spec.get("truncate", True)))
        attention_factor = spec.get("attention_factor")
        mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's form, folded into the factor
            def get_mscale(m: float) -> float:
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

            attention_factor = get_mscale(mscale) / get_mscale(mscale_all_dim)
        out["rope_attention_factor"] = float(attention_factor or 0.0)
    return out


def _window_from_hf(kind: str, cfg: dict[str, Any], n_layer: int) -> dict[str, int]:
    """sliding_window and full_attention_layers, as transformers applies Mistral's and Qwen2/3's fields."""
    window = cfg.get("sliding_window")
    if kind == "llama" or not window or (kind != "mistral" and not cfg.get("use_sliding_window")):
        window = None
    if kind == "mistral":
        full = 0
    else:
        full = min(n_layer, cfg.get("max_window_layers", 28)) if window else n_layer
        layer_types = cfg.get("layer_types")
        if layer_types is not None:  # (saved by transformers beside the fields it came from: it decides)
            full = sum(t == "full_attention" for t in layer_types)
            expected = ["full_attention"] * full + ["sliding_attention"] * (n_layer - full)
            if layer_types != expected or (full < n_layer and not window):
                raise _refuse("layer_types", layer_types, "full-attention layers first, then sliding ones")
    if not window or full >= n_layer:
        return {"sliding_window": 0, "full_attention_layers": 0}
    return {"sliding_window": int(window), "full_attention_layers": full}


def _refuse(field: str, value: Any, why: str) -> UserError:
    return UserError(f"config.json {field}={value!r} is not supported ({why})")


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """The ModelConfig that reproduces a transformers config exactly, or a UserError naming the field."""
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise _refuse("model_type", kind, f"supported: {', '.join(ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return cfg.get(key, default)

    if kind == "gpt2":
        act = get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            raise _refuse("activation_function", act, "use gelu or gelu_new")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if get(flag):
                raise _refuse(flag, get(flag), "not implemented")
        if get("scale_attn_weights", True) is not True:
            raise _refuse("scale_attn_weights", get("scale_attn_weights"), "must be true")
        # dropout is a training setting, not part of the logits: kept when it is ours (embeddings and
        # attention, no residual dropout), else an import starts without it
        drop = get("attn_pdrop", 0.1)
        dropout = drop if get("embd_pdrop", 0.1) == drop and get("resid_pdrop", 0.1) == 0 else 0.0
        d = get("n_embd")
        return ModelConfig(
            family="gpt2", vocab_size=get("vocab_size"), n_layer=get("n_layer"), n_head=get("n_head"),
            d_model=d, d_ff=get("n_inner") or 4 * d, max_seq_len=get("n_positions"), pos_emb="learned",
            norm="layernorm", norm_eps=get("layer_norm_epsilon", 1e-5), mlp=mlp, bias=True,
            tie_embeddings=get("tie_word_embeddings", True), init_std=get("initializer_range", 0.02), dropout=dropout,
        )

    act = get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "only SwiGLU (silu) MLPs are implemented")
    if kind == "deepseek_v3":
        return _deepseek_from_hf(cfg)
    attention_bias = bool(get("attention_bias", False))
    if kind == "llama" and attention_bias != bool(get("mlp_bias", False)):
        raise _refuse("mlp_bias", get("mlp_bias"), "attention_bias and mlp_bias must be equal")
    if kind in ("mistral", "qwen3") and attention_bias:
        raise _refuse("attention_bias", True, f"{kind} without biases only")
    heads = get("num_attention_heads")
    moe = _moe_from_hf(cfg) if kind == "qwen3_moe" else {}
    return ModelConfig(**moe,
        family=kind, vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"), n_head=heads,
        n_kv_head=get("num_key_value_heads") or heads, d_model=get("hidden_size"),
        head_dim=get("head_dim") or 0, d_ff=get("intermediate_size"),
        pos_emb="rope", **_rope_from_hf(cfg), **_window_from_hf(kind, cfg, get("num_hidden_layers")), norm="rmsnorm",
        norm_eps=get("rms_norm_eps", 1e-6), mlp="swiglu", qk_norm=kind in ("qwen3", "qwen3_moe"),
        bias=attention_bias if kind == "llama" else False, qkv_bias=kind == "qwen2",
        tie_embeddings=get("tie_word_embeddings", kind == "qwen3"), init_std=get("initializer_range", 0.02),
    )


def _deepseek_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """A DeepSeek-V3 config.json (missing keys take DeepseekV3Config's defaults, as transformers reads them)."""
    def get(key: str, default: Any) -> Any:
        value = cfg.get(key, default)
        return default if value is None and default is not None else value

    n_layer, heads = get("num_hidden_layers", 61), get("num_attention_heads", 128)
    if cfg.get("quantization_config"):  # (DeepSeek's own release: fp8 blocks with their scales beside them)
        quantized = cfg["quantization_config"]
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized
        raise _refuse("quantization_config.quant_method", method, "dequantize the weights to bf16 or fp32 first")
    # fields of DeepSeek's own (remote-code) config that transformers' class reads as fixed: refused when not those
    for key, fixed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if cfg.get(key, fixed) != fixed:
            raise _refuse(key, cfg[key], f"DeepseekV3ForCausalLM routes with {key}={fixed!r} only")
    if get("attention_bias", False):
        raise _refuse("attention_bias", True, "DeepSeek-V3 without attention biases only")
    if get("num_key_value_heads", heads) != heads:
        raise _refuse("num_key_value_heads", cfg["num_key_value_heads"], f"latent attention has all {heads} heads")
    rope = _rope_from_hf({"max_position_embeddings": 4096, **cfg})  # (DeepseekV3Config's default context)
    mscale_all_dim = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}).get("mscale_all_dim")
    if mscale_all_dim and rope.get("rope_scaling") == "yarn":
        rope["rope_mscale_all_dim"] = float(mscale_all_dim)
    dense = get("first_k_dense_replace", 3)
    moe: dict[str, Any] = {}
    if dense < n_layer:
        if not get("n_shared_experts", 1):
            raise _refuse("n_shared_experts", cfg["n_shared_experts"], "DeepSeek-V3 with shared experts only")
        moe = {"n_experts": get("n_routed_experts", 256), "experts_per_token": get("num_experts_per_tok", 8),
               "expert_ff_dim": get("moe_intermediate_size", 2048), "n_shared_experts": get("n_shared_experts", 1),
               "router_score": "sigmoid", "router_norm_topk": bool(get("norm_topk_prob", True)), "router_bias": True,
               "router_scale": float(get("routed_scaling_factor", 2.5)), "expert_groups": get("n_group", 8),
               "groups_per_token": get("topk_group", 4), "dense_layers": dense}
    return ModelConfig(
        **moe, **rope, family="deepseek_v3", vocab_size=get("vocab_size", 129280), n_layer=n_layer, n_head=heads,
        d_model=get("hidden_size", 7168), d_ff=get("intermediate_size", 18432), pos_emb="rope", norm="rmsnorm",
        norm_eps=get("rms_norm_eps", 1e-6), mlp="swiglu", tie_embeddings=get("tie_word_embeddings", False),
        init_std=get("initializer_range", 0.02), q_lora_rank=get("q_lora_rank", 0) if "q_lora_rank" in cfg else 1536,
        kv_lora_rank=get("kv_lora_rank", 512), qk_nope_head_dim=get("qk_nope_head_dim", 128),
        qk_rope_head_dim=get("qk_rope_head_dim", 64), v_head_dim=get("v_head_dim", 128),
    )


def _moe_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a Qwen3-MoE config.json: experts in every layer only."""
    if cfg.get("mlp_only_layers"):
        raise _refuse("mlp_only_layers", cfg["mlp_only_layers"], "dense layers between expert layers")
    if cfg.get("decoder_sparse_step", 1) != 1:
        raise _refuse("decoder_sparse_step", cfg["decoder_sparse_step"], "experts in every layer only (1)")
    if cfg.get("use_sliding_window"):
        raise _refuse("use_sliding_window", True, "Qwen3-MoE with a sliding window")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    return {"n_experts": experts, "experts_per_token": cfg.get("num_experts_per_tok", 8),
            "expert_ff_dim": cfg.get("moe_intermediate_size", 768),
            "router_norm_topk": cfg.get("norm_topk_prob", False),
            "router_aux_loss": cfg.get("router_aux_loss_coef", 0.001) if cfg.get("output_router_logits") else 0.0}


# -- does a model fit its family's class? -----------------------------------------------------------


def hf_incompatibility(c: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> str | None:
    """None if `c` (and the tensors of `state`, when given) map exactly onto the family's transformers class,
    else the reason they do not, in one line."""
    try:
        back = model_config_from_hf(hf_config(c))
    except UserError as e:
        return f"{c.family}'s config.json cannot express this model: {e}"
    ours, theirs = _resolved(c), _resolved(back)
    for f in dataclasses.fields(ours):  # every field, so one added later is checked too
        value, read = getattr(ours, f.name), getattr(theirs, f.name, f.default)
        if value != read:
            hint = _FAMILY_FOR.get(f.name, "") if c.family not in ("qwen3_moe", "deepseek_v3") else ""
            return (f"{c.family}'s config.json cannot express model.{f.name}={value!r} (it reads back as {read!r})"
                    + hint)
    return None if state is None else _tensor_mismatch(c, state)


# what a dense family cannot hold, and the family that does
_FAMILY_FOR = {
    "n_experts": "; routed experts go in family qwen3_moe (--set model.family=qwen3_moe model.qk_norm=true) or "
                 "deepseek_v3",
    "kv_lora_rank": "; latent attention goes in family deepseek_v3 (--set model.family=deepseek_v3)",
}


def _resolved(c: ModelConfig) -> ModelConfig:
    """`c` with the derived sizes spelled out (0 = "from the other fields" in ModelConfig)."""
    return dataclasses.replace(c, n_kv_head=c.kv_heads, head_dim=c.dim_head, d_ff=c.ff_dim,
                               rope_original_len=c.rope_original_len or c.max_seq_len,
                               expert_ff_dim=c.moe_ff_dim if c.n_experts else c.expert_ff_dim)


def _tensor_mismatch(c: ModelConfig, state: dict[str, torch.Tensor]) -> str | None:
    """Why `state` is not exactly the tensors of a decoder of config `c`, each with a name in the table."""
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation work
        expected = {k: tuple(v.shape) for k, v in Decoder(c).state_dict().items()}
    for name, tensor in state.items():
        if name not in expected:
            return f"tensor {name} is not part of a {c.family} model"
        if their_names(c.family, name, c.n_experts) is None:
            return f"tensor {name} has no {c.family} name"
        if tuple(tensor.shape) != expected[name]:
            return f"tensor {name} has shape {tuple(tensor.shape)}, not {expected[name]}"
    missing = [name for name in expected if name not in state]
    return f"tensor {missing[0]} is missing" if missing else None


# -- weights ----------------------------------------------------------------------------------------


def their_names(family: str, ours: str, n_experts: int = 0) -> tuple[str, ...] | None:
    """The transformers name(s) of one of our tensors (several for a fused one), None if the table has none.
    Stacked experts name each of their `n_experts` experts' parts in turn."""
    module, _, suffix = ours.rpartition(".")
    layer = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    stacked = NAMES[family].get(f"blocks.{{i}}.{layer[2]}.{suffix}") if layer else None
    if isinstance(stacked, str):  # a whole name (a module's own buffer)
        return (stacked.format(i=layer[1]),)
    if stacked is not None:
        return tuple(p.format(i=layer[1], e=e) for e in range(n_experts) for p in stacked)
    theirs = NAMES[family].get(f"blocks.{{i}}.{layer[2]}" if layer else module)
    if theirs is None:
        return None
    parts = (theirs,) if isinstance(theirs, str) else theirs
    return tuple(f"{p.format(i=layer[1] if layer else '')}.{suffix}" for p in parts)


def hf_names(c: ModelConfig, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Our tensor name -> its transformers name(s), for each tensor a transformers directory stores (a tied
    head is stored once, as the embedding). A name without one in the family's table raises KeyError."""
    out = {}
    for ours in names:
        if c.tie_embeddings and ours == "lm_head.weight":
            continue
        theirs = their_names(c.family, ours, c.n_experts)
        if theirs is None:
            raise KeyError(f"{ours} has no {c.family} name")
        out[ours] = theirs
    return out


def split_rows(c: ModelConfig, ours: str) -> list[int]:
    """Rows of each transformers part of a fused tensor: q, k, v or gate, up; of stacked experts (their first
    two dimensions flattened), each expert's gate and up, or its down projection."""
    if ".mlp.experts.gate_up_proj" in ours:
        return [c.moe_ff_dim] * (2 * c.n_experts)
    if ".mlp.experts.down_proj" in ours:
        return [c.d_model] * c.n_experts
    if ".mlp.shared.gate_up." in ours:
        return [c.n_shared_experts * c.moe_ff_dim] * 2
    if ".attn.qkv." in ours:
        return [c.n_head * c.dim_head, c.kv_heads * c.dim_head, c.kv_heads * c.dim_head]
    return [c.ff_dim, c.ff_dim]  # .mlp.gate_up.


def to_hf(c: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers names (a fresh dict of contiguous tensors)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in hf_names(c, state).items():
        tensor = state[ours].flatten(0, 1) if state[ours].dim() == 3 else state[ours]  # (stacked experts)
        parts = tensor.split(split_rows(c, ours)) if len(theirs) > 1 else [tensor]
        for name, tensor in zip(theirs, parts):
            out[name] = (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
    return out


def from_hf(c: ModelConfig, hf: dict[str, torch.Tensor], names: Iterable[str],
            rope_interleave: bool = False) -> dict[str, torch.Tensor]:
    """transformers names -> our state dict with the tensors `names` (a decoder's state-dict keys): the
    inverse of `to_hf`. A missing transformers name raises KeyError, one left over ValueError. `rope_interleave`
    (a DeepSeek-V3 config.json's): the rotary dimensions come in interleaved pairs, which our halves are made from."""
    table = hf_names(c, names)
    unused = set(hf) - {name for theirs in table.values() for name in theirs}
    unused -= {"lm_head.weight"} if c.tie_embeddings else set()  # some checkpoints store the tied head too
    if unused:
        raise ValueError(f"unexpected weights {sorted(unused)[:3]}")
    out = {}
    for ours, theirs in table.items():
        parts = [hf[name].t() if name.endswith(CONV1D) else hf[name] for name in theirs]
        out[ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if ".mlp.experts." in ours:  # stacked experts: [E * rows, in] -> [E, rows, in]
            out[ours] = out[ours].unflatten(0, (c.n_experts, -1))
    if c.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return _rope_halves(c, out) if rope_interleave else out


def _rope_halves(c: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Latent attention's weights for rotary dimensions in interleaved pairs (x0, x1), (x2, x3), ... made to rotate
    in halves (x0, x2, ...), (x1, x3, ...) instead: the rows making each head's rotary query part and the shared rotary
    key reordered alike, so every query-key product, hence the logits, is unchanged."""
    halves = torch.cat([torch.arange(0, c.qk_rope_head_dim, 2), torch.arange(1, c.qk_rope_head_dim, 2)])
    out = dict(state)
    for name, tensor in state.items():
        if re.search(r"\.attn\.(q|q_b)\.weight$", name):  # [heads * (nope + rope), in]: each head's rope rows
            heads = tensor.unflatten(0, (c.n_head, c.dim_head))
            rope = heads[:, c.qk_nope_head_dim:][:, halves]
            out[name] = torch.cat([heads[:, : c.qk_nope_head_dim], rope], dim=1).flatten(0, 1)
        elif re.search(r"\.attn\.kv_a\.(weight|bias)$", name):  # [latent + rope, ...]: the shared key's rows
            out[name] = torch.cat([tensor[: c.kv_lora_rank], tensor[c.kv_lora_rank:][halves]])
    return out
