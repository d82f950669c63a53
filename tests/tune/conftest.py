"""A tiny random base model with a byte tokenizer, and chat or preference data prepared with its tokenizer."""

import json
from pathlib import Path

import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.chat import prepare_chat
from commonlm.data.tokenizer import Tokenizer
from commonlm.model.decoder import Decoder
from commonlm.modeldir import save_model_dir


def base_and_data(root: Path, records: list[dict], val_fraction: float,
                  preference: bool = False) -> tuple[Path, Path]:
    """(base model directory, prepared data directory) under `root`, from jsonl `records`."""
    torch.manual_seed(0)
    config = RunConfig(model=ModelConfig(family="llama", n_layer=2, n_head=4, d_model=64, vocab_size=320,
                                         max_seq_len=64))
    save_model_dir(root / "base", Decoder(config.model), Tokenizer.byte_level(), config)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_chat([str(root / "data.jsonl")], root / "base", root / "data", val_fraction=val_fraction,
                 preference=preference)
    return root / "base", root / "data"
