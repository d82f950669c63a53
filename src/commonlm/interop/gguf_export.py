"""GGUF export for llama.cpp: Llama/Mistral, Qwen2, Qwen3 and GPT-2 layouts; f32, f16 or q8_0.

Written with the `gguf` package (llama.cpp's own writer). Tensor names come from gguf's name map
applied to the Hugging Face names `interop/hf.py` produces, with the same fix-ups llama.cpp's
converter makes: q/k rows permuted for the LLAMA architecture (llama.cpp rotates adjacent pairs,
Hugging Face rotates halves), and GPT-2's Conv1D weights stored as [out, in]. q8_0 applies to 2-D
weight matrices whose rows are a multiple of 32; norms and biases stay f32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.hf import hf_incompatibility, to_hf
from commonlm.model.decoder import Decoder
from commonlm.utils import atomic_file

QUANTS = ("f32", "f16", "q8_0")

# our family -> llama.cpp's architecture (Mistral runs as LLAMA)
GGUF_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gpt2": "GPT2"}


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
        reason = f"model.rope_scaling={c.rope_scaling} is not written to GGUF yet"
    if reason is None and c.sliding_window:
        reason = f"model.sliding_window={c.sliding_window} is not written to GGUF yet"
    if reason is not None:
        raise UserError(f"export: GGUF needs a standard architecture; {reason}")
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[c.family])
    names = gguf.get_tensor_name_map(arch, c.n_layer)
    with atomic_file(out) as tmp:
        _write(gguf, str(tmp), arch, names, c, to_hf(c, state), tok, quant, name)
    return Path(out)


def _write(gguf, tmp: str, arch, names, c, tensors: dict[str, torch.Tensor], tok: Tokenizer, quant: str,
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
    else:
        writer.add_head_count_kv(c.kv_heads)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_key_length(c.dim_head)
        writer.add_value_length(c.dim_head)
        writer.add_rope_dimension_count(c.dim_head)
    _add_tokenizer(writer, gguf, tok, c.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for hf_name, tensor in tensors.items():
        if hf_name.endswith((".q_proj.weight", ".q_proj.bias")) and GGUF_ARCH[c.family] == "LLAMA":
            tensor = _permute_for_llama(tensor, c.n_head)
        elif hf_name.endswith((".k_proj.weight", ".k_proj.bias")) and GGUF_ARCH[c.family] == "LLAMA":
            tensor = _permute_for_llama(tensor, c.kv_heads)
        elif c.family == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # Conv1D [in, out] -> [out, in]
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise UserError(f"export: no GGUF name for tensor {hf_name}")
        data = tensor.contiguous().numpy()
        _add_tensor(writer, gguf, f"{gguf_name}.{suffix}", data, quant)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensor(writer, gguf, name: str, data: np.ndarray, quant: str) -> None:
    matrix = data.ndim == 2 and not name.endswith("_norm.weight")
    if quant == "q8_0" and matrix and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    elif quant in ("f16", "q8_0") and matrix:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, data.astype(np.float32))
