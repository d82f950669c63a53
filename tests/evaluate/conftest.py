"""A rigged model with real weights: a bigram table written into a Decoder, so every test knows its log-probs.

Every block's weights are zero (a block then adds nothing: its norms give zeros, and attention and SwiGLU of
zeros are zeros), the embedding of token t is the one-hot e_t, and the head is the table scaled by the final
RMSNorm's factor: the logits after token t are exactly `table[t]`, whatever came before. It saves as a model
directory like any other, so the CLI runs it end to end.
"""

import math
from pathlib import Path

import torch

from commonlm.config import ModelConfig, RunConfig
from commonlm.data.tokenizer import Tokenizer
from commonlm.model.decoder import Decoder
from commonlm.modeldir import save_model_dir
from commonlm.utils import write_jsonl  # noqa: F401 (the tests here import it from this module)

VOCAB = 320  # the byte tokenizer's 264 tokens, rounded up; also d_model, for one-hot embeddings
LOW = -30.0  # the logit of tokens the table leaves out


def table(default: dict[str, float] | None = None, after: dict[str, dict[str, float]] | None = None) -> torch.Tensor:
    """[V, V] logits: every row `default` ({char: logit}, others LOW), and row c overridden by `after[c]`."""
    rows = torch.full((VOCAB, VOCAB), LOW)
    for char, logit in (default or {}).items():
        rows[:, ord(char)] = logit
    for prev, logits in (after or {}).items():
        rows[ord(prev)] = LOW
        for char, logit in logits.items():
            rows[ord(prev), ord(char)] = logit
    return rows


def bigram_model(logits: torch.Tensor, max_seq_len: int = 128) -> Decoder:
    config = ModelConfig(family="llama", n_layer=1, n_head=4, d_model=VOCAB, vocab_size=VOCAB, max_seq_len=max_seq_len,
                         tie_embeddings=False)
    model = Decoder(config)
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.zero_()
        model.embed.weight.copy_(torch.eye(VOCAB))
        scale = 1 / math.sqrt(1 / VOCAB + config.norm_eps)  # RMSNorm of a one-hot row
        model.lm_head.weight.copy_(logits.T / scale)
    return model.eval()


def save_bigram(path: Path, logits: torch.Tensor, max_seq_len: int = 128) -> Path:
    model = bigram_model(logits, max_seq_len)
    return save_model_dir(path, model, Tokenizer.byte_level(), RunConfig(model=model.config))


def logp(row: torch.Tensor, char: str) -> float:
    """log-probability of `char` under logits `row`, by hand."""
    z = sum(math.exp(v) for v in row.tolist())
    return row[ord(char)].item() - math.log(z)


