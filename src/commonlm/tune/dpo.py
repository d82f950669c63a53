"""Direct preference optimization (DPO, sigmoid loss): an objective of the one training loop (train/objective.py).

The data is preference pairs (`commonlm data prepare --format preference`): conversation 2k of a split is pair
k's prompt with its chosen reply, 2k + 1 the same prompt with its rejected reply, and only the reply's tokens are
targets. The log-probability of a reply is the sum of its tokens' log-probabilities. With the policy's (pc, pr)
and the frozen reference model's (rc, rr), the loss of a pair is

    -logsigmoid(beta * ((pc - rc) - (pr - rr)))        beta = train.dpo_beta

The reference is the model the run started from (`train.reference`, which `tune dpo` sets to --init, so that
`train --resume` finds it again). Its log-probabilities are computed once, when the objective is made, for every
training and validation pair (on every rank), and the reference model is then dropped: that costs one forward
pass per reply up front and two floats per pair of memory, instead of a second model in memory during training.

A micro-batch is `micro_batch_size` pairs (twice as many rows); `targets` counts pairs, so the loop's step loss
is the mean over pairs, and the metrics (rewards beta * (policy - reference) of the chosen and rejected replies,
their margin, and the accuracy margin > 0) are means over pairs too.

    commonlm tune dpo --init MODEL_DIR --data PREFERENCE_DATA --out RUN     (dpo_config below: its defaults)
    commonlm train --resume RUN
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from commonlm.config import RunConfig
from commonlm.model.loss import IGNORE
from commonlm.runtime import autocast
from commonlm.tune.sft import ChatSFT, rows, sft_config
from commonlm.utils import human
from commonlm.world import World, all_reduce_sum

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, y [2B, T] (chosen, rejected, ...), reference [B, 2]
METRICS = ("chosen_reward", "rejected_reward", "margin", "accuracy")


def reply_logps(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[R]: per row, the sum of the log-probabilities of its targets (y != IGNORE), in fp32."""
    logp = logits.float().log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != IGNORE, logp, 0.0).sum(-1)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the sigmoid DPO loss, the chosen reward beta * (pc - rc) and the rejected one beta * (pr - rr)."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


class DPO(ChatSFT):
    """Pairs in ChatSFT's seeded per-epoch order (its position state, so resuming is exact)."""

    PER_ITEM = 2

    def __init__(self, config: RunConfig, world: World, device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module | None = None):
        from commonlm.modeldir import load_model_dir

        super().__init__(config, world, device, dtype, model)
        self.beta, self.reference_path = config.train.dpo_beta, config.train.reference
        reference, _, _ = load_model_dir(config.train.reference, device=device)
        reference.eval()
        self.reference = {split: self._reference_logps(reference, split) for split in ("train", "val")
                          if self.data.has_split(split)}  # fmt: skip

    def _rows(self, split: str, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        convs = [self.data.conversation(split, 2 * k + j) for k in pairs for j in (0, 1)]
        return rows(convs, self.context, self.pad, self.device)

    @torch.no_grad()
    def _reference_logps(self, model: torch.nn.Module, split: str) -> torch.Tensor:
        """[pairs, 2]: the reference's log-probabilities of every pair's chosen and rejected reply."""
        n = self.data.conversations(split) // 2
        out = []
        for start in range(0, n, self.batch):
            x, y = self._rows(split, list(range(start, min(start + self.batch, n))))
            with autocast(self.device, self.dtype):
                logits, _ = model(x)
            out.append(reply_logps(logits, y))
        return torch.cat(out).view(-1, 2)

    def _batch(self, split: str, pairs: list[int]) -> Batch:
        return (*self._rows(split, pairs), self.reference[split][pairs])

    def next_batch(self) -> Batch:
        return self._batch("train", self._pick())

    def targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch[2].shape[0], device=self.device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss summed over the batch's pairs, and the metrics' sums; MoE auxiliary losses (means per
        forward pass) weighted by the pair count, like the loss."""
        x, y, ref = batch
        with autocast(self.device, self.dtype):
            logits, aux = model(x)
        policy = reply_logps(logits, y).view(-1, 2)
        losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)
        margin = (chosen - rejected).detach()
        metrics = dict(zip(METRICS, (chosen.detach().sum(), rejected.detach().sum(), margin.sum(),
                                     (margin > 0).float().sum())))  # fmt: skip
        weighted = {name: value * len(losses) for name, value in aux.items()}
        return losses.sum() + sum(weighted.values()), metrics | weighted

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        """Loss and metrics per pair over every validation pair (this rank's share, then summed)."""
        if "val" not in self.reference:
            return None
        was_training = model.training
        model.eval()
        total = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=self.device)
        mine = list(range(self.world.rank, len(self.reference["val"]), self.world.size))
        for start in range(0, len(mine), self.batch):
            batch = self._batch("val", mine[start : start + self.batch])
            loss, parts = self.loss(model, batch)
            total += torch.stack([loss, self.targets(batch), *(parts[m] for m in METRICS)]).double()
        all_reduce_sum(total, self.world)
        model.train(was_training)
        pairs = max(total[1].item(), 1.0)
        values = {f"val_{m}": v.item() / pairs for m, v in zip(METRICS, total[2:])}
        return {"val_loss": total[0].item() / pairs, **values, "val_pairs": int(total[1].item())}

    def describe(self) -> str:
        d = self.data
        val = f" · val {d.conversations('val') // 2} pairs" if d.has_split("val") else " · no val split"
        return (f"{d.path} (preference) · train {self.n} pairs, {human(d.tokens('train'))} tokens{val} · "
                f"beta {self.beta}, reference {self.reference_path}")


# DPO starts from SFT's fine-tuning settings (tune/sft.py) with these: a much lower learning rate (the
# policy should stay near the reference; 5e-6 is the usual scale for real models, TRL's default being 1e-6),
# 4 pairs (8 replies) per micro-batch, and beta 0.1 (TRL's default).
DPO_DEFAULTS = ["train.objective=dpo", "train.lr=5e-6", "train.micro_batch_size=4", "train.warmup_steps=10",
                "train.dpo_beta=0.1"]


def dpo_config(init: str, data: str, overrides: list[str]) -> RunConfig:
    """The config of a DPO run from the model directory (or run) `init` on preference data `data`; `init` is
    also the frozen reference (train.reference)."""
    from commonlm.api import resolve_model_path

    reference = Path(resolve_model_path(init)).resolve()
    return sft_config(init, data, DPO_DEFAULTS + [f"train.reference={reference}", *overrides])
