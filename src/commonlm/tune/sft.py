"""Supervised fine-tuning on conversations: an objective of the one training loop (train/objective.py).

A micro-batch is `micro_batch_size` conversations (prepared by `commonlm data prepare --format chat`). With
`train.pack` (what `tune sft` sets) they are laid side by side in rows of up to the context, in order, each
row filled until the next conversation does not fit; positions restart at every conversation and attention
keeps to it (a block-diagonal causal mask, model/kv_cache.py's PackedRows). Without it, each conversation
is a row of its own, padded after its end to the longest of the batch. Packing computes less padding: on
stdlib conversations at context 1024, 15% of the positions instead of 43%, 1.12-1.38x the real tokens per
second on this CPU (bench/sft_throughput.py, BENCHMARKS.md), and the same loss either way (tested). Only
the tokens the data marks (assistant turns and their end-of-turn tokens) carry loss. A conversation longer
than the context is cut to it, and the run says how many were cut.

    commonlm tune sft --init MODEL_DIR --data CHAT_DATA --out RUN     (sft_config below: its defaults)
    commonlm train --resume RUN                                       (the objective is in the run's config)
"""

from __future__ import annotations

import numpy as np
import torch

from commonlm.config import RunConfig, apply_overrides, config_from_dict
from commonlm.data.chat import ChatData
from commonlm.data.tokenizer import Tokenizer
from commonlm.errors import UserError
from commonlm.model.kv_cache import PackedRows
from commonlm.model.loss import IGNORE
from commonlm.train.objective import TokenTargets
from commonlm.utils import console, human
from commonlm.world import World, all_reduce_sum


class ChatSFT(TokenTargets):
    """Conversations in a per-epoch permutation seeded by train.seed, `micro_batch_size` per rank per
    micro-batch; position state {epoch, cursor}, so that a resumed run continues exactly. (DPO draws its
    pairs the same way: PER_ITEM conversations make one item.)"""

    PER_ITEM = 1

    def __init__(self, config: RunConfig, world: World, device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module | None = None):
        cfg = config.train
        self.data = ChatData(config.data.path)
        self.data.check_tokenizer(Tokenizer.load(self.data.path))
        if self.data.preference != (self.PER_ITEM == 2):
            verb = "tune dpo" if self.data.preference else "tune sft"
            raise UserError(f"data: {self.data.path} is {'preference' if self.data.preference else 'chat'} data, "
                            f"made for `commonlm {verb}`")
        self.n = self.data.conversations("train") // self.PER_ITEM
        if self.n == 0:
            raise UserError(f"data: {self.data.path} has no training conversations")
        self.context = cfg.seq_len or config.model.max_seq_len
        self.batch, self.seed = cfg.micro_batch_size, cfg.seed
        self.world, self.device, self.dtype = world, device, dtype
        self.pad = Tokenizer.load(self.data.path).pad_id
        self.pack = cfg.pack and self.PER_ITEM == 1  # (pairs are scored row by row)
        self.epoch, self.cursor = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        long = sum(1 for i in range(self.n) if len(self.data.conversation("train", i)[0]) > self.context + 1)
        if long and world.is_main:
            console.print(f"[yellow]note: {long} of {self.n} training conversations are longer than the context of "
                          f"{self.context} tokens; their ends are cut off[/]", soft_wrap=True)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rows([self.data.conversation("train", i) for i in self._pick()], self.context, self.pad, self.device,
                    self.pack)

    def _pick(self) -> list[int]:
        """This rank's items of the next micro-batch, advancing the position."""
        picked = []
        for _ in range(self.batch * self.world.size):  # every rank walks the same order and takes its block
            picked.append(int(self._order(self.epoch)[self.cursor]))
            self.cursor += 1
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return picked[self.world.rank * self.batch : (self.world.rank + 1) * self.batch]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        """Loss per assistant token over every validation conversation (this rank's share, then summed)."""
        if not self.data.has_split("val") or self.data.conversations("val") == 0:
            return None
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine = list(range(self.world.rank, self.data.conversations("val"), self.world.size))
        for start in range(0, len(mine), self.batch):
            batch = rows([self.data.conversation("val", i) for i in mine[start : start + self.batch]], self.context,
                         self.pad, self.device, self.pack)
            loss, _ = self.loss(model, batch)
            total += torch.stack([loss.double(), self.targets(batch).double()])
        all_reduce_sum(total, self.world)
        model.train(was_training)
        count = max(int(total[1].item()), 1)
        loss = total[0].item() / count
        return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50.0))), "val_tokens": count}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = int(state.get("epoch", -1)), int(state.get("cursor", -1))
        if epoch < 0 or not 0 <= cursor < self.n:
            raise UserError(f"data: the saved position (epoch {epoch}, conversation {cursor}) does not fit the "
                            f"{self.n} training conversations of {self.data.path}: the data changed")
        self.epoch, self.cursor = epoch, cursor

    def describe(self) -> str:
        d = self.data
        val = f" · val {d.conversations('val')} conversations" if d.has_split("val") else " · no val split"
        return (f"{d.path} (chat) · train {d.conversations('train')} conversations, {human(d.tokens('train'))} "
                f"tokens, {human(d.target_tokens('train'))} with loss{val} · "
                + ("packed in rows" if self.pack else "one per row"))


def rows(conversations: list[tuple[np.ndarray, np.ndarray]], context: int, pad: int, device: torch.device,
         pack: bool = False) -> tuple[torch.Tensor, ...]:
    """x, y [B, T]: each conversation cut to context + 1 tokens and shifted by one, in a row of its own padded
    after its end, or with `pack` laid side by side in rows of up to `context` positions (then a third item,
    the PackedRows saying where each begins). y is IGNORE where the next token carries no loss (system and
    user turns, the assistant header, padding)."""
    cut = [(ids[: context + 1], mask[: context + 1]) for ids, mask in conversations]
    layout: list[list[int]] = []  # the conversations of each row
    used = context
    for i, (ids, _) in enumerate(cut):
        if not pack or used + len(ids) - 1 > context:
            layout.append([])
            used = 0
        layout[-1].append(i)
        used += len(ids) - 1
    T = max(sum(len(cut[i][0]) - 1 for i in row) for row in layout)
    x = torch.full((len(layout), T), pad, dtype=torch.long)
    y = torch.full((len(layout), T), IGNORE, dtype=torch.long)
    segments = -1 - torch.arange(T).repeat(len(layout), 1)  # padding: each position a segment of its own
    for r, row in enumerate(layout):
        at = 0
        for s, i in enumerate(row):
            ids, mask = cut[i]
            n = len(ids) - 1
            ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            keep = torch.from_numpy(np.asarray(mask[1:], dtype=bool))
            x[r, at : at + n] = ids_t[:-1]
            y[r, at : at + n] = ids_t[1:].masked_fill(~keep, IGNORE)
            segments[r, at : at + n] = s
            at += n
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (x, y, PackedRows(segments.to(device))) if pack else (x, y)


# Fine-tuning starts from the model's own config with these training settings (then the user's --set):
# a lower learning rate, a short warmup, evaluation over the whole (small) validation split, and none of
# the pretraining run's budget, accumulation or stopping rules.
SFT_DEFAULTS = ["train.objective=sft", "train.pack=true", "train.lr=1e-4", "train.min_lr_ratio=0.1",
                "train.warmup_steps=20", "train.max_steps=500", "train.max_time=0", "train.tokens_per_step=0",
                "train.micro_batch_size=8", "train.seq_len=0", "train.eval_every=100", "train.eval_tokens=0",
                "train.ckpt_every=250", "train.patience=0", "train.target_val_loss=0", "train.schedule=cosine"]


def sft_config(init: str, data: str, overrides: list[str]) -> RunConfig:
    """The config of a fine-tuning run from the model directory (or run) `init` on chat data `data`; tune
    dpo's starts from it (its own defaults come first in `overrides`)."""
    from commonlm.api import resolve_model_path
    from commonlm.modeldir import read_run_config

    path = resolve_model_path(init)
    config, _ = read_run_config(path)
    # the base of this run (a LoRA run reads it again on resume); not how `init` itself was trained
    start = [f"train.init={path.resolve()}", "train.lora_rank=0", "train.base_quant="]
    config = config_from_dict(apply_overrides(config.to_dict(), SFT_DEFAULTS + start + list(overrides)))
    config.data.path = str(data)
    return config.validate()
