"""What the training loop optimizes: an objective owns its batches and its loss; the loop owns the rest
(schedule, accumulation, clipping, checkpoints, evaluation cadence, signals, parallelism).

An objective is made with `make(config, world, device, dtype, model=model)` (`model`: the model being
trained, for an objective that samples from it, as GRPO does) and is any object with these methods
(pretraining's `NextToken` below is the default one; fine-tuning objectives plug in the same way, see
`train(..., objective=...)`):

    next_batch() -> batch              the next micro-batch of this rank, on the device
    targets(batch) -> Tensor           how many target tokens it holds (0-dim, on the device)
    positions(batch) -> int            how many positions the model computes for it (tokens/s and MFU)
    loss(model, batch) -> (Tensor, {name: Tensor})
                                       the loss summed over those target tokens, and extra metrics,
                                       also sums over the target tokens
    evaluate(model) -> {name: float} | None
                                       validation metrics ("val_loss" drives early stopping), or None
    state_dict() / load_state_dict(d)  where its batches stand, so that a resumed run continues exactly
    describe() -> str                  one line for the run's summary

and optionally `shown`, a tuple of its metrics' names that the log line shows beside the loss.

Sums, not means: a step divides the sum of all its micro-batches (and all ranks) by their total number
of target tokens, so every token weighs the same however the tokens fall into micro-batches -- which
masked fine-tuning data and packed conversations need (a mean per micro-batch would not be).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from commonlm.config import RunConfig
from commonlm.data.loader import TokenData, TrainBatches
from commonlm.data.tokenizer import Tokenizer
from commonlm.evaluate.evaluate import evaluate
from commonlm.model.kv_cache import PackedRows
from commonlm.model.loss import IGNORE, lm_loss
from commonlm.runtime import autocast
from commonlm.utils import console, human
from commonlm.world import World


class Objective(Protocol):
    def next_batch(self) -> Any: ...
    def targets(self, batch: Any) -> torch.Tensor: ...
    def positions(self, batch: Any) -> int: ...
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def describe(self) -> str: ...


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype,
                    packed: PackedRows | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The cross-entropy of predicting y from x, summed over the targets that are not IGNORE, plus the
    model's auxiliary losses (means per forward pass) weighted by that count, like the loss; those are also
    returned as metrics. Pretraining and fine-tuning on conversations share it; `packed` says where the
    rows of packed conversations begin and end."""
    with autocast(device, dtype):
        logits, aux = model(x) if packed is None else model(x, cache=packed)
    total = lm_loss(logits, y, reduction="sum")
    if not aux:
        return total, {}
    n = (y != IGNORE).sum()
    weighted = {name: value * n for name, value in aux.items()}
    return total + sum(weighted.values()), weighted


class TokenTargets:
    """Batches (x, y) whose targets are y's tokens that are not IGNORE: pretraining's and fine-tuning's.
    Needs `self.device` and `self.dtype`."""

    device: torch.device
    dtype: torch.dtype

    def targets(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (batch[1] != IGNORE).sum()

    def positions(self, batch: tuple[torch.Tensor, ...]) -> int:
        """What the model computes: every position of the (possibly padded) rows."""
        return batch[0].numel()

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
        """(x, y), or (x, y, PackedRows) for packed rows."""
        x, y, *packed = batch
        return next_token_loss(model, x, y, self.device, self.dtype, *packed)


class NextToken(TokenTargets):
    """Pretraining: predict every next token of windows drawn from prepared token shards."""

    def __init__(self, config: RunConfig, world: World, device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module | None = None):
        cfg = config.train
        self.seq_len = cfg.seq_len or config.model.max_seq_len
        self.data = TokenData(config.data.path)
        self.data.check_tokenizer(Tokenizer.load(self.data.path))
        self.batches = TrainBatches(self.data, self.seq_len, cfg.micro_batch_size, seed=cfg.seed, rank=world.rank,
                                    world=world.size)
        self.world, self.device, self.dtype = world, device, dtype
        self.eval_batch, self.eval_tokens = cfg.micro_batch_size, cfg.eval_tokens
        if world.is_main and not self.data.has_split("val"):
            console.print(f"[yellow]warning: {self.data.path} has no validation split, so this run measures no "
                          "validation loss and cannot stop early; prepare the data with --val-fraction 0.01 for one[/]",
                          soft_wrap=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.next()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        if not self.data.has_split("val"):
            return None
        return evaluate(model, self.data, self.seq_len, self.eval_batch, self.eval_tokens, device=self.device,
                        dtype=self.dtype, world=self.world).as_dict()

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def describe(self) -> str:
        data = self.data
        return (f"{data.path} · train {human(data.tokens('train'))} tokens"
                + (f" · val {human(data.tokens('val'))} tokens" if data.has_split("val") else " · no val split"))
