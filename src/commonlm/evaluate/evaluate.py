"""Validation loss, perplexity and bits per byte over a prepared split.

The loss is the exact mean next-token cross-entropy over the covered tokens (non-overlapping windows,
every token predicted once; see data/loader.py `eval_batches`). Bits per byte divides the total
bits by the UTF-8 bytes of the text, which makes models with different tokenizers comparable; it uses
the split's tokens-per-byte ratio, exact when the whole split is evaluated (eval_tokens=0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from commonlm.data.loader import TokenData, eval_batches
from commonlm.model.loss import lm_loss
from commonlm.runtime import autocast
from commonlm.world import World, all_reduce_sum


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}ppl": self.perplexity, f"{prefix}bpb": self.bits_per_byte,
                f"{prefix}tokens": self.tokens}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TokenData,
    seq_len: int,
    batch_size: int = 16,
    max_tokens: int = 0,
    split: str = "val",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    world: World | None = None,
) -> EvalResult:
    world = world or World()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    batches = eval_batches(data, seq_len, batch_size, split=split, max_tokens=max_tokens,
                           rank=world.rank, world=world.size)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        total[0] += lm_loss(logits, y, reduction="sum").double()
        total[1] += y.numel()
    all_reduce_sum(total, world)
    model.train(was_training)
    tokens = int(total[1].item())
    loss = total[0].item() / max(tokens, 1)
    bytes_per_token = data.bytes(split) / max(data.tokens(split), 1)
    bpb = loss / math.log(2) / bytes_per_token if bytes_per_token > 0 else float("nan")
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), bits_per_byte=bpb, tokens=tokens)
