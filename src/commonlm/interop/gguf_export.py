"""GGUF export for llama.cpp: Llama/Mistral, Qwen2, Qwen3, GPT-2, Qwen3-MoE and DeepSeek-V3 layouts; f32, f16 or q8_0.

Written with the `gguf` package (llama.cpp's own writer). Tensor names come from gguf's name map
applied to the Hugging Face names `interop/hf.py` produces, with the same fix-ups llama.cpp's
converter makes: q/k rows permuted for the LLAMA architecture (llama.cpp rotates adjacent pairs,
Hugging Face rotates halves), and GPT-2's Conv1D weights stored as [out, in]. q8_0 applies to weight
matrices (and stacked experts) whose rows are a multiple of 32; norms, biases and routers stay f32.

Mixture of experts, as llama.cpp's converter writes them: each layer's experts stacked into three 3-D tensors
(ffn_gate_exps, ffn_up_exps [E, ff, d] and ffn_down_exps [E, d, ff]).
- qwen3_moe runs as QWEN3MOE: Qwen3's layout (NEOX rope, in halves as ours: no permutation) with routed experts.
  llama.cpp always renormalises the chosen experts' weights there, so a model that does not is refused.
- deepseek_v3 runs as DEEPSEEK2 (llama.cpp runs DeepSeek-V3 under that architecture): latent attention as one
  key-value head ("MQA") of the latent and the rotary key, kv_b split as the converter splits it since the MLA
  rework (attn_k_b: each head's key rows transposed to [H, rank, nope]; attn_v_b: [H, v, rank]); the selection
  bias as exp_probs_b, shared experts as *_shexp, the leading dense blocks as plain ffn_*. DEEPSEEK2 rotates
  interleaved pairs (llama.cpp's NORM rope) where we rotate halves, so the rows making each head's rotary query
  and the shared rotary key are re-interleaved: the inverse of what import does to DeepSeek's checkpoints.
  llama.cpp applies rms_norm_eps to the latent norms too (ours and DeepSeek's use 1e-6): equal when
  model.norm_eps is 1e-6, as DeepSeek's is.
RoPE scaling: YaRN is written where llama.cpp runs it as we do (`_rope_mismatch`; for DeepSeek, as DeepSeek configures
it); linear, llama3, dynamic NTK and sliding windows are refused: llama.cpp would run the file without them, wrong
and silent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.hf import hf_incompatibility, to_hf
from commonlm.model.decoder import Decoder, rope_frequencies
from commonlm.utils import atomic_file

QUANTS = ("f32", "f16", "q8_0")

# the architectures whose llama.cpp graphs read a rope_freqs tensor (Llama 3.x's RoPE scaling), checked against
# llama.cpp's logits
LLAMA3_ARCHS = ("LLAMA",)

# our family -> llama.cpp's architecture (Mistral runs as LLAMA)
GGUF_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gpt2": "GPT2",
             "qwen3_moe": "QWEN3MOE", "deepseek_v3": "DEEPSEEK2"}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise UserError("export: GGUF needs the 'gguf' package (pip install gguf)") from e
    return gguf


def _permute_for_llama(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split RoPE rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer(tok: Tokenizer) -> str:
    spec = json.loads(tok.to_json()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel":
        return "gpt-2"  # use_regex=True is GPT-2's regex; without regex (bytes) no merges exist, so any split works
    raise UserError(
        f"export: GGUF needs a pre-tokenizer llama.cpp knows; this tokenizer's is {spec.get('type')!r} "
        "(CommonLM-trained tokenizers export; imported ones with other regexes do not yet)"
    )


def _add_tokenizer(writer, gguf, tok: Tokenizer, model_vocab: int) -> None:
    spec = json.loads(tok.to_json())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"export: GGUF export supports BPE tokenizers, not {model.get('type')}")
    if not model.get("merges"):
        raise UserError("export: llama.cpp's BPE loader needs merges, and a byte tokenizer has none; "
                        "train a BPE tokenizer (commonlm tokenizer train) for models you want in GGUF")
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    # llama.cpp wants one token per embedding row: the rows past the tokenizer (we pad the vocabulary to a
    # multiple of 64) become unused placeholder tokens, as llama.cpp's own converter writes them
    tokens = [f"[PAD{i}]" for i in range(max(model_vocab, tok.vocab_size))]
    for text, i in vocab.items():
        tokens[i] = text
    added = tok.tk.get_added_tokens_decoder()
    types = [
        (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED) if i in added
        else gguf.TokenType.NORMAL if i < tok.vocab_size else gguf.TokenType.UNUSED
        for i in range(len(tokens))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.token_id(tok.eos_token))
    if tok.bos_token and tok.token_id(tok.bos_token) is not None:
        writer.add_bos_token_id(tok.token_id(tok.bos_token))
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def export_gguf(model: Decoder, tok: Tokenizer, out: str | Path, quant: str = "f16", name: str = "commonlm") -> Path:
    gguf = _gguf()
    c = model.config
    if quant not in QUANTS:
        raise UserError(f"export: --quant {quant!r} is not one of {', '.join(QUANTS)}")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    reason = hf_incompatibility(c, state)
    if reason is None and c.family not in GGUF_ARCH:
        reason = f"family {c.family} is not written to GGUF yet (it does: {', '.join(sorted(GGUF_ARCH))})"
    if reason is None and c.rope_scaling != "none":  # llama.cpp would run it unscaled: wrong output, no error
        reason = _rope_mismatch(c)
    if reason is None and c.sliding_window:
        reason = f"model.sliding_window={c.sliding_window} is not written to GGUF yet"
    if reason is None and c.family == "qwen3_moe" and not c.router_norm_topk:
        reason = "model.router_norm_topk=False: llama.cpp's QWEN3MOE always renormalises the chosen experts' weights"
    if reason is not None:
        raise UserError(f"export: GGUF needs a standard architecture; {reason}")
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[c.family])
    with atomic_file(out) as tmp:
        _write(gguf, str(tmp), arch, c, _tensors(gguf, arch, c, state), tok, quant, name)
    return Path(out)


def _rope_mismatch(c) -> str | None:
    """Why llama.cpp would run this model's RoPE scaling differently from us, or None. Linear and YaRN are written
    (llama3 as llama.cpp's rope_freqs tensor, for LLAMA3_ARCHS; dynamic NTK has no llama.cpp counterpart). llama.cpp
    reads no YaRN beta keys for these architectures (32 and 1) and always rounds the blend's range. DEEPSEEK2 takes
    the softmax scale from mscale_all_dim (its yarn_log_multiplier) and leaves the cos/sin unscaled: DeepSeek's own
    setting (mscale = mscale_all_dim, so transformers' cos/sin factor is 1); other settings would scale every query-
    key product differently."""
    deepseek = c.family == "deepseek_v3"
    if c.rope_scaling == "linear" and not deepseek and c.family != "gpt2":  # positions divided by the factor, as ours
        return None  # (DEEPSEEK2 with linear scaling gave logits 0.68 away from ours in llama.cpp: refused)
    if c.rope_scaling == "llama3" and GGUF_ARCH.get(c.family) in LLAMA3_ARCHS:  # as a rope_freqs tensor
        return None
    if c.rope_scaling != "yarn" or c.family == "gpt2":
        return f"model.rope_scaling={c.rope_scaling} is not written to GGUF yet"
    fixed = [("rope_beta_fast", c.rope_beta_fast, 32.0), ("rope_beta_slow", c.rope_beta_slow, 1.0),
             ("rope_truncate", c.rope_truncate, True)]
    for field, value, wanted in fixed + ([("rope_attention_factor", c.rope_attention_factor, 1.0)] if deepseek else []):
        if value != wanted:
            return f"model.{field}={value} with yarn: llama.cpp runs {GGUF_ARCH[c.family]} with {wanted} only"
    if deepseek and not c.rope_mscale_all_dim:
        return "yarn without model.rope_mscale_all_dim: llama.cpp's DEEPSEEK2 would scale the attention differently"
    return None


def _add_rope_scaling(writer, gguf, c) -> None:
    """The RoPE scaling keys `_rope_mismatch` passed, as llama.cpp's converter writes them."""
    if c.rope_scaling in ("linear", "yarn"):  # (llama3 is a tensor: _tensors)
        writer.add_rope_scaling_type(getattr(gguf.RopeScalingType, c.rope_scaling.upper()))
        writer.add_rope_scaling_factor(c.rope_factor)
    if c.rope_scaling == "yarn":
        writer.add_rope_scaling_orig_ctx_len(c.rope_original_len or c.max_seq_len)
        if c.family == "deepseek_v3":  # (llama.cpp divides the multiplier by 0.1 again)
            writer.add_rope_scaling_yarn_log_mul(0.1 * c.rope_mscale_all_dim)
        elif c.rope_attention_factor:  # llama.cpp's cos/sin factor is 0.1 ln(factor) + 1 times this
            writer.add_rope_scaling_attn_factors(c.rope_attention_factor / (0.1 * math.log(c.rope_factor) + 1))


def _tensors(gguf, arch, c, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp's name, tensor) for every tensor the file holds, from the Hugging Face names (stacked experts
    split into gate and up only, never into one tensor per expert)."""
    names = gguf.get_tensor_name_map(arch, c.n_layer)
    experts = {k: v for k, v in state.items() if ".mlp.experts." in k}
    hf = to_hf(c, {k: v for k, v in state.items() if k not in experts})
    for ours, stacked in experts.items():  # [E, 2 * ff, d] (gate then up) or [E, d, ff]
        base = f"model.layers.{ours.split('.')[1]}.mlp.experts"
        if ours.endswith(".gate_up_proj"):
            hf[f"{base}.gate_proj.weight"], hf[f"{base}.up_proj.weight"] = stacked.chunk(2, dim=1)
        else:
            hf[f"{base}.down_proj.weight"] = stacked
    for hf_name, hf_tensor in hf.items():
        for name, tensor in _llamacpp_layout(c, hf_name, hf_tensor):
            base, _, suffix = name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise UserError(f"export: no GGUF name for tensor {name}")
            yield f"{gguf_name}.{suffix}", tensor
    if c.rope_scaling == "llama3":  # llama.cpp divides each frequency by its factor: plain over ours, from our own
        plain = rope_frequencies(dataclasses.replace(c, rope_scaling="none"))[0]  # frequencies, not a second formula
        yield f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", plain / rope_frequencies(c)[0]


def _llamacpp_layout(c, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One Hugging Face tensor as llama.cpp's converter writes it: under what name(s), in what row order."""
    arch = GGUF_ARCH[c.family]
    if arch == "LLAMA" and hf_name.endswith((".q_proj.weight", ".q_proj.bias")):
        return [(hf_name, _permute_for_llama(tensor, c.n_head))]
    if arch == "LLAMA" and hf_name.endswith((".k_proj.weight", ".k_proj.bias")):
        return [(hf_name, _permute_for_llama(tensor, c.kv_heads))]
    if arch == "GPT2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return [(hf_name, tensor.t())]  # Conv1D [in, out] -> [out, in]
    if arch != "DEEPSEEK2":
        return [(hf_name, tensor)]
    rope = c.qk_rope_head_dim
    if re.search(r"\.self_attn\.(q_proj|q_b_proj)\.weight$", hf_name):  # each head's rotary rows, after its nope rows
        heads = tensor.unflatten(0, (c.n_head, c.dim_head))
        pairs = _permute_for_llama(heads[:, c.qk_nope_head_dim:].flatten(0, 1), c.n_head).unflatten(0, (c.n_head, rope))
        return [(hf_name, torch.cat([heads[:, : c.qk_nope_head_dim], pairs], dim=1).flatten(0, 1))]
    if hf_name.endswith(".self_attn.kv_a_proj_with_mqa.weight"):  # [latent + shared rotary key, d]
        return [(hf_name, torch.cat([tensor[: c.kv_lora_rank], _permute_for_llama(tensor[c.kv_lora_rank:], 1)]))]
    if hf_name.endswith(".self_attn.kv_b_proj.weight"):  # [H * (nope + v), rank] -> [H, rank, nope], [H, v, rank]
        k_b, v_b = tensor.unflatten(0, (c.n_head, -1)).split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        return [(hf_name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)),
                (hf_name.replace("kv_b_proj", "v_b_proj"), v_b)]
    if hf_name.endswith(".e_score_correction_bias"):  # (gguf's map names the module e_score_correction)
        return [(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"), tensor)]
    return [(hf_name, tensor)]


def _write(gguf, tmp: str, arch, c, tensors: Iterator[tuple[str, torch.Tensor]], tok: Tokenizer, quant: str,
           name: str) -> None:
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])

    writer.add_name(name)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ff_dim)
    writer.add_head_count(c.n_head)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    if c.family == "gpt2":
        writer.add_layer_norm_eps(c.norm_eps)
    elif c.family == "deepseek_v3":
        _add_deepseek_keys(writer, gguf, c)
    else:
        writer.add_head_count_kv(c.kv_heads)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_key_length(c.dim_head)
        writer.add_value_length(c.dim_head)
        writer.add_rope_dimension_count(c.dim_head)
    _add_rope_scaling(writer, gguf, c)
    if c.family == "qwen3_moe":
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.experts_per_token)
        writer.add_expert_feed_forward_length(c.moe_ff_dim)
    _add_tokenizer(writer, gguf, tok, c.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for gguf_name, tensor in tensors:
        _add_tensor(writer, gguf, gguf_name, tensor.contiguous().numpy(), quant)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_deepseek_keys(writer, gguf, c) -> None:
    """What llama.cpp's DEEPSEEK2 loader reads. Latent attention is written as one key-value head whose key is the
    latent and the rotary key and whose value is the latent (key/value length), the per-head sizes as the _mla
    lengths; the query latent's rank is written even when 0 (the loader requires it but for DeepSeek-V2-Lite)."""
    moe = c.n_experts > 0
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_leading_dense_block_count(c.dense_layers if moe else c.n_layer)
    writer.add_q_lora_rank(c.q_lora_rank)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_expert_feed_forward_length(c.moe_ff_dim if moe else c.ff_dim)
    writer.add_expert_shared_count(c.n_shared_experts if moe else 0)
    if not moe:
        return
    writer.add_expert_count(c.n_experts)
    writer.add_expert_used_count(c.experts_per_token)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # (deepseek_v3 routes by sigmoid only)
    writer.add_expert_weights_scale(c.router_scale)
    writer.add_expert_weights_norm(c.router_norm_topk)
    if c.groups_per_token < c.expert_groups:  # (every group kept limits nothing; llama.cpp asserts used < count)
        writer.add_expert_group_count(c.expert_groups)
        writer.add_expert_group_used_count(c.groups_per_token)


def _add_tensor(writer, gguf, name: str, data: np.ndarray, quant: str) -> None:
    # (llama.cpp keeps 1-D tensors, norms and the router in f32, as its converter writes them)
    matrix = data.ndim >= 2 and not name.endswith(("_norm.weight", "ffn_gate_inp.weight"))
    if quant == "q8_0" and matrix and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    elif quant in ("f16", "q8_0") and matrix:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, data.astype(np.float32))
