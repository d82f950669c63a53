"""`commonlm import`: a local Hugging Face model directory -> a CommonLM model directory.

Reads `config.json`, `tokenizer.json` (+ `tokenizer_config.json`) and safetensors weights (one file
or shards with `model.safetensors.index.json`). Pickle checkpoints (`*.bin`, `*.pt`) are refused and
never unpickled. Every field we cannot represent exactly is refused by name (`interop/hf.py` reads the
config and names the weights), so an import is either exact (same logits) or an error. One exception, said on
the console: DeepSeek-V3's multi-token-prediction layers (stored after the last layer) are left out; they
predict further tokens for speculative decoding and take no part in the model's own logits (transformers
skips them too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from commonlm.config import RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.interop.hf import from_hf, hf_incompatibility, model_config_from_hf
from commonlm.model.decoder import Decoder
from commonlm.modeldir import check_vocab, read_weights, save_model_dir
from commonlm.utils import console


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Import the Hugging Face directory `src` into a new CommonLM model directory `out`, exactly or not at all."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UserError(f"import {src}: no config.json; give a Hugging Face model directory on this disk")
    if out.exists():
        raise UserError(f"import: {out} already exists; choose another --out or remove it")
    cfg = json.loads((src / "config.json").read_text())
    try:
        model_config = model_config_from_hf(cfg)
    except UserError as e:
        raise UserError(f"import {src}: {e}") from e
    model_config.validate()
    assert hf_incompatibility(model_config) is None, hf_incompatibility(model_config)
    tokenizer = Tokenizer.load(src)
    check_vocab(tokenizer, model_config, src)
    tensors = {k: v.float() for k, v in read_weights(src).items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    interleaved = model_config.family == "deepseek_v3" and cfg.get("rope_interleave", True)
    if model_config.family == "deepseek_v3":
        tensors = _without_prediction_layers(tensors, model_config.n_layer)
    model = Decoder(model_config)
    try:
        model.load_state_dict(from_hf(model_config, tensors, model.state_dict(), interleaved), strict=True)
    except KeyError as e:
        raise UserError(f"import {src}: weight {e} is missing from the checkpoint") from e
    except ValueError as e:
        raise UserError(f"import {src}: {e} (an architecture we do not know?)") from e
    except RuntimeError as e:
        raise UserError(f"import {src}: weights do not match config.json ({str(e).splitlines()[1][:160]})") from e
    return save_model_dir(out, model, tokenizer, RunConfig(model=model_config))


def _without_prediction_layers(tensors: dict, n_layer: int) -> dict:
    """DeepSeek-V3's weights less its multi-token-prediction layers (model.layers.{n_layer} and on), said once."""
    extra = {k for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m[1]) >= n_layer}
    if extra:
        layers = sorted({int(re.match(r"model\.layers\.(\d+)\.", k)[1]) for k in extra})
        console.print(f"import: left out {len(layers)} multi-token-prediction layer(s) ({len(extra)} tensors): "
                      "they take no part in the logits")
    return {k: v for k, v in tensors.items() if k not in extra}
