"""The language-model loss, in one place: training objectives, evaluation and the benchmarks all call it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that carries no loss (prompt tokens in fine-tuning, padding)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of logits [..., V] against targets [...], in fp32 whatever the logits' dtype.

    reduction "mean" averages over the targets that are not IGNORE, "sum" adds them up (a training step
    divides the sum of all its micro-batches by their total count, so that every token weighs the same).
    """
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)
