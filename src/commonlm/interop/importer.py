"""`commonlm import`: a local Hugging Face model directory -> a CommonLM model directory.

Reads `config.json`, `tokenizer.json` (+ `tokenizer_config.json`) and safetensors weights (one file
or shards with `model.safetensors.index.json`). Pickle checkpoints (`*.bin`, `*.pt`) are refused and
never unpickled. Every field we cannot represent exactly is refused by name, so an import is either
exact (same logits) or an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.hf import from_hf, hf_incompatibility
from commonlm.model.decoder import Decoder
from commonlm.modeldir import check_vocab, read_weights, save_model_dir

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def _refuse(src: Path, field: str, value: Any, why: str) -> UserError:
    return UserError(f"import {src}: config.json {field}={value!r} is not supported ({why})")


def model_config_from_hf(cfg: dict[str, Any], src: Path = Path(".")) -> ModelConfig:
    """The ModelConfig that reproduces a transformers config exactly, or a UserError naming the field."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise _refuse(src, "model_type", kind, f"supported: {', '.join(SUPPORTED)}")

    def get(key: str, default: Any = None) -> Any:
        return cfg.get(key, default)

    if kind == "gpt2":
        act = get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            raise _refuse(src, "activation_function", act, "use gelu or gelu_new")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if get(flag):
                raise _refuse(src, flag, get(flag), "not implemented")
        if get("scale_attn_weights", True) is not True:
            raise _refuse(src, "scale_attn_weights", get("scale_attn_weights"), "must be true")
        d = get("n_embd")
        return ModelConfig(
            family="gpt2", vocab_size=get("vocab_size"), n_layer=get("n_layer"), n_head=get("n_head"),
            d_model=d, d_ff=get("n_inner") or 4 * d, max_seq_len=get("n_positions"), pos_emb="learned",
            norm="layernorm", norm_eps=get("layer_norm_epsilon", 1e-5), mlp=mlp, bias=True,
            tie_embeddings=get("tie_word_embeddings", True), init_std=get("initializer_range", 0.02),
        )

    act = get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(src, "hidden_act", act, "only SwiGLU (silu) MLPs are implemented")
    scaling = get("rope_scaling") or {}
    params = get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise _refuse(src, "rope_scaling.rope_type", rope_type, "only plain RoPE is implemented")
    theta = params.get("rope_theta", get("rope_theta", 10000.0))
    window = get("sliding_window")
    if get("use_sliding_window", kind == "mistral") and window and window < get("max_position_embeddings"):
        raise _refuse(src, "sliding_window", window, "sliding-window attention is not implemented")
    attention_bias = bool(get("attention_bias", False))
    if kind == "llama" and attention_bias != bool(get("mlp_bias", False)):
        raise _refuse(src, "mlp_bias", get("mlp_bias"), "attention_bias and mlp_bias must be equal")
    if kind in ("mistral", "qwen3") and attention_bias:
        raise _refuse(src, "attention_bias", True, f"{kind} without biases only")
    heads = get("num_attention_heads")
    return ModelConfig(
        family=kind, vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"), n_head=heads,
        n_kv_head=get("num_key_value_heads") or heads, d_model=get("hidden_size"),
        head_dim=get("head_dim") or 0, d_ff=get("intermediate_size"),
        max_seq_len=get("max_position_embeddings", 2048), pos_emb="rope", rope_theta=float(theta), norm="rmsnorm",
        norm_eps=get("rms_norm_eps", 1e-6), mlp="swiglu", qk_norm=kind == "qwen3",
        bias=attention_bias if kind == "llama" else False, qkv_bias=kind == "qwen2",
        tie_embeddings=get("tie_word_embeddings", kind == "qwen3"), init_std=get("initializer_range", 0.02),
    )


def import_hf(src: str | Path, out: str | Path) -> Path:
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UserError(f"import {src}: no config.json; give a Hugging Face model directory on this disk")
    if out.exists():
        raise UserError(f"import: {out} already exists; choose another --out or remove it")
    cfg = json.loads((src / "config.json").read_text())
    model_config = model_config_from_hf(cfg, src)
    model_config.validate()
    assert hf_incompatibility(model_config) is None, hf_incompatibility(model_config)
    tokenizer = Tokenizer.load(src)
    check_vocab(tokenizer, model_config, src)
    tensors = {k: v.float() for k, v in read_weights(src).items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model = Decoder(model_config)
    try:
        state = from_hf(model_config, tensors)
        model.load_state_dict(state, strict=True)
    except KeyError as e:
        raise UserError(f"import {src}: weight {e} is missing from the checkpoint") from e
    except RuntimeError as e:
        raise UserError(f"import {src}: weights do not match config.json ({str(e).splitlines()[1][:160]})") from e
    unused = set(tensors) - _consumed_names(model_config, tensors)
    if unused:
        raise UserError(f"import {src}: unexpected weights {sorted(unused)[:3]} (an architecture we do not know?)")
    return save_model_dir(out, model, tokenizer, RunConfig(model=model_config))


def _consumed_names(c: ModelConfig, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The checkpoint names `from_hf` reads, found by asking it with a dict that records lookups."""

    class Recorder(dict):
        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

    seen: set[str] = set()
    from_hf(c, Recorder(tensors))
    if c.tie_embeddings:
        seen.add("lm_head.weight")  # some checkpoints store the tied head too
    return seen
